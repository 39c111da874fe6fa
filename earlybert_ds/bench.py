"""Benchmarks (issue 8): ``python -m earlybert_ds.bench SUITE``.

- ``throughput``: tokens/s of one training step (forward, backward, optimizer step through :class:`Engine`) for
  (a) the full model, (b) the full model with slimming gates and their L1 term (search stage), (c) the model shrunk
  to the paper's ratios with an uneven ticket, (d) transformers' ``BertForMaskedLM`` under the same DeepSpeed config.
  Every measurement is a fresh subprocess, so peak memory is that variant's own, and variants are interleaved
  (a b c d a b c d ...) so that load from other jobs on a shared machine hits all of them alike; figures are
  medians, speedups the median of ratios taken within one round.
- ``pretrain``: time to quality on a real corpus: real ``earlybert-ds pretrain`` runs (full baseline, EarlyBERT
  rewind, EarlyBERT continue, random ticket) of the same number of steps, with validation loss against wall-clock
  time.
- ``finetune``: reserved for when fine-tuning exists (see :func:`_finetune`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

VARIANTS = {
    "a": "full",
    "b": "full + gates (search, L1 on)",
    "c": "shrunk to the ticket",
    "d": "transformers BertForMaskedLM",
}
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
RUNS = {  # pretrain suite: run name -> `earlybert-ds pretrain` options of that run
    "full": ["--earlybert.enabled", "false"],
    "earlybert-rewind": ["--earlybert.weights", "rewind"],
    "earlybert-continue": ["--earlybert.weights", "continue"],
    "random-ticket": ["--earlybert.draw", "random"],
}


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq: int

    def config(self, **kw: Any):
        from .modeling import EarlyBertConfig

        return EarlyBertConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                               num_attention_heads=self.heads, intermediate_size=self.ffn,
                               max_position_embeddings=max(512, self.seq), **kw)


SHAPES = {
    "base": Shape(12, 768, 12, 3072, 30522, 128),  # BERT-base
    "small": Shape(4, 256, 8, 1024, 8192, 128),  # the pretrain suite's model (vocab: its WordPiece)
    "tiny": Shape(2, 32, 4, 64, 600, 32),  # smoke tests
}


def _machine() -> dict[str, Any]:
    import deepspeed
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "loadavg_start": os.getloadavg()}


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _child_env(threads: int | None) -> dict[str, str]:
    """The environment of the measured processes. ``threads`` pins torch's CPU threads: on a machine shared with
    other jobs, two OpenMP threads on two cores lose most of their time waiting for each other whenever one is
    descheduled (a 4-layer step took 4.5 s with 2 threads, 1.1 s with 1), so 1 thread gives steadier figures."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if not _on_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# ---- throughput ---------------------------------------------------------------------------------------------------

def uneven_ticket(shape: Shape, seed: int = 0):
    """A ticket at the paper's ratios (1/3 of heads per layer, 40% of FFN neurons globally) drawn from synthetic gate
    magnitudes whose scale differs per layer, as after a real search: the global FFN pruning then leaves every layer
    a different, generally odd width, which an even ticket would hide."""
    import numpy as np

    from .gates import GateValues
    from .ticket import PruneSpec, Ticket, draw_masks

    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0.0, 0.4, shape.layers)
    gates = GateValues([s * np.abs(rng.standard_normal(shape.heads)) for s in scale],
                       [s * np.abs(rng.standard_normal(shape.ffn)) for s in scale])
    spec = PruneSpec()
    return Ticket.from_masks(draw_masks(gates, spec), 0, "fixed", spec, shape.config())


