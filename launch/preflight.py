"""Preflight: can this Python run earlybert_ds here? Imports everything a run needs and says what the machine offers:
Python, torch and the CUDA release it was built for, each GPU's name, compute capability and memory, whether
``nvcc`` (DeepSpeed's just-in-time ops) and ``ninja`` exist, DeepSpeed's version and its prebuilt ops.

    python3 launch/preflight.py [--json FILE]

Exit 0 when everything imports, 2 naming each module that is missing or broken (a machine with only its own CUDA
torch lacks the rest: see docs/gpu.md, "Offline install"). Needs nothing but the standard library to start.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: what every run imports, and for what
REQUIRED = {
    "torch": "tensors and the model", "deepspeed": "the engine (ZeRO, mixed precision)",
    "transformers": "the model classes and tokenizers", "tokenizers": "WordPiece", "safetensors": "model files",
    "numpy": "data and tickets", "yaml": "run-config files (PyYAML)", "datasets": "corpus preparation",
    "pyarrow": "corpus preparation", "wandb": "logging (log.wandb; 'disabled' runs without)",
}
#: what only some paths import
OPTIONAL = {"matplotlib": "the search's plots (skipped without it) and the benchmarks' figures",
            "scipy": "the benchmarks' intervals"}
#: the project's entry points: importing them catches whatever the lists above miss
ENTRY_POINTS = ("earlybert_ds.pretrain", "earlybert_ds.finetune", "earlybert_ds.bench.throughput")


def _import(name: str) -> str | None:
    """None when ``name`` imports, else why not (a missing module, or one that fails as it loads)."""
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure to import is what this reports
        return f"{type(e).__name__}: {e}"
    return None


def _nvcc() -> dict:
    """Where nvcc is (torch's CUDA_HOME, as DeepSpeed looks for it) and its release line."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or "", "bin", "nvcc")
    if not CUDA_HOME or not nvcc.is_file():
        return {"path": None, "release": None}
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    return {"path": str(nvcc), "release": next((line.strip() for line in out.splitlines() if "release" in line), None)}


def facts() -> dict:
    """What this machine offers a run (only what imports here is asked)."""
    report: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
    if _import("torch") is None:
        import torch

        gpus = [{"name": torch.cuda.get_device_name(i), "capability": "%d.%d" % torch.cuda.get_device_capability(i),
                 "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        report.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=bool(gpus), gpus=gpus,
                      nvcc=_nvcc())
    here = Path(sys.executable).parent / "ninja"  # the environment's own (pip's ninja), else the PATH's
    report["ninja"] = str(here) if here.is_file() else shutil.which("ninja")
    if _import("deepspeed") is None and "torch" in report:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import accelerator_name, installed_ops

        report.update(deepspeed=deepspeed.__version__, accelerator=get_accelerator().device_name(),
                      prebuilt_ops=sorted(op for op, built in installed_ops.items() if built)
                      if accelerator_name == get_accelerator()._name else [])
    return report


def preflight() -> dict:
    """The machine's facts and every missing module; ``ok`` when nothing required is missing."""
    sys.path.insert(0, str(REPO))  # this repository's earlybert_ds, installed or not
    missing = {m: err for m in REQUIRED if (err := _import(m))}
    absent = {m: err for m in OPTIONAL if (err := _import(m))}
    broken = {m: err for m in ENTRY_POINTS if not missing and (err := _import(m))}
    return {**facts(), "missing": {m: f"{REQUIRED[m]}: {err}" for m, err in missing.items()} | broken,
            "optional_missing": {m: f"{OPTIONAL[m]}: {err}" for m, err in absent.items()},
            "ok": not missing and not broken}


def _lines(report: dict) -> list[str]:
    out = [f"python {report['python']} ({report['executable']})"]
    if "torch" in report:
        out.append(f"torch {report['torch']}, built for CUDA {report['torch_cuda'] or 'none (CPU build)'}")
        out += [f"GPU {i}: {g['name']}, compute capability {g['capability']}, {g['memory_gib']} GiB"
                for i, g in enumerate(report["gpus"])] or ["GPU: none visible to torch"]
        nvcc = report["nvcc"]
        out.append(f"nvcc: {nvcc['path']} ({nvcc['release']})" if nvcc["path"] else
                   "nvcc: none (DeepSpeed's just-in-time ops cannot be built; none is needed by default)")
    out.append(f"ninja: {report['ninja'] or 'none'}")
    if "deepspeed" in report:
        out.append(f"deepspeed {report['deepspeed']} on {report['accelerator']}, prebuilt ops: "
                   f"{', '.join(report['prebuilt_ops']) or 'none'}")
    out += [f"optional, missing: {m} ({why})" for m, why in report["optional_missing"].items()]
    out += [f"MISSING: {m} ({why})" for m, why in report["missing"].items()]
    out.append("preflight: ok" if report["ok"] else
               f"preflight: FAILED: {', '.join(report['missing'])} cannot be imported by {report['executable']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = preflight()
    print("\n".join(_lines(report)), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
