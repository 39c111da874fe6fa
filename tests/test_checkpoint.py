"""Checkpoints across attempts: resuming from an earlier point into the same directory, resuming a finished run,
resuming through the ticket — real DeepSpeed engines and in-process runs of the real command (one rank)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from earlybert_ds import checkpoint
from earlybert_ds.config import RunConfig
from earlybert_ds.data import load_tokenizer
from earlybert_ds.engine import Engine, lr_lambda
from earlybert_ds.modeling import EarlyBertForPreTraining

from conftest import TICKET_RUN, losses, metrics, run_single, tiny_config, tiny_run_args


def _ok(proc) -> None:
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _engine() -> Engine:
    run = RunConfig()
    run.train.steps, run.train.warmup_steps = 10, 1
    torch.manual_seed(0)
    return Engine(EarlyBertForPreTraining(tiny_config()), run)


def _save(engine: Engine, ckpts: Path, step: int, keep_last: int = 2) -> Path:
    return checkpoint.save(engine, ckpts, step, {"earlybert": {"phase": "efficient", "step": step}}, keep_last)


def _files(path: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_save_after_resuming_from_an_earlier_point_is_kept_and_named_by_latest(distributed, tmp_path):
    """An earlier attempt left checkpoints of later steps (16, 20, 24) in the directory; this attempt resumed from
    the ticket at step 10 and saves step 12: that checkpoint must survive pruning and ``latest`` must name it."""
    engine = _engine()
    ckpts = tmp_path / "checkpoints"
    try:
        for step in (16, 20, 24):
            _save(engine, ckpts, step, keep_last=3)
        _save(engine, ckpts, 12)
        assert checkpoint.resolve(ckpts) == (ckpts, "global_step12")
        assert checkpoint.peek_client_state(ckpts)["step"] == 12
        assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step12"]  # the abandoned branch: gone
        _save(engine, ckpts, 16)
        assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step12", "global_step16"]
        assert checkpoint.resolve(ckpts) == (ckpts, "global_step16")
        # a save of the step `latest` names (resumed from step 12 into a branch that had already saved 16) is a new
        # directory, never a rewrite in place; `latest` names the complete step 12 while it is written
        before = _files(ckpts / "global_step16")
        _save(engine, ckpts, 16)
        after = _files(ckpts / "global_step16")
        assert before.keys() == after.keys() and all(before[k] != after[k] for k in before)
        assert checkpoint.resolve(ckpts) == (ckpts, "global_step16")
    finally:
        engine.destroy()


@pytest.mark.slow
def test_resuming_a_finished_run_leaves_its_checkpoint_untouched(corpus, tmp_path):
    """``--resume`` of a finished run (its last step not a multiple of save_every) only re-exports: the checkpoint
    that ``latest`` names is not rewritten (a kill during a rewrite would leave ``latest`` on a torn one)."""
    out = tmp_path / "run"
    args = tiny_run_args(*corpus, out, **{"train.steps": 14, "earlybert.max_search_steps": 8,
                                          "train.eval_every": 0})
    _ok(run_single(args))
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step14"
    before = _files(ckpts)
    summary = json.loads((out / "summary.json").read_text())
    _ok(run_single(args + ["--resume"]))
    assert _files(ckpts) == before
    assert json.loads((out / "summary.json").read_text())["final_val_loss"] == summary["final_val_loss"]


@pytest.fixture
def ticket_run(finished_run) -> Path:
    """The finished run's directory (:data:`TICKET_RUN`): ticket drawn at step 3 of 8, checkpoints at steps 4 and 8."""
    return finished_run[0]


def _refused(capsys, argv: list[str], *needles: str) -> None:
    from earlybert_ds.cli import main

    assert main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


