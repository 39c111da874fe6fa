"""What the machine can do: which precision pays on it, what it offers DeepSpeed's compiled ops, and its measured
matmul peak (for MFU).

The project's machines come in kinds whose bf16 speed differs by 700x: an AVX2-only CPU emulates bf16 matmuls
(~100x slower than fp32), AVX512-BF16 runs them ~2.7x faster than fp32, AMX-BF16 ~7x faster; GPUs before compute
capability 8.0 (V100, T4) have no bf16 tensor cores either. So ``auto`` precision is decided from the device's
capabilities (:class:`Machine`), not assumed, and utilisation is reported against a peak measured on this machine
with the same dtype and threads as the run, not against a datasheet.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from . import distributed as dist

#: CPU flags (``/proc/cpuinfo``) of bf16 matrix units: Intel AMX tiles, or AVX512-BF16 dot products (AMD Zen 4+,
#: Intel Cooper Lake+). oneDNN runs bf16 matmuls natively on either; without them it emulates them.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: Flags worth recording beside a measurement: they decide which kernels run.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")

#: The shape of the peak measurement per device type: on CPU BERT-base's FFN matmul at 1024 tokens (large enough
#: to reach the kernel's rate, well under a second); on a GPU one large enough to fill it (8192^3).
PEAK_SHAPES = {"cpu": (1024, 768, 3072), "cuda": (8192, 8192, 8192)}


@cache
def cpu_info() -> dict[str, object]:
    """The CPU's model name and flags (from ``/proc/cpuinfo``; empty flags where there is none)."""
    model, flags = "", frozenset()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = frozenset(value.split())
        if model and flags:  # the first CPU's lines say it all
            break
    return {"model": model or platform.processor(), "flags": flags}


def device_summary() -> dict[str, object]:
    """The device facts a benchmark records beside its figures: CPU model and its precision-relevant flags, or
    the GPU's name."""
    info = cpu_info()
    return {"cpu": info["model"], "cpu_flags": [f for f in REPORTED_FLAGS if f in info["flags"]],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


@dataclass(frozen=True)
class Machine:
    """What this machine offers a run. ``auto`` precision and the optimizer implementation are functions of it
    (:func:`auto_precision`, ``optim.choose_optimizer``), so that every kind of machine can be tested on any."""

    device: str = "cpu"  # DeepSpeed's accelerator: "cuda" or "cpu"
    cpu_flags: frozenset[str] = frozenset()
    capability: tuple[int, int] | None = None  # the GPU's CUDA compute capability
    torch_cuda: tuple[int, int] | None = None  # the CUDA release torch was built for
    nvcc: tuple[int, int] | None = None  # the CUDA release of $CUDA_HOME/bin/nvcc; None: no compiler
    prebuilt_ops: frozenset[str] = frozenset()  # DeepSpeed ops compiled into the installed wheel, for this device

    @property
    def on_cuda(self) -> bool:
        return self.device == "cuda"


@cache
def this_machine() -> Machine:
    """This machine as DeepSpeed sees it (``DS_ACCELERATOR`` decides the device)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    device = get_accelerator().device_name()
    # an op counts as prebuilt only for the accelerator the wheel was built for (op_builder/builder.py, load())
    prebuilt = frozenset(op for op, built in installed_ops.items() if built) \
        if accelerator_name == get_accelerator()._name else frozenset()
    capability = nvcc = torch_cuda = None
    if device == "cuda":
        from deepspeed.ops.op_builder.builder import installed_cuda_version

        capability = tuple(torch.cuda.get_device_capability())
        torch_cuda = tuple(int(x) for x in torch.version.cuda.split(".")[:2]) if torch.version.cuda else None
        try:
            nvcc = installed_cuda_version()  # runs $CUDA_HOME/bin/nvcc -V
        except Exception:  # noqa: BLE001 - DeepSpeed raises its own types for "no CUDA_HOME" and "no nvcc there"
            nvcc = None
    return Machine(device, cpu_info()["flags"], capability, torch_cuda, nvcc, prebuilt)


def auto_precision(machine: Machine, zero_stage: int = 0) -> tuple[str, str]:
    """The precision ``auto`` resolves to, and why: bf16 where the device has bf16 matrix units (CUDA compute
    capability 8.0 and later; CPUs with AMX-BF16 or AVX512-BF16); on older GPUs fp16 with a dynamic loss scale,
    which DeepSpeed applies only under ZeRO >= 1 (fp32 at ZeRO-0); fp32 on other CPUs."""
    if machine.on_cuda:
        cc = "%d.%d" % machine.capability
        if machine.capability >= (8, 0):
            return "bf16", f"CUDA GPU of compute capability {cc} (bf16 tensor cores)"
        older = f"CUDA GPU of compute capability {cc} < 8.0 has no bf16 tensor cores (bf16 would be emulated)"
        if zero_stage >= 1:
            return "fp16", f"{older}: fp16 with a dynamic loss scale"
        return "fp32", (f"{older}, and fp16 needs ZeRO >= 1 (DeepSpeed applies no loss scale at ZeRO-0): fp32; "
                        "--train.zero_stage 1 trains in fp16")
    units = [f for f in BF16_FLAGS if f in machine.cpu_flags]
    if units:
        return "bf16", f"CPU has bf16 matrix units ({', '.join(units)})"
    return "fp32", "CPU has no bf16 matrix units (no amx_bf16/avx512_bf16): bf16 would be emulated, ~100x slower"


def use_deterministic_kernels() -> None:
    """torch's deterministic kernels from here on (an op that has none raises an error naming it), with the fixed
    cuBLAS workspace that deterministic cuBLAS needs; set before the first CUDA matmul. CPU training is
    deterministic without it; on CUDA, cuBLAS and the attention backward are not."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_flops(precision: str, device: torch.device | str = "cpu", seconds: float = 0.5, clock: str = "wall") -> float:
    """This machine's matmul rate in FLOP/s for ``precision`` on ``device``, with the current torch threads: the
    best of repeated ``PEAK_SHAPE`` matmuls over about ``seconds`` (the denominator of MFU). ``clock="cpu"`` times
    by the process's CPU time, for single-threaded benchmarks on a shared machine."""
    device = torch.device(device)
    m, k, n = PEAK_SHAPES[device.type]
    dtype = DTYPES[precision]
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=g).to(dtype)
    b = torch.randn(k, n, device=device, generator=g).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reps = 20 if device.type == "cuda" else 1  # a GPU matmul is too short to time alone
    timer = time.process_time if clock == "cpu" else time.perf_counter
    best, spent = float("inf"), 0.0
    for i in range(1000):
        sync()
        t0 = timer()
        for _ in range(reps):
            a @ b
        sync()
        dt = (timer() - t0) / reps
        # one call that outlasts the budget is the measurement, its set-up cost noise (bf16 emulated on AVX2-only
        # CPUs: seconds per call, where four calls took half a minute of every bf16 run's start)
        long = dt * reps >= seconds
        if i or long:  # a short first call pays for kernel selection and allocation
            best = min(best, dt)
        spent += dt * reps
        if long or (spent >= seconds and i >= 3):
            break
    return 2 * m * k * n / best


def job_peak_flops(ds_config: dict) -> float:
    """The job's matmul peak in its precision: every rank measures its own device at once (as they train: side by
    side, each with its threads), summed over ranks."""
    precision = next((k for k in ("bf16", "fp16") if ds_config[k]["enabled"]), "fp32")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.on_cuda() else torch.device("cpu")
    dist.barrier()
    return dist.all_reduce_sum([peak_flops(precision, device)], device)[0]
