"""Faults survived: killed ranks, crashes in the middle of writes, divergence — with real SIGKILLs of real
2-rank `deepspeed` jobs. The reference is the uninterrupted run of the same configuration (``zero2_run``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, launch, losses, tiny_run_args

Z2 = {"train.zero_stage": 2, "train.precision": "bf16"}


def _resume_equals_reference(args: list[str], out: Path, reference: Path) -> None:
    done = launch(args + ["--resume"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "ticket" / "ticket.json").read_text() == (reference / "ticket" / "ticket.json").read_text()
    assert losses(out) == losses(reference)  # bit-identical, every step
    summary, ref = (json.loads((p / "summary.json").read_text()) for p in (out, reference))
    assert summary["final_val_loss"] == ref["final_val_loss"]


@pytest.mark.slow
def test_killed_rank_during_efficient_training(corpus, tmp_path, zero2_run):
    out = tmp_path / "run"
    args = tiny_run_args(*corpus, out, **Z2)
    t0 = time.monotonic()
    killed = launch(args, env={"EARLYBERT_FAULT": "step:18@rank0"})  # the coordinator dies after step 18
    assert killed.returncode != 0 and time.monotonic() - t0 < 120
    assert (out / "checkpoints" / "latest").read_text() == "global_step16" and not (out / "summary.json").exists()
    _resume_equals_reference(args, out, zero2_run)


@pytest.mark.slow
def test_crash_while_checkpointing_keeps_latest_on_the_last_complete_one(corpus, tmp_path, zero2_run):
    out = tmp_path / "run"
    args = tiny_run_args(*corpus, out, **Z2)
    # every shard of step 16 written, `latest` not yet moved: both ranks die
    assert launch(args, env={"EARLYBERT_FAULT": "checkpoint:global_step16"}).returncode != 0
    assert (out / "checkpoints" / "latest").read_text() == "global_step12"
    assert (out / "checkpoints" / "global_step16").is_dir()  # written, but not taken for complete
    _resume_equals_reference(args, out, zero2_run)


@pytest.mark.slow
def test_crash_while_writing_the_ticket_leaves_no_ticket(corpus, tmp_path, zero2_run):
    out = tmp_path / "run"
    args = tiny_run_args(*corpus, out, **Z2)
    # the ticket directory is complete in its temporary place, the rename not yet done
    assert launch(args, env={"EARLYBERT_FAULT": "dir:ticket@rank0"}).returncode != 0
    assert not (out / "ticket").exists() and list(out.glob(".ticket.tmp-*"))
    _resume_equals_reference(args, out, zero2_run)  # the search resumes and draws the same ticket
    assert not list(out.glob(".ticket.tmp-*"))


@pytest.mark.slow
def test_crash_while_exporting_the_final_model(corpus, tmp_path, zero2_run):
    out = tmp_path / "run"
    args = tiny_run_args(*corpus, out, **Z2)
    assert launch(args, env={"EARLYBERT_FAULT": "dir:final@rank0"}).returncode != 0
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    _resume_equals_reference(args, out, zero2_run)
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_divergence_stops_with_a_clear_message_and_the_last_good_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    proc = launch(tiny_run_args(*corpus, out, **{"train.zero_stage": 2}), env={"EARLYBERT_FAULT": "diverge:14"})
    assert proc.returncode != 0
    assert "the loss was non-finite for 3 consecutive steps (up to step 17)" in proc.stderr + proc.stdout
    assert "Last good checkpoint: global_step12" in proc.stderr + proc.stdout
    assert (out / "checkpoints" / "latest").read_text() == "global_step12"  # step 16 was not saved: NaN
    loss = losses(out)
    assert all(loss[s] == loss[s] for s in range(1, 15)) and all(loss[s] != loss[s] for s in (15, 16, 17))


@pytest.mark.slow
def test_fp16_overflow_steps_are_skipped_and_counted(corpus, tmp_path):
    ds = tmp_path / "fp16.json"
    ds.write_text(json.dumps({"fp16": {"enabled": True, "initial_scale_power": 40, "loss_scale_window": 1000},
                              "zero_optimization": {"stage": 1}}))
    out = tmp_path / "run"
    proc = launch(tiny_run_args(*corpus, out, **{"deepspeed": ds, "train.precision": "fp16",
                                                 "earlybert.enabled": "false", "train.steps": 12}))
    if "not supported on your device" in proc.stdout + proc.stderr:
        pytest.skip("DeepSpeed refuses fp16 on this CPU (no AVX512-FP16); runs on CUDA and AVX512-FP16 CPUs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss_scale" in r]
    assert train[0]["loss_scale"] < 2.0**40 and train[0]["skipped_steps"] >= 1  # 2^40 overflows: skipped, halved
    scales = [r["loss_scale"] for r in train]
    assert scales == sorted(scales, reverse=True) and train[-1]["skipped_steps"] >= train[0]["skipped_steps"]


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_atomic_writes_are_whole_or_absent(tmp_path, kind):
    """A process SIGKILLed at the worst moment of a write leaves the old content (or nothing), never a part."""
    target = tmp_path / ("summary.json" if kind == "file" else "final")
    write = ("atomic_write_text(t, 'new' * 100000)" if kind == "file" else
             "d = atomic_directory(t)\nwith d as tmp:\n    (tmp / 'model.safetensors').write_bytes(b'x' * 10**6)")
    code = f"from pathlib import Path\nfrom earlybert_ds.atomic import *\nt = Path({str(target)!r})\n{write}\n"
    if kind == "file":
        target.write_text("old")
    else:
        target.mkdir()
        (target / "model.safetensors").write_text("old")
    env = {**os.environ, "EARLYBERT_FAULT": f"{'write' if kind == 'file' else 'dir'}:{target.name}"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    old = target.read_text() if kind == "file" else (target / "model.safetensors").read_text()
    assert old == "old"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO)  # no fault: the write completes
    assert proc.returncode == 0
    new = target.read_text() if kind == "file" else (target / "model.safetensors").read_text()
    assert new == ("new" * 100000 if kind == "file" else "x" * 10**6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind
