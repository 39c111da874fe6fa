"""Process-group set-up around DeepSpeed's just-in-time build of its CPU communication op."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from earlybert_ds import distributed as dist


def test_ops_are_built_with_this_environments_ninja(monkeypatch, tmp_path):
    """Whatever PATH a job starts with, the op is built by the same ninja into this environment's directory (two
    ninja versions rebuilt it from scratch on every switch, a minute per rank)."""
    venv_ninja = Path(sys.executable).parent / "ninja"
    if not venv_ninja.is_file():
        pytest.skip("no ninja in this environment (pip install ninja)")
    system_bin = tmp_path / "bin"
    system_bin.mkdir()
    (system_bin / "ninja").write_text("#!/bin/sh\n")
    (system_bin / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{system_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    dist._jit_build_environment()
    assert shutil.which("ninja") == str(venv_ninja)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    path = os.environ["PATH"]
    dist._jit_build_environment()  # idempotent
    assert os.environ["PATH"] == path


def test_ops_are_built_in_the_environment_only_where_it_is_writable(monkeypatch, tmp_path):
    """A shared, read-only Python environment (a conda module, a system site) must not make every just-in-time
    build fail with PermissionError: its builds then go to torch's default directory (under ~/.cache)."""
    from torch.utils.cpp_extension import get_default_build_root

    assert dist.extensions_dir(tmp_path) == tmp_path / "torch_extensions" and (tmp_path / "torch_extensions").is_dir()
    if os.geteuid() == 0:  # root writes through any mode bits, but not into sysfs, a read-only file system here
        read_only = Path("/sys")
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
    assert dist.extensions_dir(read_only) is None
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # recorded, so that what is set below is undone after the test
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", str(read_only))
    dist._jit_build_environment()
    assert "TORCH_EXTENSIONS_DIR" not in os.environ  # torch's default, e.g. ~/.cache/torch_extensions
    assert not Path(get_default_build_root()).is_relative_to(read_only)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    dist._jit_build_environment()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_extensions")


def test_nccl_start_failure_names_nccl_not_the_hostfile(monkeypatch):
    """NCCL fails after the ranks have met (DistBackendError): the hint is NCCL's own switches, not the hostfile
    or MASTER_ADDR, which is what a failed rendezvous (DistStoreError) is told. The text is torch's and NCCL's."""
    import torch.distributed as td

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "16")
    nccl = td.DistBackendError(
        "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, unhandled system error (run "
        "with NCCL_DEBUG=INFO for details), NCCL version 2.21.5\nncclSystemError: System call (e.g. socket, malloc) "
        "or external library call failed or device error.\nLast error:\nsocketStartConnect: Connect to "
        "10.1.2.3<43012> failed : Software caused connection abort")
    msg = str(dist.start_error(nccl, 600))
    assert msg.startswith("rank 3 of 16: NCCL could not connect the GPUs: NCCL error in:")
    assert "socketStartConnect: Connect to 10.1.2.3<43012> failed" in msg  # NCCL's own last error
    for hint in ("NCCL_DEBUG=INFO", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE=1", "hostfile and MASTER_ADDR are not"):
        assert hint in msg, msg
    rendezvous = str(dist.start_error(td.DistStoreError("Timed out after 601 seconds waiting for clients. 1/16 "
                                                        "clients joined."), 600))
    assert "same hostfile, MASTER_ADDR" in rendezvous and "NCCL" not in rendezvous


def test_deterministic_mode_trains(distributed, monkeypatch):
    """--train.deterministic: torch's deterministic kernels and cuBLAS's fixed workspace, set before any work; every
    op of a training step has a deterministic kernel (else torch raises), and two runs of it agree bit for bit."""
    import torch

    from earlybert_ds.config import RunConfig
    from earlybert_ds.engine import Engine
    from earlybert_ds.hardware import use_deterministic_kernels
    from earlybert_ds.modeling import EarlyBertForPreTraining

    from conftest import tiny_config, tiny_mlm_batch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    run = RunConfig.from_dict({"train": {"deterministic": True, "precision": "fp32", "warmup_steps": 0}})
    batch = tiny_mlm_batch()
    batch["attention_mask"][0, -4:] = 0  # the padded path too
    use_deterministic_kernels()
    try:
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        losses = []
        for _ in range(2):
            torch.manual_seed(0)
            engine = Engine(EarlyBertForPreTraining(tiny_config(use_gates=True)), run)
            losses.append([engine.train_step([batch], step)["loss"] for step in range(3)])
            engine.destroy()
    finally:
        torch.use_deterministic_algorithms(False)
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0]


