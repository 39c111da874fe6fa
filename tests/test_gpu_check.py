"""launch/gpu_check.sh, the check to run the day a GPU is at hand: it must refuse a machine without CUDA at once,
and its every step must work (here on CPU with a tiny model, ``--allow-cpu``) so that GPU minutes are not spent
on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_stops_at_once_naming_what_is_missing(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--out", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.monotonic() - t0 < 60
    assert "gpu_check: error: no CUDA GPU: torch.cuda.is_available() is False" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow
def test_every_step_runs_and_reports(corpus, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--allow-cpu", "--out", str(out), "--corpus",
                           str(corpus[0])], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    run = report["pipelines"]["zero2_bf16"]
    assert report["ok"] and run["ok"] and all(run["checks"].values()), run
    assert run["loss_last"] < run["loss_first"] and 0 < run["flop_ratio"] < 1
    assert 0 < run["stages"]["efficient"]["mfu"] < 1
    tiny = report["throughput"]["shapes"]["tiny"]["summary"]
    assert set(tiny["mfu"]) == set("abe") and all(0 < m < 1 for m in tiny["mfu"].values())
    assert "MFU" in report["throughput"]["table"]
