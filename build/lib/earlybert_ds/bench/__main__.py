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
- ``tickets``: ticket quality: K seeds of each method (full, EarlyBERT as published, random tickets at step 0 and
  at the method's own step, search variants) at the same budget, real fine-tuning or pre-training runs; means with
  95% intervals and each method's paired differences against the controls.
- ``lamb``: large-batch LAMB (by gradient accumulation) against small-batch AdamW at the same tokens, under ZeRO,
  seeds paired.
- ``data``: preparation (tokenise + pack) of plain-text corpora of growing size, each in a fresh process: peak RSS
  of the preparing process and of its largest worker, and MB of text per second, for each number of workers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import data, finetune, lamb, pretrain, throughput, tickets
from .common import BenchError

#: the suites in the order of ``--help``; each module adds its sub-command (named as the module) and its options
SUITES = (throughput, pretrain, finetune, tickets, lamb, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earlybert-ds bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [suite.__name__.rpartition(".")[2] for suite in SUITES]
    sub = parser.add_subparsers(dest="suite", required=True, metavar="{" + ",".join(names) + "}")
    for suite in SUITES:
        suite.add_parser(sub)
    w = sub.add_parser("_worker")  # internal: one throughput measurement, in a fresh process
    w.add_argument("spec")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.suite == "_worker":
        print(json.dumps(throughput.worker(json.loads(args.spec))))
        return 0
    if args.suite == "throughput":
        throughput.check_args(parser, args)
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