def hf_masked_lm(shape: Shape):
    """transformers' BertForMaskedLM, wrapped to return what ``Engine.train_step`` reads so that variant (d) runs the
    very same step as the others. It runs as users run it: logits at every position (30k wide at BERT-base), the
    loss over the masked ones; our model projects only the masked positions (see flops: (d) counts them all)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from .modeling import PreTrainingOutput

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = BertForMaskedLM(BertConfig(
                vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, intermediate_size=shape.ffn, max_position_embeddings=max(512, shape.seq)))

        def forward(self, **batch: torch.Tensor) -> PreTrainingOutput:
            loss = self.hf(**batch).loss
            return PreTrainingOutput(loss=loss, mlm_loss=loss.detach())

    return Wrapped()


def build_variant(variant: str, shape: Shape):
    """The model of one variant, freshly initialised (seeded, so every repeat trains the same network)."""
    import torch

    from .modeling import EarlyBertForPreTraining
    from .shrink import shrink

    torch.manual_seed(0)
    if variant == "a":
        return EarlyBertForPreTraining(shape.config())
    if variant == "b":
        return EarlyBertForPreTraining(shape.config(use_gates=True, gate_l1_heads=1e-4, gate_l1_ffn=1e-4))
    if variant == "c":
        return shrink(EarlyBertForPreTraining(shape.config(use_gates=True)), uneven_ticket(shape))
    if variant == "d":
        return hf_masked_lm(shape)
    raise ValueError(f"unknown variant {variant!r}")


def _peak_memory_mb() -> float:
    if _on_cuda():
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(spec: dict) -> dict:
    """One measurement in this (fresh) process: build the variant, train ``warmup + steps`` steps on random MLM
    batches, return the step times and the process's peak memory."""
    import torch

    from . import distributed as dist
    from .config import RunConfig
    from .engine import Engine

    dist.init()
    shape, batch = Shape(**spec["shape"]), spec["batch"]
    base_mb = _peak_memory_mb()
    run = RunConfig()
    run.train.micro_batch_size, run.train.precision = batch, spec["precision"]
    run.train.steps, run.train.warmup_steps, run.train.lr = spec["warmup"] + spec["steps"], 0, 1e-4
    engine = Engine(build_variant(spec["variant"], shape), run)
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
    engine.destroy()
    return {"variant": spec["variant"], "tokens_per_step": batch * shape.seq, "wall_s": wall[spec["warmup"]:],
            "cpu_s": cpu[spec["warmup"]:], "peak_mem_mb": _peak_memory_mb(), "base_mem_mb": base_mb}


def _measure(spec: dict, threads: int | None, clock: str) -> dict:
    """Run one measurement in a fresh process; ``tokens_per_s`` by ``clock`` (median step), also by wall clock."""
    proc = subprocess.run([sys.executable, "-m", "earlybert_ds.bench", "_worker", json.dumps(spec)],
                          env=_child_env(threads), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"variant {spec['variant']} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**r, "tokens_per_s": r["tokens_per_step"] / statistics.median(r[f"{clock}_s"]),
            "tokens_per_wall_s": r["tokens_per_step"] / statistics.median(r["wall_s"])}


def _flops(shape: Shape, ticket) -> dict[str, float]:
    """Training FLOPs per token of each variant (earlybert_ds.flops); (d) computes logits at every position."""
    from .flops import forward_flops_per_token, train_flops_per_token
    from .shrink import shrunk_config

    full = shape.config()
    return {"a": train_flops_per_token(full, shape.seq), "b": train_flops_per_token(full, shape.seq),
            "c": train_flops_per_token(shrunk_config(full, ticket), shape.seq),
            "d": 3 * forward_flops_per_token(full, shape.seq, mlm_fraction=1.0)["total"]}


