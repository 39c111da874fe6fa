"""The offline install: launch/offline_bundle.py (what it downloads for a named target) and launch/setup.sh
--offline (what it refuses). The whole path, bundle to runs with the network cut, is too slow and needs the
registry: docs/gpu.md records it, measured."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO

spec = importlib.util.spec_from_file_location("offline_bundle", REPO / "launch" / "offline_bundle.py")
offline_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(offline_bundle)


def test_a_manylinux_target_takes_every_older_glibcs_wheels():
    tags = offline_bundle.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-1] == "manylinux1_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    assert offline_bundle.platform_tags("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


def test_the_requirements_are_the_targets_and_never_torch(tmp_path):
    """A wheel's declared dependencies, as the target's Python and platform select them, with the extras asked for;
    torch (the target's own) and the wheels built here (DeepSpeed, this project) are left out."""
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo-1.0.dist-info/METADATA", "\n".join([
            "Metadata-Version: 2.1", "Name: demo", "Version: 1.0", "Requires-Dist: torch>=2.1",
            "Requires-Dist: deepspeed<0.20,>=0.19.8", "Requires-Dist: numpy>=1.24",
            "Requires-Dist: tomli; python_version < '3.11'", "Requires-Dist: pywin32; sys_platform == 'win32'",
            "Requires-Dist: matplotlib>=3.7; extra == 'plots'", "Requires-Dist: pytest; extra == 'test'", ""]))
    declared = offline_bundle.wheel_requirements(wheel)
    assert len(declared) == 7
    py310 = offline_bundle.target_environment("3.10", "manylinux_2_28_x86_64")
    assert offline_bundle.requirements(declared, {"plots"}, py310) == ["numpy>=1.24", "tomli", "matplotlib>=3.7"]
    py312 = offline_bundle.target_environment("3.12", "manylinux_2_28_aarch64")
    assert py312["platform_machine"] == "aarch64"
    assert offline_bundle.requirements(declared, set(), py312) == ["numpy>=1.24"]


def test_offline_setup_refuses_a_python_without_torch(tmp_path):
    """It keeps the machine's torch and installs none: a Python without one is refused before anything is made."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "bare" / "bin" / "python")}
    proc = subprocess.run(["bash", "launch/setup.sh", "--offline", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot import torch: the offline set-up keeps this machine's own torch" in \
        proc.stderr, proc.stderr
    proc = subprocess.run(["bash", "launch/setup.sh", "--offline", str(tmp_path / "nowhere")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such folder of wheels" in proc.stderr
