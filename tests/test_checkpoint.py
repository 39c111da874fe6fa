"""Checkpoints across attempts: resuming from an earlier point into the same directory, resuming a finished run,
resuming through the ticket — real DeepSpeed engines and in-process runs of the real command (one rank)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from earlybert_ds import checkpoint
from earlybert_ds.config import RunConfig
from earlybert_ds.engine import Engine
from earlybert_ds.modeling import EarlyBertForPreTraining

from conftest import losses, run_single, tiny_config, tiny_run_args


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


@pytest.fixture(scope="module")
def ticket_run(corpus, tmp_path_factory) -> Path:
    """A finished tiny run with a random ticket drawn at step 0 (the cheapest run that writes a ticket)."""
    out = tmp_path_factory.mktemp("ticket") / "run"
    _ok(run_single(tiny_run_args(*corpus, out, **{"earlybert.draw": "random", "train.steps": 4,
                                                  "earlybert.max_search_steps": 2, "train.eval_every": 0})))
    return out


def _refused(capsys, argv: list[str], *needles: str) -> None:
    from earlybert_ds.cli import main

    assert main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


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
             f"the ticket {ticket} was drawn with the tokenizer in {ticket / 'tokenizer'} (600 tokens)",
             f"data.tokenizer={tmp_path / 'other-tokenizer'} (600 tokens) gives other token ids")
    _refused(capsys, tiny_run_args(*corpus, out, **{"model.hidden_size": 64}) + ["--resume-from", str(ticket)],
             f"model.hidden_size=64 differs from the model of the ticket {ticket} (hidden_size=32)")
    assert not (out / "run_config.json").exists() and not (out / "checkpoints").exists()
