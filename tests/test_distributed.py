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


def _build_dir() -> Path:
    """This environment's build directory of the CPU communication op (built by launch/setup.sh)."""
    from torch.utils.cpp_extension import _get_build_directory

    dist._jit_build_environment()
    return Path(_get_build_directory(dist.SHM_OP, verbose=False))


def _build_in_a_child() -> subprocess.Popen:
    code = "from earlybert_ds.distributed import build_cpu_ops; build_cpu_ops()"
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "DS_ACCELERATOR": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_lock_left_by_a_killed_build_is_removed_at_once_whatever_its_age():
    """A build killed a minute ago left torch's bare lock behind: the next job must not sleep on it (torch would,
    silently and forever) but remove it at once, naming it."""
    lock = _build_dir() / "lock"
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
def test_a_job_waiting_for_a_live_build_says_for_whom_and_goes_on_when_it_ends():
    """While another process holds the build lock, a job waits for it, saying whom it waits for; when the holder
    ends (here: releases it) the job goes on."""
    with open(_build_dir() / dist.BUILD_FLOCK, "a+") as guard:
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
            f"{_build_dir()}") in waited
