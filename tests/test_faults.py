"""Faults survived: killed ranks, crashes in the middle of writes, divergence — with real SIGKILLs of real
2-rank `deepspeed` jobs. The reference is the uninterrupted run of the same configuration (``zero2_run``)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from earlybert_ds.atomic import atomic_directory, atomic_write_text
from earlybert_ds.faults import FAULT_ENV

from conftest import ZERO2, launch, losses, metrics, tiny_mlm_batch, tiny_run_args


def _crash(args: list[str], fault: str) -> None:
    """The job (or its resume) dies at ``fault``: the launcher brings every rank down, no hang."""
    t0 = time.monotonic()
    proc = launch(args, env={"EARLYBERT_FAULT": fault})
    assert proc.returncode != 0 and time.monotonic() - t0 < 120, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_a_job_crashed_at_every_stage_resumes_bit_identical_to_an_uninterrupted_one(corpus, tmp_path, zero2_run):
    """One job, killed in each stage and in the middle of each kind of write, resumed with --resume after each
    crash: it must end with the same ticket and the same loss at every step as the uninterrupted ``zero2_run``."""
    out = tmp_path / "run"
    args = tiny_run_args(*corpus, out, **ZERO2)
    ckpts = out / "checkpoints"
    _crash(args, "step:6@rank1")  # a rank SIGKILLed mid-search
    assert (ckpts / "latest").read_text() == "global_step4" and not (out / "ticket").exists()
    # the ticket directory complete in its temporary place, the rename not yet done
    _crash(args + ["--resume"], "dir:ticket@rank0")
    assert not (out / "ticket").exists() and list(out.glob(".ticket.tmp-*"))
    # every shard of step 16 written, `latest` not yet moved: both ranks die
    _crash(args + ["--resume"], "checkpoint:global_step16")
    assert (out / "ticket" / "ticket.json").is_file() and not list(out.glob(".ticket.tmp-*"))
    assert (ckpts / "latest").read_text() == "global_step12" and (ckpts / "global_step16").is_dir()
    _crash(args + ["--resume"], "step:18@rank0")  # the coordinator SIGKILLed in the efficient stage
    assert (ckpts / "latest").read_text() == "global_step16" and not (out / "summary.json").exists()
    _crash(args + ["--resume"], "dir:final@rank0")  # while exporting the final model
    assert not (out / "final").exists() and not (out / "summary.json").exists()

    done = launch(args + ["--resume"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "ticket" / "ticket.json").read_text() == (zero2_run / "ticket" / "ticket.json").read_text()
    assert losses(out) == losses(zero2_run)  # bit-identical, every step, search and efficient stage
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == sorted(set(steps))  # metrics.jsonl reads as one run: nothing logged twice
    summary, ref = (json.loads((p / "summary.json").read_text()) for p in (out, zero2_run))
    assert summary["final_val_loss"] == ref["final_val_loss"]
    assert summary["mask_distances"] == ref["mask_distances"]  # the search's log survives its crash too
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
    """A whole fp16 run where DeepSpeed accepts fp16 on this machine (CUDA, AVX512-FP16 CPUs)."""
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():  # the check DeepSpeed's engine makes before it refuses fp16
        pytest.skip("DeepSpeed refuses fp16 on this CPU (no AVX512-FP16): "
                    "test_fp16_loss_scale_accounting covers the accounting here")
    ds = tmp_path / "fp16.json"
    ds.write_text(json.dumps({"fp16": {"enabled": True, "initial_scale_power": 40, "loss_scale_window": 1000},
                              "zero_optimization": {"stage": 1}}))
    out = tmp_path / "run"
    proc = launch(tiny_run_args(*corpus, out, **{"deepspeed": ds, "train.precision": "fp16",
                                                 "earlybert.enabled": "false", "train.steps": 12}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss_scale" in r]
    # 2^40 overflows: the first step is skipped and counted; the scale (hysteresis 2) halves from the second on
    assert train[0]["skipped_steps"] >= 1 and train[-1]["loss_scale"] < 2.0**40
    scales = [r["loss_scale"] for r in train]
    assert scales == sorted(scales, reverse=True) and train[-1]["skipped_steps"] >= train[0]["skipped_steps"]


@pytest.fixture
def fp16_anywhere(monkeypatch):
    """DeepSpeed's fp16 path on any CPU: its CPU accelerator reports fp16 unsupported without AVX512-FP16, yet
    torch computes fp16 everywhere (slowly, by conversion), so only that capability gate is lifted; the engine,
    its loss scaler and the ZeRO optimizer stay DeepSpeed's own."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)