@pytest.mark.slow
def test_a_ticket_from_another_vocabulary_or_model_shape_is_refused(capsys, corpus, ticket_run, tmp_path):
    """Resuming from a ticket with a tokenizer of the same size but other words, or with ``--model.*`` options that
    differ from the ticket's model, fails naming the mismatch, before anything is written."""
    from earlybert_ds.data import train_wordpiece

    text = corpus[0].read_text(encoding="utf-8")
    other = train_wordpiece([" ".join(w[::-1] for w in text.split())], 600)  # reversed words: other pieces
    other.save_pretrained(tmp_path / "other-tokenizer")
    assert len(other) == 600
    out = tmp_path / "run"
    ticket = ticket_run / "ticket"
    _refused(capsys, tiny_run_args(*corpus, out, **{"data.tokenizer": tmp_path / "other-tokenizer"})
             + ["--resume-from", str(ticket)],
             f"the ticket {ticket} was drawn with the tokenizer in {ticket} (600 tokens)",
             f"data.tokenizer={tmp_path / 'other-tokenizer'} (600 tokens) gives other token ids")
    # older tickets keep their tokenizer in ticket/tokenizer/: still found, and named as the remedy
    older = tmp_path / "older-ticket"
    shutil.copytree(ticket, older)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (older / name).unlink()
    load_tokenizer(ticket).save_pretrained(older / "tokenizer")
    _refused(capsys, tiny_run_args(*corpus, out, **{"data.tokenizer": tmp_path / "other-tokenizer"})
             + ["--resume-from", str(older)],
             f"drawn with the tokenizer in {older / 'tokenizer'} (600 tokens)",
             f"pass --data.tokenizer {older / 'tokenizer'}")
    checkpoint.check_ticket_fits(RunConfig(), load_tokenizer(ticket), older)  # its own tokenizer: accepted
    _refused(capsys, tiny_run_args(*corpus, out, **{"model.hidden_size": 64}) + ["--resume-from", str(ticket)],
             f"model.hidden_size=64 differs from the model of the ticket {ticket} (hidden_size=32)")
    assert not (out / "run_config.json").exists() and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_the_ticket_directory_loads_with_the_auto_classes(ticket_run):
    """README: ``ticket/`` holds the shrunk model: ``AutoModelForMaskedLM.from_pretrained(OUTPUT/ticket)`` loads it
    with the ticket's shape, and its tokenizer beside it."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    ticket = json.loads((ticket_run / "ticket" / "ticket.json").read_text())
    model = AutoModelForMaskedLM.from_pretrained(ticket_run / "ticket")
    assert model.config.heads_per_layer == ticket["heads_per_layer"]
    assert model.config.intermediate_sizes == ticket["intermediate_sizes"]
    assert len(AutoTokenizer.from_pretrained(ticket_run / "ticket")) == model.config.vocab_size == 600


@pytest.mark.slow
def test_resuming_through_the_ticket_is_bit_identical(corpus, ticket_run, tmp_path):
    """From the ticket into a new directory on as many ranks: the losses of the uninterrupted run, bit for bit
    (the ticket holds every rank's random state; dropout is on)."""
    out = tmp_path / "via-ticket"
    proc = run_single(tiny_run_args(*corpus, out, **TICKET_RUN) + ["--resume-from", str(ticket_run / "ticket")])
    _ok(proc)
    assert (f"resuming {out} at step 3 of 8 (stage efficient, from its start) from the ticket {ticket_run / 'ticket'}"
            in proc.stderr)
    ref = losses(ticket_run)
    assert losses(out) == {s: ref[s] for s in range(4, 9)}


@pytest.mark.slow
def test_resuming_from_another_runs_checkpoints_brings_its_ticket(corpus, ticket_run, tmp_path):
    """From another run's efficient-stage checkpoint into a new directory: the ticket comes along, so that a later
    ``--resume`` there works."""
    other = tmp_path / "via-checkpoint"
    _ok(run_single(tiny_run_args(*corpus, other, **TICKET_RUN)
                   + ["--resume-from", str(ticket_run / "checkpoints" / "global_step4")]))
    assert (other / "ticket" / "ticket.json").read_text() == (ticket_run / "ticket" / "ticket.json").read_text()
    ref = losses(ticket_run)
    assert losses(other) == {s: ref[s] for s in range(5, 9)}
    _ok(run_single(tiny_run_args(*corpus, other, **TICKET_RUN) + ["--resume"]))
    assert json.loads((other / "summary.json").read_text())["steps"] == 8


@pytest.mark.slow
def test_non_finite_last_steps_are_not_saved_or_exported(corpus, tmp_path):
    """Two non-finite steps at the very end (fewer than train.max_nonfinite = 3) must not become the final
    checkpoint or model: the run fails, naming the last good checkpoint."""
    out = tmp_path / "run"
    proc = run_single(tiny_run_args(*corpus, out, **TICKET_RUN), env={"EARLYBERT_FAULT": "diverge:6"})
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the last 2 step(s), up to step 8, had a non-finite loss" in proc.stderr
    assert "Last good checkpoint: global_step4" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "global_step4"
    assert not (out / "checkpoints" / "global_step8").exists() and not (out / "final").exists()


# ---- resuming with the saved configuration --------------------------------------------------------------------

def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".lock"))
    return to


