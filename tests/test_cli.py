"""The command line: --help, and bad input failing early with a message that names the problem, nothing written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from earlybert_ds.cli import build_parser, main, parse
from earlybert_ds.config import ConfigError, config_from_args
from earlybert_ds.data import load_tokenizer

from conftest import REPO, run_single, tiny_run_args


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def _options_in_help(command: str) -> dict[tuple[str, ...], list[str]]:
    """``COMMAND --help``'s options (each with its other names), each with the defaults its text shows."""
    blocks = re.split(r"\n  (?=-)", build_parser().commands[command].format_help().split("\noptions:", 1)[1])[1:]
    return {tuple(re.findall(r"(?:^|, )(-[-\w.]+)", block.splitlines()[0])):
            re.findall(r"\(default: ([^)]*)\)", " ".join(block.split())) for block in blocks}


@pytest.mark.slow
def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "earlybert_ds", "pretrain", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    for option in ("--output-dir", "--deepspeed", "--corpus", "--resume-from", "--train.zero_stage",
                   "--earlybert.epsilon", "--earlybert.weights", "--data.whole_word_mask", "--log.wandb"):
        assert option in out
    assert "{rewind,continue}" in out and "(default: 0.1)" in out


@pytest.mark.parametrize("command, weights, lr", [("pretrain", "continue", "0.001"), ("finetune", "rewind", "2e-05")])
def test_each_command_shows_and_applies_its_own_defaults(command, weights, lr):
    """Pre-training continues the searched weights (measured: docs/results-pretraining.md), fine-tuning rewinds
    them to the pre-trained ones (the paper); --help says what the command will do, not the bare fields' defaults."""
    shown = {names[0]: defaults[0] if defaults else None for names, defaults in _options_in_help(command).items()}
    assert (shown["--earlybert.weights"], shown["--train.lr"]) == (weights, lr)
    args = build_parser().parse_args([command, "--output-dir", "x", *(["--task", "sst2", "--model", "m"]
                                                                       if command == "finetune" else [])])
    cfg = config_from_args(args, command)
    assert (cfg.earlybert.weights, cfg.train.lr) == (weights, float(lr))


@pytest.mark.parametrize("overrides, needles", [
    ({"train.warmup_steps": 500, "train.steps": 100}, ["train.warmup_steps=500 exceeds train.steps=100"]),
    ({"train.zero_stage": 5}, ["train.zero_stage=5", "0, 1, 2, 3"]),
    ({"train.lr": "fast"}, ["train.lr='fast' is not a valid float"]),
    ({"earlybert.epsilon": 0}, ["earlybert.epsilon=0.0", "> 0"]),
    ({"earlybert.head_ratio": 1.0}, ["earlybert.head_ratio=1.0", "[0, 1)"]),
    ({"earlybert.draw": "lottery"}, ["earlybert.draw='lottery' must be one of earlybird, fixed, random"]),
    ({"earlybert.max_search_steps": 30}, ["earlybert.max_search_steps=30", "train.steps=30"]),
    ({"earlybert.draw": "given"}, ["earlybert.draw=given needs earlybert.ticket"]),
    ({"earlybert.draw": "given", "earlybert.ticket": "/no/such/ticket.json"}, ["earlybert.ticket",
                                                                              "no such ticket file"]),
    ({"earlybert.ticket": "/no/such/ticket.json"}, ["earlybert.ticket=/no/such/ticket.json needs earlybert.draw"]),
])
def test_bad_run_config_fails_before_anything(capsys, corpus, tmp_path, overrides, needles):
    out = tmp_path / "run"
    _fails(capsys, tiny_run_args(*corpus, out, **overrides), *needles)
    assert not out.exists()


