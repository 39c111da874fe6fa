"""Process-group set-up around DeepSpeed's just-in-time build of its CPU communication op."""

from __future__ import annotations

import os
import shutil
import sys
import time
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


def test_a_stale_build_lock_fails_with_its_path_instead_of_hanging(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / dist.SHM_OP / "lock"
    lock.parent.mkdir()
    lock.touch()
    dist._check_build_lock(dist.SHM_OP)  # a build in progress: wait for it as torch does
    old = time.time() - dist.STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(dist.BuildLockError, match=f"{lock} is 11 minutes old: a build of DeepSpeed's "
                                                  f"{dist.SHM_OP} op was killed"):
        dist.build_cpu_ops()
