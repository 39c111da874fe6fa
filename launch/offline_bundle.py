"""Download everything earlybert_ds needs except torch into one folder of wheels, for a machine without internet.

    python3 launch/offline_bundle.py DIR [--python-version 3.11] [--platform manylinux_2_28_x86_64] [--extras plots]

Run it where the package registry is reachable, for the target's Python version and platform (default: this
machine's); copy DIR to the target and there run ``launch/setup.sh --offline DIR``, which installs from DIR alone
into a venv that keeps the target's own CUDA torch. torch is never in the bundle: the target's is the one built for
its driver. DeepSpeed is published as source only; its wheel is built here, without compiled ops (pure Python: any
platform), as ``pip install deepspeed`` would build it. This project's own dependencies are read from
pyproject.toml (with the extras asked for), and its build backend (``build-system``) comes too, for the editable
install of this checkout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.tags import sys_tags
except ModuleNotFoundError:  # a bare python3: pip's own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import sys_tags

REPO = Path(__file__).resolve().parent.parent
NOT_BUNDLED = {"torch"}  # the target's own
NOT_DOWNLOADED = NOT_BUNDLED | {"deepspeed", "earlybert-ds"}  # built here, or this checkout; their dependencies come


def target_environment(python_version: str, platform: str) -> dict[str, str]:
    """The marker environment of the target (PEP 508), for the requirements that depend on it."""
    machine = next((m for m in ("x86_64", "aarch64", "ppc64le", "s390x") if platform.endswith(m)), "")
    return {**default_environment(), "python_version": python_version, "python_full_version": f"{python_version}.0",
            "platform_machine": machine or default_environment()["platform_machine"],
            **({"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
               if platform.startswith(("manylinux", "musllinux", "linux")) else {})}


def requirements(declared: list[str], extras: set[str], env: dict[str, str]) -> list[str]:
    """Of the ``declared`` dependencies, those that apply on the target (with ``extras``), but torch, DeepSpeed and
    this project, which are not downloaded."""
    out = []
    for line in declared:
        req = Requirement(line)
        wanted = req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""})
        if wanted and req.name.lower().replace("_", "-") not in NOT_DOWNLOADED:
            out.append(str(Requirement(f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}"
                                       f"{req.specifier}")))
    return out


def wheel_requirements(wheel: Path) -> list[str]:
    """The dependencies a wheel declares (its METADATA's Requires-Dist)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []


def platform_tags(platform: str) -> list[str]:
    """The wheel platforms a target of ``platform`` installs: a manylinux_2_N target also takes every older glibc's
    (and their legacy names, manylinux2014 and before), which ``pip download --platform`` does not infer."""
    glibc, _, arch = platform.removeprefix("manylinux_2_").partition("_")
    if not platform.startswith("manylinux_2_") or not glibc.isdigit():
        return [platform]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return [t for m in range(int(glibc), 4, -1)
            for t in (f"manylinux_2_{m}_{arch}", *([f"{legacy[m]}_{arch}"] if m in legacy else []))]


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def bundle(out: Path, python_version: str, platform: str, extras: set[str]) -> list[Path]:
    """Fill ``out`` with the wheels; returns them."""
    out.mkdir(parents=True, exist_ok=True)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    deepspeed = next(d for d in project["dependencies"] if Requirement(d).name == "deepspeed")
    pip("wheel", "--no-deps", "--wheel-dir", str(out), deepspeed)
    declared = project["dependencies"] + wheel_requirements(next(out.glob("deepspeed-*.whl")))
    declared += [r for e, reqs in project.get("optional-dependencies", {}).items() if e in extras for r in reqs]
    wanted = requirements(declared, extras, target_environment(python_version, platform))
    wanted += pyproject["build-system"]["requires"]  # for the editable install of this checkout
    (out / "requirements.txt").write_text("\n".join(wanted) + "\n")
    pip("download", "--dest", str(out), "--only-binary=:all:", "--python-version", python_version,
        *[a for tag in platform_tags(platform) for a in ("--platform", tag)], "--implementation", "cp",
        "-r", str(out / "requirements.txt"))
    wheels = sorted(out.glob("*.whl"))
    bundled_torch = [w.name for w in wheels if w.name.split("-")[0].lower() in NOT_BUNDLED]
    if bundled_torch:
        raise SystemExit(f"offline_bundle: error: {', '.join(bundled_torch)} came in as a dependency; the bundle "
                         "must not carry torch (the target's own is kept)")
    return wheels


def main(argv: list[str] | None = None) -> int:
    here = next(iter(sys_tags()))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="where the wheels go (keep it outside the repository, or in wheels/)")
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the target's Python, e.g. 3.10 (default: this one's)")
    p.add_argument("--platform", default=here.platform,
                   help=f"the target's platform tag, e.g. manylinux_2_28_x86_64 (default: this one's, {here.platform})")
    p.add_argument("--extras", default="", help="optional parts to include too, e.g. plots (matplotlib)")
    args = p.parse_args(argv)
    wheels = bundle(args.dir.resolve(), args.python_version, args.platform, set(filter(None, args.extras.split(","))))
    size = sum(w.stat().st_size for w in wheels)
    print(f"offline_bundle: {len(wheels)} wheels, {size / 2**20:.0f} MiB in {args.dir} (Python {args.python_version}, "
          f"{args.platform}); on the target: launch/setup.sh --offline {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
