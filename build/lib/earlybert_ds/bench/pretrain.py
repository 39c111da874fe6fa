"""The pretrain suite: time to quality on a real corpus, real ``earlybert-ds pretrain`` runs of the same number
of steps (full baseline, EarlyBERT rewind and continue, random ticket), validation loss against wall-clock time."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..plots import plot_curves
from .common import (PYTHON_DOCS, SHAPES, _machine, _output_dirs, _prepare_data, _python_docs, _run, _run_args,
                     _run_options, cli_options)

RUNS = {  # run name -> its own `earlybert-ds pretrain` options
    "full": ["--earlybert.enabled", "false"],
    "earlybert-rewind": ["--earlybert.weights", "rewind"],
    "earlybert-continue": ["--earlybert.weights", "continue"],
    "random-ticket": ["--earlybert.draw", "random"],
}


def pretrain_settings(args: argparse.Namespace, detect_every: bool = True) -> dict[str, Any]:
    """The settings every run shares: the model, the data, the budget, and the search schedule (``detect_every``
    false: the runs derive it from their search budget)."""
    sh = SHAPES[args.model_size]
    search = max(args.steps // 4, 1)  # the search may take at most a quarter of the budget
    settings = {
        "data.corpus": args.corpus, "data.vocab_size": sh.vocab, "data.seq_len": sh.seq,
        "model.num_layers": sh.layers, "model.hidden_size": sh.hidden, "model.num_heads": sh.heads,
        "model.intermediate_size": sh.ffn, "train.micro_batch_size": args.batch, "train.steps": args.steps,
        "train.warmup_steps": max(args.steps // 10, 1), "train.lr": args.lr,
        "train.eval_every": max(args.steps // args.evals, 1), "train.eval_batches": args.eval_batches,
        "train.log_every": max(args.steps // 50, 1), "train.save_every": 0,
        "earlybert.max_search_steps": search, "log.wandb": "disabled", "log.progress": False,
        **({"earlybert.detect_every": max(search // 15, 1)} if detect_every else {}),
    }
    if args.cache_dir:
        settings["data.cache_dir"] = args.cache_dir
    return settings


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


def pretrain(args: argparse.Namespace) -> dict:
    if args.quick:
        args.model_size, args.steps, args.batch, args.evals, args.eval_batches = "tiny", 24, 4, 4, 2
    args.corpus = str(_python_docs(args.corpus))
    outs = _output_dirs(args, RUNS)
    settings = pretrain_settings(args)
    _prepare_data(settings)
    options = cli_options(settings)
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


def add_parser(sub: argparse._SubParsersAction) -> None:
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
