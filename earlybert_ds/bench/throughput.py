"""The throughput suite: tokens/s, MFU and peak memory of one training step of five variants of a model (full,
full with the search's gates, shrunk to an uneven ticket, transformers' BERT, shrunk with FFN widths aligned),
each measured in a fresh process (``python -m earlybert_ds.bench _worker SPEC``), the variants interleaved."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM

from .. import distributed as dist
from ..config import RunConfig
from ..engine import Engine
from ..flops import forward_flops_per_token, train_flops_per_token
from ..hardware import PEAK_SHAPES, auto_precision, peak_flops, this_machine
from ..modeling import EarlyBertForPreTraining, PreTrainingOutput, mlm_positions
from ..shrink import shrink, shrunk_config
from ..ticket import PruneSpec, Scores, Ticket, draw_masks
from .common import SHAPES, Shape, _child_env, _machine, _run_args

VARIANTS = {
    "a": "full",
    "b": "full + gates (search, L1 on)",
    "c": "shrunk to the ticket",
    "d": "transformers BertForMaskedLM",
    "e": "shrunk, FFN widths rounded up to x64",
}
SHRUNK = {"c": 1, "e": 64}  # shrunk variants -> their ticket's ffn_multiple (--earlybert.ffn_multiple)


def uneven_ticket(shape: Shape, ffn_multiple: int = 1, seed: int = 0) -> Ticket:
    """A ticket at the paper's ratios (1/3 of the heads per layer, 40% of the FFN neurons globally) drawn from
    synthetic gate magnitudes whose scale differs per layer, as after a real search: global FFN pruning then leaves
    every layer its own, generally odd, width, which an even ticket would hide. ``ffn_multiple`` is
    ``--earlybert.ffn_multiple``."""
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0.0, 0.4, shape.layers)
    gates = Scores([s * np.abs(rng.standard_normal(shape.heads)) for s in scale],
                       [s * np.abs(rng.standard_normal(shape.ffn)) for s in scale])
    spec = PruneSpec(ffn_multiple=ffn_multiple)
    return Ticket.from_masks(draw_masks(gates, spec), 0, "fixed", spec, shape.config())


class HFMaskedLM(torch.nn.Module):
    """transformers' BertForMaskedLM, returning what ``Engine.train_step`` reads, so that variant (d) runs the very
    same step as the others. It runs as users run it: logits at every position (30k wide at BERT-base) and the loss
    over the masked ones, where our model projects only the masked positions (its FLOPs count them all)."""

    def __init__(self, shape: Shape):
        super().__init__()
        self.hf = BertForMaskedLM(BertConfig(
            vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, intermediate_size=shape.ffn, max_position_embeddings=max(512, shape.seq)))

    def forward(self, masked_positions: torch.Tensor | None = None, **batch: torch.Tensor) -> PreTrainingOutput:
        loss = self.hf(**batch).loss  # the positions our model selects by are not transformers' to know
        return PreTrainingOutput(loss=loss, mlm_loss=loss.detach())


def build_variant(variant: str, shape: Shape) -> torch.nn.Module:
    """The model of one variant, freshly initialised (seeded, so every round trains the same network)."""
    torch.manual_seed(0)
    if variant == "a":
        return EarlyBertForPreTraining(shape.config())
    if variant == "b":
        return EarlyBertForPreTraining(shape.config(use_gates=True, gate_l1_heads=1e-4, gate_l1_ffn=1e-4))
    if variant == "d":
        return HFMaskedLM(shape)
    return shrink(EarlyBertForPreTraining(shape.config(use_gates=True)), uneven_ticket(shape, SHRUNK[variant]))


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(spec: dict) -> dict:
    """One measurement, in a fresh process: build the variant, train ``warmup + steps`` steps on a random MLM
    batch, and return the measured steps' wall and CPU times and the process's peak memory. EarlyBERT is off in
    its config: the engine's step is measured, not the pipeline, whose search budget would not fit a few steps."""
    dist.init()
    shape, batch = Shape(**spec["shape"]), spec["batch"]
    base_mb = _peak_memory_mb()
    run = RunConfig.from_dict({
        "train": {"micro_batch_size": batch, "precision": spec["precision"], "steps": spec["warmup"] + spec["steps"],
                  "warmup_steps": 0, "lr": 1e-4},
        "earlybert": {"enabled": False}})
    engine = Engine(build_variant(spec["variant"], shape), run)
    engine_device = engine.device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, shape.vocab, (batch, shape.seq), generator=g)
    labels = torch.where(torch.rand(batch, shape.seq, generator=g) < 0.15, ids, -100)
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
          "labels": labels, "masked_positions": mlm_positions(labels)}  # as the pre-training batches come
    wall, cpu = [], []
    for step in range(spec["warmup"] + spec["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        engine.train_step([mb], step)  # reads the loss back: the step has finished on the device too
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    profile = _profile_step(engine, mb, spec["profile"]) if spec["profile"] else None
    peak_mem = _peak_memory_mb()  # the training's, before the peak measurement's own large matmul
    engine.destroy()
    peak = peak_flops(spec["precision"], engine_device, clock=spec["clock"])  # same process, threads and clock
    return {"variant": spec["variant"], "tokens_per_step": batch * shape.seq, "wall_s": wall[spec["warmup"]:],
            "cpu_s": cpu[spec["warmup"]:], "peak_mem_mb": peak_mem, "base_mem_mb": base_mb,
            "peak_flops": peak, "profile": profile}


def _profile_step(engine: Engine, mb: dict, top: int) -> list[tuple[str, float]]:
    """The ``top`` operators of one more training step by their share of its self time (``torch.profiler``),
    after the timed steps so that profiling never touches the figures: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        engine.train_step([mb], 0)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1.0
    return [(e.key, e.self_cpu_time_total / total) for e in ops[:top]]


def _measure(spec: dict, threads: int | None, clock: str) -> dict:
    """One measurement in a fresh process; ``tokens_per_s`` by ``clock`` (median step), also by wall clock."""
    proc = subprocess.run([sys.executable, "-m", "earlybert_ds.bench", "_worker", json.dumps(spec)],
                          env=_child_env(threads), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"variant {spec['variant']} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**r, "tokens_per_s": r["tokens_per_step"] / statistics.median(r[f"{clock}_s"]),
            "tokens_per_wall_s": r["tokens_per_step"] / statistics.median(r["wall_s"])}


def _flops(shape: Shape, tickets: dict[str, Ticket]) -> dict[str, float]:
    """Training FLOPs per token of each variant (earlybert_ds.flops); (d) computes logits at every position."""
    full = shape.config()
    return {"a": train_flops_per_token(full, shape.seq), "b": train_flops_per_token(full, shape.seq),
            "d": 3 * forward_flops_per_token(full, shape.seq, mlm_fraction=1.0)["total"],
            **{v: train_flops_per_token(shrunk_config(full, t), shape.seq) for v, t in tickets.items()}}


def throughput(args: argparse.Namespace) -> dict:
    precision = args.precision or auto_precision(this_machine())[0]
    result: dict[str, Any] = {"suite": "throughput", "machine": _machine(), "precision": precision,
                              "device": "cuda" if torch.cuda.is_available() else "cpu",
                              "clock": args.clock, "args": _run_args(args), "shapes": {}}
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        tickets = {v: uneven_ticket(shape, m) for v, m in SHRUNK.items()}
        flops = _flops(shape, tickets)
        runs: list[dict] = []
        for r in range(args.repeats):
            for v in args.variants:
                spec = {"variant": v, "shape": asdict(shape), "batch": args.batch, "steps": args.steps,
                        "warmup": args.warmup, "precision": precision, "clock": args.clock,
                        "profile": args.profile if r == 0 else 0}
                m = _measure(spec, args.threads, args.clock)
                runs.append({**m, "mfu": m["tokens_per_s"] * flops[v] / m["peak_flops"], "round": r,
                             "loadavg": os.getloadavg()[0]})
                print(f"[{name} round {r + 1}/{args.repeats}] ({v}) {VARIANTS[v]}: "
                      f"{runs[-1]['tokens_per_s']:.0f} tokens/s, MFU {runs[-1]['mfu']:.1%}", file=sys.stderr,
                      flush=True)
        result["shapes"][name] = {
            "shape": asdict(shape), "train_flops_per_token": flops, "runs": runs,
            "tickets": {v: {"heads_per_layer": t.heads_per_layer, "intermediate_sizes": t.intermediate_sizes}
                        for v, t in tickets.items()},
            "summary": _summarise(runs, flops, args.variants)}
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def _summarise(runs: list[dict], flops: dict[str, float], variants: str) -> dict[str, Any]:
    """Medians per variant, and each variant's speedup over (a) as the median of the ratios measured in the same
    round: by the chosen clock and, for reference, by wall clock (``speedup_wall``)."""
    by = {v: [r for r in runs if r["variant"] == v] for v in variants}

    def paired(v: str, key: str) -> float:
        return statistics.median(x[key] / y[key] for x, y in zip(by[v], by["a"]))

    s: dict[str, Any] = {k: {v: statistics.median(r[k] for r in rs) for v, rs in by.items()}
                         for k in ("tokens_per_s", "tokens_per_wall_s", "peak_mem_mb", "mfu", "peak_flops")}
    s["gflops_per_s"] = {v: t * flops[v] / 1e9 for v, t in s["tokens_per_s"].items()}
    s["base_mem_mb"] = statistics.median(r["base_mem_mb"] for r in runs)
    s["speedup"] = {v: paired(v, "tokens_per_s") for v in by}
    s["speedup_wall"] = {v: paired(v, "tokens_per_wall_s") for v in by}
    s["flop_ratio"] = {v: flops[v] / flops["a"] for v in SHRUNK}
    shrunk = [v for v in SHRUNK if v in by]
    s["realized_over_theoretical"] = {v: s["speedup"][v] * s["flop_ratio"][v] for v in shrunk}
    targets = {f"({v}) realized >= 0.95 x theoretical": s["realized_over_theoretical"][v] >= 0.95 for v in shrunk}
    targets["(a) MFU >= 30%"] = s["mfu"]["a"] >= 0.30
    if "b" in by:
        s["gate_overhead"] = 1 / s["speedup"]["b"] - 1  # extra time per step
        targets["gate overhead <= 5%"] = s["gate_overhead"] <= 0.05
    if "d" in by:
        targets["(a) at least as fast as (d)"] = s["speedup"]["d"] <= 1.0
    s["targets_met"] = targets
    return s


def _print_throughput(result: dict) -> None:
    clock = "CPU-time" if result["clock"] == "cpu" else "wall-clock"
    for name, r in result["shapes"].items():
        s, sh, a, flops = r["summary"], r["shape"], result["args"], r["train_flops_per_token"]
        print(f"\n{name}: {sh['layers']} layers, hidden {sh['hidden']}, {sh['heads']} heads, FFN {sh['ffn']}, "
              f"vocab {sh['vocab']}, seq {sh['seq']}; batch {a['batch']}, {result['precision']}; {a['repeats']} "
              f"round(s) x {a['steps']} step(s); {clock} tokens/s, medians; 'vs (a)': median of same-round ratios")
        for v, t in r["tickets"].items():
            print(f"ticket ({v}): heads {t['heads_per_layer']}, FFN widths {t['intermediate_sizes']}")
        print(f"{'variant':<38}{'tokens/s':>9}{'vs (a)':>8}{'wall':>7}{'GFLOP/tok':>10}{'FLOPs vs (a)':>13}"
              f"{'GFLOP/s':>8}{'MFU':>7}{'peak MB':>8}")
        for v, tps in s["tokens_per_s"].items():
            print(f"{f'({v}) {VARIANTS[v]}':<38}{tps:>9.0f}{s['speedup'][v]:>8.3f}{s['speedup_wall'][v]:>7.3f}"
                  f"{flops[v] / 1e9:>10.3f}{flops[v] / flops['a']:>13.3f}{s['gflops_per_s'][v]:>8.1f}"
                  f"{s['mfu'][v]:>7.1%}{s['peak_mem_mb'][v]:>8.0f}")
        matmul = "x".join(map(str, PEAK_SHAPES[result["device"]]))
        print(f"MFU against this machine's {result['precision']} matmul peak, measured in each process after its "
              f"steps: median {s['peak_flops']['a'] / 1e9:.0f} GFLOP/s (matmul {matmul})")
        for v, ratio in s["realized_over_theoretical"].items():
            print(f"({v}): FLOP ratio {s['flop_ratio'][v]:.3f} -> theoretical speedup {1 / s['flop_ratio'][v]:.3f}, "
                  f"realized {s['speedup'][v]:.3f}, realized/theoretical {ratio:.3f} (target >= 0.95)")
        if "gate_overhead" in s:
            print(f"gate overhead (b) vs (a): {s['gate_overhead']:+.1%} per step (target <= 5%)")
        for run in r["runs"]:
            if run.get("profile"):
                print(f"profile ({run['variant']}), share of one step's self CPU time: "
                      + ", ".join(f"{op} {share:.1%}" for op, share in run["profile"]))
        print("targets: " + "; ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in s["targets_met"].items()))


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("throughput", help="training-step tokens/s, FLOP ratio and peak memory of five variants")
    t.add_argument("--shapes", default="base,small", help=f"comma-separated, of {', '.join(SHAPES)}")
    t.add_argument("--batch", type=int, default=8, help="sequences per step")
    t.add_argument("--steps", type=int, default=3, help="measured steps per process (their median counts)")
    t.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (allocator, optimizer state)")
    t.add_argument("--repeats", type=int, default=3, help="rounds of interleaved processes, one per variant")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="default: as the runs' auto (bf16 on CUDA and on CPUs with bf16 units, else fp32)")
    t.add_argument("--variants", default="abcde", help="which of abcde, in round order; a is the reference: "
                   + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    t.add_argument("--threads", type=int, help="CPU threads per process (default: torch's choice)")
    t.add_argument("--profile", type=int, default=0, metavar="N",
                   help="in the first round, profile one more step per variant and print its N costliest operators")
    t.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time steps by wall clock, or by the process's CPU time (CPU with --threads 1 only): "
                        "on a machine shared with other jobs, CPU time is what the step costs, while wall time "
                        "also counts the time the scheduler gave to others")
    t.add_argument("--out", help="write the raw numbers as JSON here")
    t.set_defaults(func=throughput, report=_print_throughput)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the options' types cannot check; ``parser.error`` exits."""
    if set(args.variants) - set(VARIANTS) or "a" not in args.variants:
        parser.error(f"--variants {args.variants!r}: letters of abcde, including a (the reference)")
    if set(args.shapes.split(",")) - set(SHAPES):
        parser.error(f"--shapes {args.shapes!r}: choose from {', '.join(SHAPES)}")
    if args.clock == "cpu" and (args.threads != 1 or torch.cuda.is_available()):
        parser.error("--clock cpu measures single-threaded CPU runs: add --threads 1 (and no GPU)")
