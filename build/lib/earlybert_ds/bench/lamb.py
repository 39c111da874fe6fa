"""The lamb suite: large-batch LAMB (by gradient accumulation) against small-batch AdamW at the same tokens, under
ZeRO, seeds paired."""

from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .common import SHAPES, BenchError, _machine, _prepare_data, _run, _run_args, cli_options, interval

def lamb(args: argparse.Namespace) -> dict:
    """Large-batch LAMB against small-batch AdamW at the same tokens (LAMB's claim, You et al. 2019), seeds paired:
    full-model pre-training on the built-in corpus under ZeRO (where LAMB's trust ratio must stay per parameter).
    LAMB's learning rate is scaled from its small-batch one by the square root of the batch ratio, as in the paper."""
    k = args.large_batch // args.small_batch
    if k < 2 or args.large_batch % args.small_batch or args.steps % k:
        raise BenchError(f"--large-batch {args.large_batch} must be a multiple (>= 2) of --small-batch "
                         f"{args.small_batch}, and --steps {args.steps} a multiple of their ratio {k}")
    sh = SHAPES[args.model_size]
    settings = {
        "data.vocab_size": sh.vocab, "data.seq_len": sh.seq, "model.num_layers": sh.layers,
        "model.hidden_size": sh.hidden, "model.num_heads": sh.heads, "model.intermediate_size": sh.ffn,
        "train.micro_batch_size": args.small_batch, "train.eval_batches": args.eval_batches,
        "train.save_every": 0, "earlybert.enabled": False, "train.zero_stage": args.zero_stage,
        "log.wandb": "disabled", "log.progress": False,
        **({"train.precision": args.precision} if args.precision else {})}
    lamb_lr = args.lamb_lr * math.sqrt(k)
    arms = {"adamw": {"train.optimizer": "adamw", "train.lr": args.lr, "train.steps": args.steps,
                      "train.warmup_steps": max(args.steps // 10, 1), "train.eval_every": args.steps // 4},
            "lamb": {"train.optimizer": "lamb", "train.lr": lamb_lr, "train.grad_accum": k,
                     "train.steps": args.steps // k, "train.warmup_steps": max(args.steps // k // 10, 1),
                     "train.eval_every": max(args.steps // k // 4, 1)}}
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in arms]
    _prepare_data(settings)

    def run(job: tuple[str, int]) -> dict:
        arm, seed = job
        opts = cli_options({**settings, **arms[arm], "train.seed": seed})
        r = _run("pretrain", opts, Path(args.out_dir) / f"{arm}-s{seed}", args.threads, "val_loss")
        r.update(arm=arm, seed=seed, tokens=args.steps * args.small_batch * sh.seq)
        print(f"[lamb] {arm} seed {seed}: val_loss {r['final_val_loss']:.4f}, CPU {r['process_cpu_s']:.0f} s",
              file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        runs = list(pool.map(run, jobs))
    final = {a: {r["seed"]: r["final_val_loss"] for r in runs if r["arm"] == a} for a in arms}
    diff = [final["lamb"][s] - final["adamw"][s] for s in range(args.seeds)]
    summary = {"batch": {"adamw": args.small_batch, "lamb": args.large_batch},
               "lr": {"adamw": args.lr, "lamb": lamb_lr}, "steps": {"adamw": args.steps, "lamb": args.steps // k},
               "tokens": runs[0]["tokens"],
               "val_loss": {a: interval(list(v.values())) for a, v in final.items()},
               "lamb_minus_adamw": interval(diff), "diffs": diff,
               "target_met": bool(np.mean(diff) <= 0.01 * np.mean(list(final["adamw"].values())))}
    return {"suite": "lamb", "machine": _machine(), "args": _run_args(args), "options": cli_options(settings),
            "runs": runs, "summary": summary}


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


def add_parser(sub: argparse._SubParsersAction) -> None:
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
