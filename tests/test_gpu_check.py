"""launch/gpu_check.sh, the check to run the day a GPU is at hand, and launch/preflight.py, its first step: the check
must refuse a machine without CUDA at once, its every step must work (here on CPU with a tiny model,
``--allow-cpu``) so that GPU minutes are not spent on a broken script, it must survive a rerun into the same folders
and report a step killed at its time limit; the preflight must name what a Python environment lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
    assert "launch/preflight.py" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_runs").exists()  # nothing written


def _check(out: Path, *args: str, corpus: Path) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--allow-cpu", "--out", str(out), "--corpus", str(corpus),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_every_step_runs_and_reports_and_a_rerun_into_the_same_folders_too(corpus, tmp_path):
    """Run 1: every step passes (fp16 is skipped on CPU), the figures are sane and ``--out`` holds only the two
    reports. Run 2, at once into the same folders: its steps clear their own runs and run again; the pipeline, cut
    at a 3-second limit, is reported as timed out (its whole process group killed). Run 3 (``--resume``) keeps
    what passed without running it again."""
    out = tmp_path / "out"
    proc, report = _check(out, corpus=corpus[0])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = report["steps"]
    assert report["ok"] and {k: v["status"] for k, v in steps.items()} == {
        "preflight": "passed", "pipeline_zero2_bf16": "passed", "pipeline_zero2_fp16": "skipped",
        "throughput": "passed"}
    for step, verdict in (("preflight", "passed"), ("pipeline_zero2_bf16", "passed"), ("throughput", "passed")):
        assert f"gpu_check: {step}: {verdict} (" in proc.stdout
    assert steps["preflight"]["ok"] and steps["preflight"]["torch"] == torch.__version__
    run = steps["pipeline_zero2_bf16"]
    assert all(run["checks"].values()) and run["loss_last"] < run["loss_first"] and 0 < run["flop_ratio"] < 1
    assert 0 < run["stages"]["efficient"]["mfu"] < 1
    tiny = steps["throughput"]["shapes"]["tiny"]["summary"]
    assert set(tiny["mfu"]) == set("abe") and all(0 < m < 1 for m in tiny["mfu"].values())
    assert "MFU" in proc.stdout  # the figures' table
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "throughput.json"]
    assert (tmp_path / "out_runs" / "pipeline_zero2_bf16" / "run" / "summary.json").is_file()

    proc, report = _check(out, "--steps", "preflight,pipeline_zero2_bf16", "--timeout", "pipeline_zero2_bf16=3",
                          corpus=corpus[0])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    cut = report["steps"]["pipeline_zero2_bf16"]
    assert cut["status"] == "timed out" and cut["seconds"] < 30 and "limit of 3 s" in cut["note"]
    assert "gpu_check: pipeline_zero2_bf16: TIMED OUT" in proc.stdout and not report["ok"]
    assert report["steps"]["preflight"]["status"] == "passed" and "throughput" not in report["steps"]
    assert not (tmp_path / "out_runs" / "pipeline_zero2_bf16" / "run" / "summary.json").exists()  # cleared first

    proc, report = _check(out, "--resume", "--steps", "preflight", corpus=corpus[0])
    assert proc.returncode == 0 and "gpu_check: preflight: passed" in proc.stdout
    assert "--resume" in report["steps"]["preflight"]["note"]
    assert "pipeline_zero2_bf16" not in report["steps"]  # timed out before, not asked for now


def _venv_without(root: Path, missing: tuple[str, ...]) -> Path:
    """A real virtual environment with every package of this one but ``missing`` (their import packages and
    distribution records left out): a machine with a partial install. Packages are linked, not copied."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    ours = Path(torch.__file__).parent.parent
    theirs = root / ours.relative_to(sys.prefix)
    for entry in ours.iterdir():
        if entry.name.split("-")[0].split(".")[0] not in missing:
            (theirs / entry.name).symlink_to(entry)
    return root / "bin" / "python"


@pytest.mark.slow
def test_preflight_names_what_a_python_environment_lacks(tmp_path):
    """In an environment without datasets, pyarrow and matplotlib the preflight exits 2 naming the two that corpus
    preparation needs, reports the optional one as such, and still says what the machine offers; the package itself
    imports there, and loads and runs a model: only the paths that need those modules import them."""
    python = _venv_without(tmp_path / "venv", ("datasets", "pyarrow", "matplotlib", "mpl_toolkits", "pylab"))
    probe = subprocess.run([str(python), "-c", "import datasets"], capture_output=True, text=True)
    assert "No module named 'datasets'" in probe.stderr  # really absent there
    proc = subprocess.run([str(python), "launch/preflight.py", "--json", str(tmp_path / "report.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(report["missing"]) == ["datasets", "pyarrow"] and not report["ok"]
    assert "corpus preparation" in report["missing"]["datasets"] and list(report["optional_missing"]) == ["matplotlib"]
    assert report["torch"] == torch.__version__ and report["deepspeed"] and report["executable"] == str(python)
    assert "MISSING: datasets (corpus preparation" in proc.stdout
    assert "preflight: FAILED: datasets, pyarrow cannot be imported by" in proc.stdout

    code = ("import earlybert_ds.pretrain, earlybert_ds.finetune, earlybert_ds.bench.throughput, torch\n"
            "from earlybert_ds import EarlyBertConfig, EarlyBertForPreTraining\n"
            "m = EarlyBertForPreTraining(EarlyBertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,"
            " num_attention_heads=2, intermediate_size=32))\n"
            "m.save_pretrained('model'); m = EarlyBertForPreTraining.from_pretrained('model')\n"
            "print(m(input_ids=torch.randint(5, 50, (2, 8))).logits.shape)")
    proc = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0 and "torch.Size([2, 8, 50])" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_pretrain_sh_refuses_gpus_that_its_torch_cannot_use(tmp_path):
    """A GPU node whose torch is CPU-only would quietly start 2 CPU ranks: launch/pretrain.sh stops, naming the
    torch. (This machine has no NVIDIA driver: an `nvidia-smi` that lists one GPU, as the driver's tool prints it,
    stands in for it.) With DS_ACCELERATOR=cpu it goes on, on the CPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-5c2f1b44)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "NPROC": "1"}
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run(["bash", "launch/pretrain.sh", "--output-dir", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "out").exists(), proc.stderr[-2000:]
    assert f"nvidia-smi lists 1 GPU(s), but torch {torch.__version__}" in proc.stderr
    assert "DS_ACCELERATOR=cpu" in proc.stderr
    proc = subprocess.run(["bash", "launch/pretrain.sh", "--help"], cwd=REPO, env={**env, "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--train.deterministic" in proc.stdout, proc.stderr[-2000:]