def _fp16_run(tmp_path: Path, scale_power: int):
    from earlybert_ds.config import RunConfig

    ds = tmp_path / f"fp16_{scale_power}.json"
    ds.write_text(json.dumps({"fp16": {"enabled": True, "initial_scale_power": scale_power, "hysteresis": 1,
                                       "loss_scale_window": 1000}, "zero_optimization": {"stage": 1}}))
    run = RunConfig()
    run.deepspeed, run.train.precision, run.train.steps, run.train.warmup_steps = str(ds), "fp16", 20, 0
    return run


def _fp16_engine(tmp_path: Path, scale_power: int, start_step: int = 0):
    from earlybert_ds.engine import Engine
    from earlybert_ds.modeling import EarlyBertForPreTraining

    from conftest import tiny_config

    torch.manual_seed(0)
    return Engine(EarlyBertForPreTraining(tiny_config()), _fp16_run(tmp_path, scale_power), start_step)


def test_fp16_loss_scale_accounting(distributed, fp16_anywhere, tmp_path):
    """What the training loop reports under fp16 (``loss_scale``, ``skipped_steps``), on every machine: at 2^40
    every step overflows, is skipped (weights untouched, same loss) and halves the scale (hysteresis 1); at 2^8
    nothing overflows and the model learns."""
    batch = tiny_mlm_batch()
    engine = _fp16_engine(tmp_path, 40)
    try:
        before = engine.full_state_dict()
        rows = [engine.train_step([batch], step) for step in range(4)]
        assert [r["skipped_steps"] for r in rows] == [1, 2, 3, 4]
        assert [r["loss_scale"] for r in rows] == [2.0**39, 2.0**38, 2.0**37, 2.0**36]
        assert len({r["loss"] for r in rows}) == 1  # nothing applied: the same weights, the same loss
        after = engine.full_state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        engine.destroy()
    engine = _fp16_engine(tmp_path, 8)
    try:
        rows = [engine.train_step([batch], step) for step in range(6)]
        assert [r["skipped_steps"] for r in rows] == [0] * 6 and {r["loss_scale"] for r in rows} == {2.0**8}
        assert rows[-1]["loss"] < rows[0]["loss"] - 0.1, [r["loss"] for r in rows]
    finally:
        engine.destroy()


def test_fp16_skipped_steps_do_not_shift_the_schedule(distributed, fp16_anywhere, tmp_path):
    """DeepSpeed steps no scheduler on a step it skips for overflow; the rate comes from the run's step instead: at
    2^20 the first steps overflow and are skipped, yet every step's rate is the schedule's at that step (linear decay
    over 20 steps), in the optimizer's groups as in the readings, also in a second engine built mid-run."""
    from earlybert_ds.engine import lr_lambda

    batch = tiny_mlm_batch()
    engine = _fp16_engine(tmp_path, 20)
    run = _fp16_run(tmp_path, 20)
    schedule, peak = lr_lambda(run), run.train.lr
    try:
        for step in range(6):
            row = engine.train_step([batch], step)
            assert row["lr"] == pytest.approx(peak * schedule(step))
            assert [g["lr"] for g in engine.engine.basic_optimizer.param_groups] == [pytest.approx(row["lr"])] * 2
        skipped = int(row["skipped_steps"])
        assert 1 <= skipped < 6  # some steps were skipped, some applied: a DeepSpeed-stepped scheduler would lag
    finally:
        engine.destroy()
    second = _fp16_engine(tmp_path, 8, start_step=6)  # e.g. the efficient stage's engine, built at the ticket
    try:
        rows = [second.train_step([batch], step) for step in range(6, 20)]
        assert [r["lr"] for r in rows] == [pytest.approx(peak * schedule(s)) for s in range(6, 20)]
        assert rows[-1]["lr"] == pytest.approx(peak / 20) and schedule(20) == 0.0
    finally:
        second.destroy()