def test_unknown_field_in_config_file(capsys, corpus, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  lrr: 0.1\n")
    _fails(capsys, ["--config", str(cfg), "--output-dir", str(tmp_path / "run")],
           f"{cfg}: unknown field 'train.lrr' (did you mean 'train.lr'?)")


def test_bad_input_found_at_start_leaves_the_directory_reusable(capsys, corpus, tmp_path):
    out = tmp_path / "run"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \n")
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": "auto"}}))
    bad_stage = tmp_path / "stage.json"
    bad_stage.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    cases = [
        ({"--corpus": tmp_path / "missing.txt"}, ["missing.txt: corpus file or directory not found"]),
        ({"--corpus": empty}, ["empty.txt: corpus is empty"]),
        ({"data.tokenizer": tmp_path / "no-tokenizer"}, ["no-tokenizer: tokenizer directory not found"]),
        ({"--deepspeed": bad_ds}, ["train_batch_size=64", "train.micro_batch_size 4"]),
        ({"--deepspeed": bad_stage}, ["zero_optimization.stage", "7"]),
        ({"--deepspeed": tmp_path / "nope.json"}, ["nope.json"]),
        ({"model.num_heads": 2, "model.hidden_size": 32, "earlybert.head_ratio": 0.8},
         ["earlybert ratios do not fit the model", "would leave it empty"]),
        ({"model.init_from": tmp_path}, ["not a model directory"]),
    ]
    for overrides, needles in cases:
        _fails(capsys, tiny_run_args(*corpus, out, **overrides), *needles)
        # nothing was trained or recorded: the same directory is still free for a corrected run
        assert not (out / "run_config.json").exists() and not (out / "checkpoints").exists()


def test_output_dir_of_another_run_is_refused(capsys, corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text("{}")
    before = sorted(p.name for p in out.iterdir())
    _fails(capsys, tiny_run_args(*corpus, out), "already holds a run", "--resume")
    assert (out / "run_config.json").read_text() == "{}" and sorted(p.name for p in out.iterdir() if
                                                                    p.name != ".lock") == before
    _fails(capsys, tiny_run_args(*corpus, out) + ["--resume-from", str(tmp_path)], "not a checkpoint")


# ---- each command's help, the names it takes, and what it refuses ----------------------------------------------

def _config(command: str, *argv: str):
    return parse([command, *argv])[1]


FINETUNE = ("--task", "sst2", "--model", "/models/bert")


def test_bench_help_works():
    proc = subprocess.run([sys.executable, "-m", "earlybert_ds", "bench", "--help"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "throughput,pretrain,finetune,tickets,lamb,data" in proc.stdout and "``" not in proc.stdout


@pytest.mark.parametrize("command, own, foreign", [
    ("pretrain", ["--corpus", "--model.hidden_size", "--earlybert.search_fraction", "--train.eval_batches"],
     ["--finetune.task", "--finetune.epochs", "--task"]),
    ("finetune", ["--task", "--finetune.epochs", "--train.global_batch_size", "--model.init_from"],
     ["--corpus", "--data.corpus", "--data.seq_len", "--model.hidden_size", "--train.eval_batches",
      "--earlybert.search_fraction"]),
])
def test_each_help_shows_its_own_options_each_default_once(command, own, foreign):
    """--help lists only what the command uses, shows each option's default once (none where unset: the text says
    what unset means), in plain text."""
    options = _options_in_help(command)
    names = {name for other_names in options for name in other_names}
    text = build_parser().commands[command].format_help()
    assert set(own) <= names and not set(foreign) & names, sorted(names)
    assert all(len(defaults) <= 1 for defaults in options.values()), options
    assert "(default: None)" not in text and "``" not in text and ":class:" not in text
    assert len(text.splitlines()) < 300
    steps = "(default: 300)" if command == "pretrain" else "unset = finetune.epochs"
    assert steps in " ".join(text.split())


def test_precision_auto_is_accepted():
    from earlybert_ds.dsconfig import plan_ds
    from earlybert_ds.hardware import Machine, this_machine

    cfg = _config("pretrain", "--train.precision", "auto")
    assert cfg.train.precision == "auto" and "(auto: " in plan_ds(cfg, 1, this_machine()).describe_precision()
    a100 = Machine("cuda", capability=(8, 0), torch_cuda=(12, 8))
    assert plan_ds(cfg, 1, a100).config["bf16"]["enabled"] is True  # auto: bf16 on an Ampere GPU


def test_options_the_mode_ignores_are_refused(tmp_path):
    """An option given on the command line that the chosen mode would not use is refused with the reason; a config
    file may hold it (one file serves several modes: a run's own run_config.json holds every field)."""
    cases = [
        ("pretrain", ["--earlybert.fixed_step", "50"], "--earlybert.fixed_step=50 is ignored: it is the step of "
                                                       "earlybert.draw=fixed or random_at, and the draw is earlybird"),
        ("pretrain", ["--model.init_from", "/m", "--model.num_layers", "3"], "--model.num_layers=3 is ignored: "
                                                                             "model.init_from=/m has its own shape"),
        ("pretrain", ["--data.tokenizer", "/t", "--data.vocab_size", "900"], "--data.vocab_size=900 is ignored"),
        ("pretrain", ["--train.global_batch_size", "64", "--train.grad_accum", "2"],
         "--train.grad_accum=2 is ignored: it follows from train.global_batch_size=64"),
        ("pretrain", ["--train.warmup_steps", "5", "--train.warmup_ratio", "0.2"], "--train.warmup_ratio=0.2 is ign"),
        ("pretrain", ["--earlybert.enabled", "false", "--earlybert.draw", "fixed"], "--earlybert.draw=fixed is "
                                                                                    "ignored: earlybert.enabled=false"),
        ("pretrain", ["--earlybert.draw", "random", "--earlybert.weights", "rewind"], "--earlybert.weights=rewind is "
                                                                                      "ignored: earlybert.draw=random"),
        ("finetune", [*FINETUNE, "--train.steps", "100", "--finetune.epochs", "2"],
         "--finetune.epochs=2 is ignored: train.steps=100 is the budget"),
        ("finetune", [*FINETUNE, "--finetune.text_b", "hypothesis"], "--finetune.text_b=hypothesis is ignored: it "
                                                                     "describes a custom task, and the task is sst2"),
        ("finetune", ["--task", "squad", "--model", "/m", "--finetune.test_file", "t.json"],
         "--finetune.test_file=t.json is ignored"),
    ]
    for command, argv, needle in cases:
        with pytest.raises(ConfigError) as e:
            _config(command, *argv)
        assert needle in str(e.value), (argv, str(e.value))
    base = tmp_path / "base.yaml"
    base.write_text("earlybert:\n  fixed_step: 50\n  window: 3\n")
    assert _config("pretrain", "--config", str(base)).earlybert.fixed_step == 50  # a file may hold it
    # the search schedule is accepted with any draw: one set of options runs a method and its controls
    assert _config("pretrain", "--earlybert.draw", "random", "--earlybert.max_search_steps", "10",
                   "--earlybert.window", "3").earlybert.draw == "random"


def test_every_problem_is_reported_at_once_and_printed_once():
    proc = subprocess.run([sys.executable, "-m", "earlybert_ds", "pretrain", "--train.lr", "fast", "--lrr", "1",
                           "--train.steps", "0", "--earlybert.fixed_step", "5", "--do_train", "--model.num_heads",
                           "3", "--output-dir", "never"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2 and not (REPO / "never").exists()
    needles = ["6 problems in the run configuration", "unknown option --lrr (did you mean --train.lr?)",
               "train.lr='fast' is not a valid float", "train.steps=0 must be >= 1",
               "--earlybert.fixed_step=5 is ignored", "--do_train is a Hugging Face option",
               "model.hidden_size=256 is not a multiple of model.num_heads=3"]
    for needle in needles:
        assert proc.stderr.count(needle) == 1, (needle, proc.stderr)
    assert proc.stderr.count("error") == 1


def test_hugging_face_names_are_aliases_or_refused_with_a_hint():
    cfg = _config("finetune", *FINETUNE, "--learning_rate", "3e-5", "--output_dir", "runs/x",
                  "--per_device_train_batch_size", "16", "--num_train_epochs", "2", "--warmup_ratio", "0.06",
                  "--seed", "7", "--bf16", "--max_seq_length", "256", "--model_name_or_path", "/models/bert")
    t = cfg.train
    assert (t.lr, cfg.output_dir, t.micro_batch_size, cfg.finetune.epochs, t.warmup_ratio, t.seed, t.precision,
            cfg.finetune.max_len, cfg.model.init_from) == (3e-5, "runs/x", 16, 2.0, 0.06, 7, "bf16", 256,
                                                           "/models/bert")
    assert t.global_batch_size is None  # a per-device batch, as in Hugging Face: the global batch follows the ranks
    assert _config("pretrain", "--max_seq_length", "64", "--train_file", "c.txt").data.seq_len == 64
    refusals = [("pretrain", ["--num_train_epochs", "3"], "--num_train_epochs is a Hugging Face option with no "
                                                          "one-to-one meaning here: pre-training counts optimizer "
                                                          "steps: --train.steps"),
                ("finetune", [*FINETUNE, "--do_train"], "--do_train is a Hugging Face option"),
                ("finetune", [*FINETUNE, "--evaluation_strategy", "steps"], "--train.eval_every"),
                ("finetune", [*FINETUNE, "--adam_beta2", "0.98"], "--train.betas B1,B2"),
                ("finetune", [*FINETUNE, "--per_device_train_batch_sise", "8"],
                 "unknown option --per_device_train_batch_sise (did you mean --per_device_train_batch_size?)")]
    for command, argv, needle in refusals:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            _config(command, *argv)


def test_init_from_gives_the_default_tokenizer(minilm_dir, tmp_path):
    cfg = _config("pretrain", "--model.init_from", str(minilm_dir))
    cfg.settle_launch(1)
    assert cfg.data.tokenizer == str(minilm_dir)
    given = _config("pretrain", "--model.init_from", str(minilm_dir), "--data.tokenizer", str(tmp_path))
    given.settle_launch(1)
    assert given.data.tokenizer == str(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    bare = _config("pretrain", "--model.init_from", str(tmp_path))
    with pytest.raises(ConfigError, match="holds no tokenizer .* pass the model's tokenizer with --data.tokenizer"):
        bare.settle_launch(1)


@pytest.mark.slow
def test_a_4_step_smoke_run_with_resume_on_a_directory_without_a_run(corpus, tiny_bert, tmp_path):
    """`--train.steps 4` alone works: the warm-up and the search budget are fractions of the steps. Started from a
    pre-trained BERT in Hugging Face's layout (as MiniLM is; a tiny one here), whose tokenizer becomes the run's (no
    vocabulary is trained); the log states the batch and the budget. With --resume (the README's first command
    carries it, to be safe to repeat) on a directory that holds no run, it starts one, with a warning that names the
    directory (a mistyped path is visible)."""
    model = tiny_bert[0]
    out = tmp_path / "typo"
    proc = run_single(["--corpus", str(corpus[0]), "--data.cache_dir", str(corpus[1]), "--model.init_from",
                       str(model), "--data.seq_len", "32", "--train.steps", "4", "--train.eval_batches", "2",
                       "--output-dir", str(out), "--log.wandb", "disabled", "--log.progress", "false", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"WARNING earlybert_ds: --resume: {out} holds no run (no run_config.json): starting a new run there" \
        in proc.stderr
    assert f"starting {out} at step 0 (stage search)" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["ticket"]["step"] == 1  # the search budget: round(4 / 3) = 1
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["data"]["tokenizer"] == str(model) and saved["train"]["warmup_steps"] == 0
    assert (f"world size 1: global batch 8 = micro batch 8 x grad accum 1 x 1 rank(s); 4 steps, search for at most "
            f"1 steps; warm-up 0 steps, lr 0.001 (adamw, linear decay); {summary['params_full']:,} parameters"
            in proc.stderr), proc.stderr[-3000:]
    vocab = len(load_tokenizer(model))
    assert "WordPiece vocabulary on the corpus" not in proc.stderr and f"vocabulary {vocab}" in proc.stderr


@pytest.mark.parametrize("script, command", [("pretrain.sh", "pretrain"), ("finetune.sh", "finetune")])
def test_single_node_launchers_run_their_command(tmp_path, script, command):
    """launch/pretrain.sh and launch/finetune.sh on a machine without a GPU (stand-ins for `python3`, whose torch
    counts no CUDA GPU, and `deepspeed`): 2 CPU ranks of their own command, every argument passed through."""
    bin_dir, launch_dir = tmp_path / "bin", tmp_path / "repo" / "launch"
    bin_dir.mkdir()
    launch_dir.mkdir(parents=True)
    for name in ("common.sh", script):
        (launch_dir / name).write_text((REPO / "launch" / name).read_text())
    for name, body in {"python3": "echo 0", "deepspeed": 'printf "%s\\n" "$DS_ACCELERATOR" "$@"'}.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "MASTER_PORT", "DS_ACCELERATOR")}
    proc = subprocess.run(["bash", str(launch_dir / script), "--config", "x y", "--output-dir", "runs/a"],
                          env={**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, capture_output=True, text=True,
                          timeout=30, check=True)
    assert proc.stdout.splitlines() == ["cpu", "--num_gpus", "2", "--master_port", "29500", "--module",
                                        "earlybert_ds", command, "--config", "x y", "--output-dir", "runs/a"]