def _build_dir() -> Path:
    """This process's build directory of the CPU communication op (``TORCH_EXTENSIONS_DIR``'s, else the
    environment's, built by launch/setup.sh)."""
    from torch.utils.cpp_extension import _get_build_directory

    dist._jit_build_environment()
    return Path(_get_build_directory(dist.SHM_OP, verbose=False))


@pytest.fixture
def own_build_dir(tmp_path, monkeypatch) -> Path:
    """A copy of the environment's built op (times kept: nothing to rebuild) under a ``TORCH_EXTENSIONS_DIR`` of
    this test's own, for this process and its children: the tests that plant locks then never touch the lock
    that runs of other tests, started beside them (``pytest -n``), build and load under."""
    built = _build_dir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    shutil.copytree(built, tmp_path / "ext" / built.name, copy_function=shutil.copy2)
    return _build_dir()


def _build_in_a_child() -> subprocess.Popen:
    code = "from earlybert_ds.distributed import build_cpu_ops; build_cpu_ops()"
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "DS_ACCELERATOR": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_lock_left_by_a_killed_build_is_removed_at_once_whatever_its_age(own_build_dir):
    """A build killed a minute ago left torch's bare lock behind: the next job must not sleep on it (torch would,
    silently and forever) but remove it at once, naming it."""
    lock = own_build_dir / "lock"
    lock.touch()  # fresh: a minute-old or ten-minute-old lock is as stale when its builder is dead
    try:
        child = _build_in_a_child()
        try:
            _, err = child.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            pytest.fail(f"the build waited on {lock} for 2 minutes")
        assert child.returncode == 0, err
        assert f"{lock}: removed, left by a build of DeepSpeed's {dist.SHM_OP} op that was killed" in err
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


def _stderr_until(child: subprocess.Popen, needle: str, timeout: float) -> str:
    """The child's stderr up to the first line holding ``needle`` (all of it if the child ends first, or what came
    within ``timeout`` seconds)."""
    lines, found = [], threading.Event()

    def read() -> None:
        for line in child.stderr:
            lines.append(line)
            if needle in line:
                break
        found.set()

    threading.Thread(target=read, daemon=True).start()
    found.wait(timeout)
    return "".join(lines)


@pytest.mark.slow
def test_a_job_waiting_for_a_live_build_says_for_whom_and_goes_on_when_it_ends(own_build_dir):
    """While another process holds the build lock, a job waits for it, saying whom it waits for; when the holder
    ends (here: releases it) the job goes on."""
    with open(own_build_dir / dist.BUILD_FLOCK, "a+") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        guard.seek(0), guard.truncate(), guard.write("process 4242 on builder-node"), guard.flush()
        child = _build_in_a_child()
        try:  # the child imports torch and DeepSpeed, then waits, saying so
            waited = _stderr_until(child, "waiting for", timeout=120)
            assert child.poll() is None, waited
        except BaseException:
            child.kill()
            raise
        fcntl.flock(guard, fcntl.LOCK_UN)
        _, err = child.communicate(timeout=120)
    assert child.returncode == 0, waited + err
    assert (f"waiting for process 4242 on builder-node, which is building DeepSpeed's {dist.SHM_OP} op in "
            f"{own_build_dir}") in waited