def throughput(args: argparse.Namespace) -> dict:
    precision = args.precision or ("bf16" if _on_cuda() else "fp32")
    result: dict[str, Any] = {"suite": "throughput", "machine": _machine(), "precision": precision, "clock": args.clock,
                              "args": {k: v for k, v in vars(args).items() if k not in ("func", "report")}, "shapes": {}}
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        ticket = uneven_ticket(shape)
        flops = _flops(shape, ticket)
        runs: list[dict] = []
        for r in range(args.repeats):
            for v in args.variants:
                spec = {"variant": v, "shape": asdict(shape), "batch": args.batch, "steps": args.steps,
                        "warmup": args.warmup, "precision": precision}
                runs.append({**_measure(spec, args.threads, args.clock), "repeat": r, "loadavg": os.getloadavg()[0]})
                print(f"[{name} round {r + 1}/{args.repeats}] ({v}) {VARIANTS[v]}: "
                      f"{runs[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
        result["shapes"][name] = {"shape": asdict(shape), "ticket": {"heads_per_layer": ticket.heads_per_layer,
                                                                     "intermediate_sizes": ticket.intermediate_sizes},
                                  "train_flops_per_token": flops, "runs": runs,
                                  "summary": _summarise(runs, flops, args.variants)}
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def _summarise(runs: list[dict], flops: dict[str, float], variants: str) -> dict[str, Any]:
    """Medians per variant and the paired (same-round) ratios the targets are about: by the chosen clock
    (``tokens_per_s``) and, for reference, by wall clock (``*_wall``)."""
    by = {v: [r for r in runs if r["variant"] == v] for v in variants}

    def paired(num: str, den: str, key: str) -> float | None:
        """Median over rounds of ``num``'s / ``den``'s tokens/s measured in the same round."""
        if num not in by or den not in by:
            return None
        return statistics.median(x[key] / y[key] for x, y in zip(by[num], by[den]))

    s: dict[str, Any] = {k: {v: statistics.median(r[k] for r in rs) for v, rs in by.items()}
                         for k in ("tokens_per_s", "tokens_per_wall_s", "peak_mem_mb")}
    s.update(gflops_per_s={v: t * flops[v] / 1e9 for v, t in s["tokens_per_s"].items()},
             base_mem_mb=statistics.median(r["base_mem_mb"] for r in runs),
             flop_ratio_c_a=flops["c"] / flops["a"], theoretical_speedup=flops["a"] / flops["c"])
    for key, suffix in (("tokens_per_s", ""), ("tokens_per_wall_s", "_wall")):
        for num, den in (("c", "a"), ("b", "a"), ("a", "d")):
            s[f"speedup_{num}_{den}{suffix}"] = paired(num, den, key)
    c_a, b_a, a_d = s["speedup_c_a"], s["speedup_b_a"], s["speedup_a_d"]
    s["realized_over_theoretical"] = None if c_a is None else c_a / s["theoretical_speedup"]
    s["gate_overhead"] = None if b_a is None else 1 / b_a - 1  # extra time per step
    s["targets_met"] = {"realized >= 0.9 x theoretical": None if c_a is None else s["realized_over_theoretical"] >= 0.9,
                        "gate overhead <= 5%": None if b_a is None else s["gate_overhead"] <= 0.05,
                        "(a) at least as fast as (d)": None if a_d is None else a_d >= 1.0}
    return s


def _print_throughput(result: dict) -> None:
    fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
    clock = "CPU-time" if result["clock"] == "cpu" else "wall-clock"
    for name, r in result["shapes"].items():
        s, sh, a = r["summary"], r["shape"], result["args"]
        print(f"\n{name}: {sh['layers']} layers, hidden {sh['hidden']}, {sh['heads']} heads, FFN {sh['ffn']}, "
              f"vocab {sh['vocab']}, seq {sh['seq']}; batch {a['batch']}, {result['precision']}, {a['repeats']} rounds "
              f"x {a['steps']} steps, {clock} tokens/s (medians; ratios: median of same-round ratios)")
        print(f"ticket (c): heads {r['ticket']['heads_per_layer']}, FFN widths {r['ticket']['intermediate_sizes']}")
        print(f"{'variant':<35}{'tokens/s':>9}{'vs (a)':>8}{'wall tok/s':>11}{'GFLOP/tok':>10}{'GFLOP/s':>8}"
              f"{'peak MB':>8}")
        for v, tps in s["tokens_per_s"].items():
            print(f"{f'({v}) {VARIANTS[v]}':<35}{tps:>9.0f}{tps / s['tokens_per_s']['a']:>8.3f}"
                  f"{s['tokens_per_wall_s'][v]:>11.0f}{r['train_flops_per_token'][v] / 1e9:>10.3f}"
                  f"{s['gflops_per_s'][v]:>8.1f}{s['peak_mem_mb'][v]:>8.0f}")
        print(f"FLOP ratio (c)/(a) {s['flop_ratio_c_a']:.3f} -> theoretical speedup {s['theoretical_speedup']:.3f}; "
              f"peak memory before the model {s['base_mem_mb']:.0f} MB")
        print(f"realized speedup (c) vs (a) {fmt(s['speedup_c_a'], '.3f')} (wall clock {fmt(s['speedup_c_a_wall'], '.3f')})"
              f", realized/theoretical {fmt(s['realized_over_theoretical'], '.3f')} (target >= 0.9)")
        print(f"gate overhead (b) vs (a) {fmt(s['gate_overhead'], '+.1%')} (target <= 5%); (a) vs (d) "
              f"{fmt(s['speedup_a_d'], '.3f')}x (wall clock {fmt(s['speedup_a_d_wall'], '.3f')}x; target >= 1)")
        print("targets: " + ", ".join(f"{k}: {'n/a' if v is None else 'met' if v else 'MISSED'}"
                                     for k, v in s["targets_met"].items()))


# ---- pretrain -----------------------------------------------------------------------------------------------------

def _pretrain_options(args: argparse.Namespace) -> list[str]:
    """The options every run shares: the model, the data, the budget, and the search schedule."""
    sh = SHAPES[args.model_size]
    search = max(args.steps // 4, 1)  # the search may take at most a quarter of the budget
    opts = {
        "--corpus": args.corpus, "--data.vocab_size": sh.vocab, "--data.seq_len": sh.seq,
        "--model.num_layers": sh.layers, "--model.hidden_size": sh.hidden, "--model.num_heads": sh.heads,
        "--model.intermediate_size": sh.ffn, "--train.micro_batch_size": args.batch, "--train.steps": args.steps,
        "--train.warmup_steps": max(args.steps // 10, 1), "--train.lr": args.lr,
        "--train.eval_every": max(args.steps // args.evals, 1), "--train.eval_batches": args.eval_batches,
        "--train.log_every": max(args.steps // 50, 1), "--train.save_every": 0,
        "--earlybert.detect_every": max(search // 15, 1), "--earlybert.max_search_steps": search,
        "--log.wandb": "disabled", "--log.progress": "false",
    }
    if args.cache_dir:
        opts["--data.cache_dir"] = args.cache_dir
    return [str(x) for kv in opts.items() for x in kv]


def _prepare_data(options: list[str]) -> None:
    """Train the WordPiece vocabulary and pack the corpus once, up front, so no run's wall time includes it."""
    from .cli import build_parser
    from .config import config_from_args
    from .data import prepare_corpus, tokenizer_for

    ns = build_parser().parse_args(["pretrain", *options])
    cfg = config_from_args(ns, extra={"data.corpus": ns.corpus})
    prepare_corpus(cfg.data, tokenizer_for(cfg.data), cfg.train.seed)


def _val_curve(out: Path, start: float) -> list[tuple[float, float, int]]:
    """(seconds since launch, validation loss, step) of every validation in ``out/metrics.jsonl``."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["time"] - start, r["val_loss"], r["step"]) for r in rows if "val_loss" in r]


def _time_to(curve: list[tuple[float, float, int]], target: float) -> float | None:
    """Wall time at which the validation loss first reached ``target`` (linear between validations)."""
    prev = None
    for t, loss, _ in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return t
            return prev[0] + (t - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (t, loss)
    return None


def pretrain(args: argparse.Namespace) -> dict:
    from .plots import plot_curves

    if args.quick:
        args.model_size, args.steps, args.batch, args.evals, args.eval_batches = "tiny", 24, 4, 4, 2
    corpus = Path(args.corpus) if args.corpus else PYTHON_DOCS
    if not corpus.exists():
        raise SystemExit(f"bench pretrain: corpus {corpus} not found. Install Debian's Python documentation "
                         "sources with `apt-get install python3.11-doc`, or pass --corpus FILE_OR_DIR.")
    args.corpus = str(corpus)
    options = _pretrain_options(args)
    _prepare_data(options)
    out_dir = Path(args.out_dir)
    result: dict[str, Any] = {"suite": "pretrain", "machine": _machine(),
                              "args": {k: v for k, v in vars(args).items() if k not in ("func", "report")},
                              "options": options, "runs": {}}
    for name in args.runs.split(","):
        out = out_dir / name
        if out.exists():
            if not args.overwrite:
                raise SystemExit(f"bench pretrain: {out} exists; pass --overwrite to replace it")
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "earlybert_ds", "pretrain", *options, "--output-dir", str(out), *RUNS[name]]
        load0, start = os.getloadavg()[0], time.time()
        proc = subprocess.run(cmd, env=_child_env(args.threads), capture_output=True, text=True)
        elapsed = time.time() - start
        if proc.returncode:
            raise RuntimeError(f"run {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        summary = json.loads((out / "summary.json").read_text())
        curve = _val_curve(out, start)
        result["runs"][name] = {
            "command": cmd, "process_s": elapsed, "train_wall_s": summary["wall_s"],
            "ticket_step": summary["ticket"]["step"] if summary["ticket"] else None,
            "ticket_reason": summary["ticket"]["reason"] if summary["ticket"] else None,
            "flop_ratio": summary["flop_ratio"], "params_final": summary["params_final"],
            "stages": summary["stages"], "final_val_loss": summary["final_val_loss"],
            "final_val_acc": summary["final_val_acc"], "val_curve": curve,
            "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]}
        print(f"[pretrain] {name}: {elapsed:.0f} s, final val loss {summary['final_val_loss']:.3f}",
              file=sys.stderr, flush=True)
    runs = result["runs"]
    if "full" in runs:  # time each run needed to reach the baseline's final quality
        target = runs["full"]["final_val_loss"]
        for r in runs.values():
            r["time_to_full_final_loss_s"] = _time_to(r["val_curve"], target)
    if args.plot:
        plot = Path(args.plot)
        plot_curves({n: [(t, loss) for t, loss, _ in r["val_curve"]] for n, r in runs.items()},
                    "wall-clock seconds since launch", "validation MLM loss", plot,
                    title=f"{args.model_size} BERT, {args.steps} steps")
        plot_curves({n: [(s, loss) for _, loss, s in r["val_curve"]] for n, r in runs.items()},
                    "training step", "validation MLM loss", plot.with_name(plot.stem + "_steps" + plot.suffix),
                    title=f"{args.model_size} BERT, {args.steps} steps")
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def _print_pretrain(result: dict) -> None:
    runs = result["runs"]
    base = runs.get("full", {}).get("process_s")
    print(f"\n{'run':<20}{'ticket step':>12}{'FLOP ratio':>11}{'wall s':>8}{'vs full':>8}{'train s':>9}"
          f"{'val loss':>9}{'to full loss s':>15}")
    for name, r in runs.items():
        tt = r.get("time_to_full_final_loss_s")
        print(f"{name:<20}{'-' if r['ticket_step'] is None else r['ticket_step']:>12}{r['flop_ratio']:>11.3f}"
              f"{r['process_s']:>8.0f}{r['process_s'] / base if base else float('nan'):>8.3f}"
              f"{r['train_wall_s']:>9.0f}{r['final_val_loss']:>9.3f}{'never' if tt is None else f'{tt:.0f}':>15}")


# ---- finetune (hook) ----------------------------------------------------------------------------------------------

def _finetune(args: argparse.Namespace) -> dict:
    """Hook for the third suite of issue 8 (GLUE/SQuAD quality and speed of shrunk vs full models): it needs the
    fine-tuning command, which does not exist yet. Register its options in :func:`build_parser` and follow
    :func:`pretrain`: real runs as subprocesses, their summary.json and metrics.jsonl, the same result layout."""
    raise SystemExit("bench finetune: not available yet (needs `earlybert-ds finetune`)")


# ---- command line -------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earlybert-ds bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", required=True)

    t = sub.add_parser("throughput", help="training-step tokens/s, FLOP ratio and peak memory of four variants")
    t.add_argument("--shapes", default="base,small", help=f"comma-separated, of {', '.join(SHAPES)}")
    t.add_argument("--batch", type=int, default=8, help="sequences per step")
    t.add_argument("--steps", type=int, default=3, help="measured steps per process (their median counts)")
    t.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (allocator, optimizer state)")
    t.add_argument("--repeats", type=int, default=3, help="rounds of interleaved processes, one per variant")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default: bf16 on CUDA, fp32 on CPU")
    t.add_argument("--variants", default="abcd", help="subset of abcd, in round order")
    t.add_argument("--threads", type=int, help="CPU threads per process (default: torch's choice)")
    t.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time steps by wall clock, or by the process's CPU time (CPU with --threads 1 only): "
                        "on a machine shared with other jobs, CPU time is what the step costs, wall time also "
                        "counts the time the scheduler gave to others")
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
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--out-dir", default="runs/bench-pretrain", help="the runs' output directories go here")
    p.add_argument("--overwrite", action="store_true", help="replace runs already in --out-dir")
    p.add_argument("--cache-dir", help="tokenised-corpus cache (default: ~/.cache/earlybert_ds)")
    p.add_argument("--plot", default="docs/pretrain_val_loss.png",
                   help="validation loss vs wall time (PNG; a _steps twin vs step); empty: none")
    p.add_argument("--quick", action="store_true", help="a tiny model for a few steps (smoke test)")
    p.add_argument("--threads", type=int, help="CPU threads per run (default: torch's choice)")
    p.add_argument("--out", help="write the raw numbers as JSON here")
    p.set_defaults(func=pretrain, report=_print_pretrain)

    f = sub.add_parser("finetune", help="(not yet) fine-tuning quality and speed")
    f.set_defaults(func=_finetune, report=None)

    w = sub.add_parser("_worker")  # internal: one throughput measurement in a fresh process
    w.add_argument("spec")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.suite == "_worker":
        print(json.dumps(_worker(json.loads(args.spec))))
        return 0
    if args.suite == "throughput" and (set(args.variants) - set(VARIANTS) or "a" not in args.variants):
        raise SystemExit(f"--variants {args.variants!r}: a subset of abcd that includes a (the reference)")
    if args.suite == "throughput" and set(args.shapes.split(",")) - set(SHAPES):
        raise SystemExit(f"--shapes {args.shapes!r}: choose from {', '.join(SHAPES)}")
    if args.suite == "throughput" and args.clock == "cpu" and (args.threads != 1 or _on_cuda()):
        raise SystemExit("--clock cpu measures single-threaded CPU runs: add --threads 1 (and no GPU)")
    result = args.func(args)
    args.report(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
