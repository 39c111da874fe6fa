"""What the machine can do: which precision pays on it, and its measured matmul peak (for MFU).

The project's machines come in kinds whose bf16 speed differs by 700x: an AVX2-only CPU emulates bf16 matmuls
(~100x slower than fp32), AVX512-BF16 runs them ~2.7x faster than fp32, AMX-BF16 ~7x faster. So ``auto`` precision
is decided from the CPU's flags, not assumed, and utilisation is reported against a peak measured on this machine
with the same dtype and threads as the run, not against a datasheet.
"""

from __future__ import annotations

import platform
import time
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


def auto_precision(on_cuda: bool, cpu_flags: frozenset[str] | set[str] | None = None) -> tuple[str, str]:
    """The precision ``auto`` resolves to, and why: bf16 on CUDA and on CPUs with bf16 matrix units, else fp32.
    ``cpu_flags``: this machine's unless given."""
    if on_cuda:
        return "bf16", "CUDA device"
    cpu_flags = cpu_info()["flags"] if cpu_flags is None else cpu_flags
    units = [f for f in BF16_FLAGS if f in cpu_flags]
    if units:
        return "bf16", f"CPU has bf16 matrix units ({', '.join(units)})"
    return "fp32", "CPU has no bf16 matrix units (no amx_bf16/avx512_bf16): bf16 would be emulated, ~100x slower"


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
