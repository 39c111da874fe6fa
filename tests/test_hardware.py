"""The machine facts that decide ``auto`` precision and the peak behind MFU, on the three CPU kinds this project
runs on (flags as ``/proc/cpuinfo`` lists them there) and on this machine."""

from __future__ import annotations

import math

import pytest
import torch

from earlybert_ds.config import RunConfig
from earlybert_ds.dsconfig import plan_ds
from earlybert_ds.hardware import Machine, auto_precision, device_summary, peak_flops, this_machine

_COMMON = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2"
KINDS = {  # lscpu model name -> flags of the CPU kinds the tests run on
    "AMD EPYC (AVX2 only)": _COMMON,
    "AMD EPYC Zen 4 (AVX512-BF16, no AMX)": _COMMON + " avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16",
    "Intel Xeon Sapphire Rapids (AMX)": _COMMON + " avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 "
                                                  "amx_tile amx_int8",
}


@pytest.mark.parametrize("kind,want", [("AMD EPYC (AVX2 only)", "fp32"),
                                       ("AMD EPYC Zen 4 (AVX512-BF16, no AMX)", "bf16"),
                                       ("Intel Xeon Sapphire Rapids (AMX)", "bf16")])
def test_auto_precision_follows_the_cpus_bf16_units(kind, want):
    precision, why = auto_precision(Machine("cpu", frozenset(KINDS[kind].split())))
    assert precision == want
    assert ("no bf16 matrix units" in why) if want == "fp32" else ("avx512_bf16" in why)
    if "amx_bf16" in KINDS[kind]:
        assert "amx_bf16" in why


@pytest.mark.parametrize("capability,stage,want", [
    ((9, 0), 0, "bf16"), ((8, 0), 3, "bf16"), ((8, 6), 0, "bf16"),  # H100, A100, A10/RTX 30xx: bf16 tensor cores
    ((7, 0), 2, "fp16"), ((7, 5), 1, "fp16"),  # V100, T4 under ZeRO >= 1: fp16 with a dynamic loss scale
    ((7, 0), 0, "fp32"), ((6, 0), 0, "fp32"),  # ... at ZeRO-0 DeepSpeed applies no loss scale: fp32
])
def test_auto_precision_on_cuda_follows_the_compute_capability(capability, stage, want):
    """bf16 only with bf16 tensor cores (compute capability >= 8.0), whatever the CPU; the reason names the
    capability, and at ZeRO-0 on an older GPU how to get fp16."""
    machine = Machine("cuda", frozenset(KINDS["AMD EPYC (AVX2 only)"].split()), capability)
    precision, why = auto_precision(machine, stage)
    assert precision == want and "compute capability %d.%d" % capability in why
    if want == "fp32":
        assert "--train.zero_stage 1" in why


def test_the_run_trains_in_the_precision_auto_chose_and_says_why():
    """cpu.json leaves precision "auto": the DeepSpeed config and the log line agree with the decision."""
    want, why = auto_precision(this_machine())
    plan = plan_ds(RunConfig(), 1, this_machine())
    assert (plan.config["bf16"]["enabled"], plan.config["fp16"]["enabled"]) == (want == "bf16", False)
    assert plan.describe_precision() == f"precision {want} (auto: {why})"
    v100 = plan_ds(RunConfig(), 1, Machine("cuda", capability=(7, 0), torch_cuda=(12, 8)))  # cpu.json: ZeRO-0
    assert v100.precision == "fp32" and not v100.config["bf16"]["enabled"] and "7.0 < 8.0" in v100.precision_why
    run = RunConfig()
    run.train.zero_stage = 2
    assert plan_ds(run, 1, Machine("cuda", capability=(7, 5), torch_cuda=(12, 8))).config["fp16"]["enabled"]
    run.train.precision = "fp32"  # an explicit choice wins, and the log says whose it was
    assert plan_ds(run, 1, this_machine()).precision_why == "train.precision"


def test_peak_is_measured_on_this_machine():
    summary = device_summary()
    assert summary["cpu"] and isinstance(summary["cpu_flags"], list)
    torch.set_num_threads(1)
    fp32 = peak_flops("fp32", seconds=0.2)
    assert math.isfinite(fp32) and 1e9 < fp32 < 1e13  # 1 GFLOP/s to 10 TFLOP/s on one core


def test_a_matmul_that_outlasts_the_budget_is_measured_once(monkeypatch):
    """Where one peak-shaped matmul takes seconds (bf16 emulated on AVX2-only CPUs), that one call is the peak: the
    start of a run does not spend four of them."""
    from earlybert_ds import hardware

    calls, clock = [], iter(range(0, 1000, 5))  # every timed call lasts 5 s on this clock
    matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(1) or matmul(a, b))
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: float(next(clock)))
    m, k, n = hardware.PEAK_SHAPES["cpu"]
    assert peak_flops("fp32", seconds=0.5) == pytest.approx(2 * m * k * n / 5) and len(calls) == 1
