"""The command line: --help, and bad input failing early with a message that names the problem, nothing written."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from earlybert_ds.cli import build_parser, main
from earlybert_ds.config import COMMAND_DEFAULTS, config_from_args

from conftest import REPO, tiny_run_args


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.slow
def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "earlybert_ds", "pretrain", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    for option in ("--output-dir", "--deepspeed", "--corpus", "--resume-from", "--train.zero_stage",
                   "--earlybert.epsilon", "--earlybert.weights", "--data.whole_word_mask", "--log.wandb"):
        assert option in out
    assert "{rewind,continue}" in out and "(default: 0.1)" in out


@pytest.mark.slow
@pytest.mark.parametrize("command, weights, lr", [("pretrain", "continue", "0.001"), ("finetune", "rewind", "2e-05")])
def test_each_command_shows_and_applies_its_own_defaults(command, weights, lr):
    """Pre-training continues the searched weights (measured: docs/results-pretraining.md), fine-tuning rewinds
    them to the pre-trained ones (the paper); --help says what the command will do, not the bare fields' defaults."""
    out = subprocess.run([sys.executable, "-m", "earlybert_ds", command, "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    shown = dict(re.findall(r"\n  (--[\w.]+) .*?\(default: ([^)]*)\)", out, re.S))
    assert (shown["--earlybert.weights"], shown["--train.lr"]) == (weights, lr)
    args = build_parser().parse_args([command, "--output-dir", "x"])
    cfg = config_from_args(args, defaults=COMMAND_DEFAULTS[command])
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