def _write_in_a_child(target: Path, kind: str, fault: bool) -> int | None:
    """The write of ``kind`` in a forked child process (which the fault hook can SIGKILL); its exit code."""
    def write() -> None:
        if fault:
            os.environ[FAULT_ENV] = f"{'write' if kind == 'file' else 'dir'}:{target.name}"
        if kind == "file":
            atomic_write_text(target, "new" * 100000)
        else:
            with atomic_directory(target) as tmp:
                (tmp / "model.safetensors").write_bytes(b"x" * 10**6)

    child = multiprocessing.get_context("fork").Process(target=write)
    child.start()
    child.join(60)
    return child.exitcode


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_atomic_writes_are_whole_or_absent(tmp_path, kind):
    """A process SIGKILLed at the worst moment of a write leaves the old content (or nothing), never a part."""
    target = tmp_path / ("summary.json" if kind == "file" else "final")
    if kind == "file":
        target.write_text("old")
    else:
        target.mkdir()
        (target / "model.safetensors").write_text("old")
    assert _write_in_a_child(target, kind, fault=True) == -signal.SIGKILL
    old = target.read_text() if kind == "file" else (target / "model.safetensors").read_text()
    assert old == "old"
    assert _write_in_a_child(target, kind, fault=False) == 0  # no fault: the write completes
    new = target.read_text() if kind == "file" else (target / "model.safetensors").read_text()
    assert new == ("new" * 100000 if kind == "file" else "x" * 10**6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


@pytest.mark.slow
def test_a_failure_on_rank0_before_the_start_reaches_every_rank(corpus, tmp_path):
    """Rank 0 alone reads the checkpoint to decide where the run starts; a corrupt one (an error of no particular
    type inside torch.load) must reach rank 1 with its message instead of leaving it waiting in the broadcast."""
    tag = tmp_path / "ckpt" / "global_step4"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x04truncated")
    t0 = time.monotonic()
    proc = launch(tiny_run_args(*corpus, tmp_path / "run") + ["--resume-from", str(tag)],
                  env={"EARLYBERT_DIST_TIMEOUT": "300"})
    assert proc.returncode != 0 and time.monotonic() - t0 < 120
    lines = (proc.stdout + proc.stderr).splitlines()
    for rank in (0, 1):
        mine = [line for line in lines if f"earlybert-ds: error: rank {rank}: " in line]
        assert any(f"{tag / 'mp_rank_00_model_states.pt'}: unreadable" in line for line in mine), (rank, lines[-30:])
    assert any("rank 0 failed:" in line for line in lines if "earlybert-ds: error: rank 1: " in line)


@pytest.mark.slow
def test_ranks_wait_for_data_slower_than_the_collective_timeout(corpus, tmp_path):
    """Local rank 0 prepares the data for 20 s (a test hook standing in for a large corpus) with collectives bounded
    at 10 s: the other rank waits, saying what for, instead of timing out and bringing the job down."""
    out = tmp_path / "run"
    proc = launch(tiny_run_args(*corpus, out, **{"earlybert.draw": "random", "train.steps": 4, "train.eval_every": 0,
                                                 "earlybert.max_search_steps": 2}),
                  env={"EARLYBERT_FAULT": "slow:node_once@rank0", "EARLYBERT_DIST_TIMEOUT": "10"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    waited = [line for line in (proc.stdout + proc.stderr).splitlines() if "[rank1] WARNING" in line]
    assert any("rank 1: waiting for local rank 0 of every node (ranks [0]) to finish tokenizer_for" in line
               for line in waited), waited
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