@pytest.mark.slow
def test_resume_refuses_a_changed_field_and_names_it(capsys, corpus, ticket_run, tmp_path):
    """The saved run_config.json is the base of a resumed run: an option that differs from it is refused, naming
    the field with both values, before anything is written; train.steps may change by --resume-override, but not
    past the end of a finished run's schedule."""
    run = _copy(ticket_run, tmp_path / "run")
    saved, before = (run / "run_config.json").read_bytes(), _files(run / "checkpoints")
    args = tiny_run_args(*corpus, run, **TICKET_RUN) + ["--resume"]
    _refused(capsys, args + ["--train.lr", "1e-3", "--log.wandb", "offline"],
             "--resume: this command differs from the run in", "    log.wandb: \"disabled\" -> \"offline\"",
             "    train.lr: 0.005 -> 0.001", "--resume-override log.wandb accepts that change",
             "train.lr cannot change in the middle of a run: start a new one (another --output-dir)")
    _refused(capsys, args + ["--train.steps", "999"], "train.steps: 8 -> 999",
             "--resume-override train.steps accepts that change")
    _refused(capsys, args + ["--train.steps", "999", "--resume-override", "train.steps"],
             f"the run in {run} has ended (step 8 of 8", f"--model.init_from {run / 'final'}")
    _refused(capsys, args + ["--resume-override", "train.lr"], "--resume-override train.lr: cannot change")
    assert (run / "run_config.json").read_bytes() == saved and _files(run / "checkpoints") == before


@pytest.mark.slow
def test_resume_override_extends_an_unfinished_run(corpus, ticket_run, tmp_path):
    """A run stopped at step 4 of 8, resumed with --train.steps 12 --resume-override train.steps: the log says where
    it resumes and what changed; the schedule is re-planned from there (the learning rate still decays at step 12
    instead of being 0 from step 8 on) and the saved configuration says 12."""
    run = _copy(ticket_run, tmp_path / "run")
    (run / "checkpoints" / "latest").write_text("global_step4")
    proc = run_single(tiny_run_args(*corpus, run, **{**TICKET_RUN, "train.steps": 12})
                      + ["--resume", "--resume-override", "train.steps"])
    _ok(proc)
    assert (f"resuming {run} at step 4 of 12 (stage efficient) from the checkpoint {run / 'checkpoints'}/global_step4"
            in proc.stderr), proc.stderr[-3000:]
    assert "--resume-override train.steps: 8 -> 12" in proc.stderr
    lr = {m["step"]: m["lr"] for m in metrics(run) if "lr" in m}
    saved = RunConfig.from_dict(json.loads((run / "run_config.json").read_text()))
    last = saved.train.lr * lr_lambda(saved)(11)  # the rate of step 12 (0-based 11) as the 12-step schedule gives it
    assert sorted(lr) == list(range(1, 13)) and lr[8] > lr[12] == pytest.approx(last) and last > 0  # 8 steps: 0
    assert lr[4] == {m["step"]: m["lr"] for m in metrics(ticket_run) if "lr" in m}[4]  # kept up to the resume point
    assert json.loads((run / "run_config.json").read_text())["train"]["steps"] == 12
    assert json.loads((run / "summary.json").read_text())["steps"] == 12

