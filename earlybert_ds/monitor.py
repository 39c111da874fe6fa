"""Metrics for a training run: ``OUTPUT/metrics.jsonl``, wandb (our own steps, not DeepSpeed's sample count) and
a progress display on rank 0; and ``OUTPUT/train.log``, the text log of rank 0 (:func:`text_log`).

Every rank builds a :class:`Monitor` so the training loop needs no rank checks; all but rank 0 are no-ops.
``metrics.jsonl`` is the durable record (one JSON object a line, ``step`` first, flushed per call); on resume
the lines past the checkpoint are dropped so the file reads as one continuous run. Each process is its own wandb
run (offline runs cannot be resumed); the run name stays the same and ``resume_step`` is in its config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from .atomic import atomic_write_text
from .config import LogArgs

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
#: The metric and event lines that rank 0 prints reach ``train.log`` through this logger; it does not propagate, so
#: the console shows each line once, as printed.
_printed = logging.getLogger("earlybert_ds.metrics")
_printed.propagate = False
_printed.setLevel(logging.INFO)
# Progress-bar postfix label -> metric name; the trainer logs these as "train/<name>" (or bare "<name>").
PROGRESS_KEYS = {"loss": "loss", "lr": "lr", "tok/s": "tokens_per_s"}
_SECRET_WORD_ENDINGS = ("key", "token", "secret", "password", "passwd")


def strip_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without any (nested) key naming a secret, so no credential reaches wandb.

    A key is a secret when one of its words ends in key/token/secret/password: ``api_key``, ``hf_token``,
    ``apiKey`` go; ``tokenizer`` and ``num_tokens`` stay.
    """
    def secret(name: str) -> bool:
        return any(w.endswith(_SECRET_WORD_ENDINGS) for w in re.split(r"[^a-z0-9]+", str(name).lower()))

    return {k: strip_secrets(v) if isinstance(v, dict) else v for k, v in config.items() if not secret(k)}


def resolve_wandb_mode(setting: str) -> str:
    """The wandb mode for ``log.wandb``. ``auto`` defers to ``$WANDB_MODE`` when set, else goes online only when an
    API key is configured (``$WANDB_API_KEY``, an identity token file or netrc; checked locally, no network)."""
    if setting != "auto":
        return setting
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    from wandb.errors import AuthenticationError
    from wandb.sdk.lib import urls
    from wandb.sdk.lib.wbauth import read_netrc_auth

    try:
        found = read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", urls.DEFAULT_BASE_URL))
    except AuthenticationError:  # a malformed key would fail online anyway: keep the run's data offline
        found = None
    return "online" if found else "offline"


@contextlib.contextmanager
def text_log(output_dir: Path, rank: int, append: bool) -> Iterator[None]:
    """While the run lasts, rank 0's log lines (in the console's format) and the lines :class:`Monitor` prints go
    to ``OUTPUT/train.log`` too (appended to when resuming), so that whoever reads the run later sees what the
    console showed; an error that ends the run is its last entry, with its traceback."""
    if rank != 0:
        yield
        return
    root = logging.getLogger()
    console = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    handler = logging.FileHandler(Path(output_dir) / LOG_FILE, mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(console or logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    _printed.addHandler(handler)
    try:
        yield
    except BaseException as e:
        handler.handle(_printed.makeRecord("earlybert_ds", logging.ERROR, __file__, 0, "run failed: %s: %s",
                                           (type(e).__name__, e), sys.exc_info()))
        raise
    finally:
        root.removeHandler(handler)
        _printed.removeHandler(handler)
        handler.close()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _json_default(o: Any) -> Any:
    """numpy/torch values in event data become plain Python values."""
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


class Monitor:
    """Metrics sink for one training process (see the module docstring). Use as a context manager or call
    :meth:`close`: a process ending without ``wandb.finish()`` (e.g. via ``os._exit``) leaves an empty run file."""

    def __init__(self, log_args: LogArgs, output_dir: Path, run_config: dict, rank: int, total_steps: int,
                 resume_step: int = 0) -> None:
        self.active = rank == 0
        self.wandb_file: Path | None = None
        self._run: Any = None
        self._bar: Any = None
        self._jsonl: TextIO | None = None
        self._total = total_steps
        if not self.active:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / METRICS_FILE
        if resume_step > 0 and path.exists():
            atomic_write_text(path, "".join(_lines_up_to(path, resume_step)))
        self._jsonl = path.open("a" if resume_step > 0 else "w", encoding="utf-8")  # a fresh run starts a new file

        mode = resolve_wandb_mode(log_args.wandb)
        if mode != "disabled":
            import wandb

            self._run = wandb.init(project=log_args.project, name=log_args.run_name or output_dir.resolve().name,
                                   dir=str(output_dir), mode=mode,
                                   config={**strip_secrets(run_config), "resume_step": resume_step})
            self.wandb_file = Path(self._run.settings.sync_file)
        if log_args.progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one set of scalar metrics for ``step``."""
        if not self.active:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._write({"step": step, "time": time.time(), **values})
        if self._run is not None:
            self._run.log(values, step=step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            postfix = {}
            for label, name in PROGRESS_KEYS.items():
                v = values.get(f"train/{name}", values.get(name))
                if v is not None:
                    postfix[label] = _fmt(v)
            self._bar.set_postfix(postfix, refresh=True)
        line = f"step {step}/{self._total} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        if self._bar is None:
            print(line, flush=True)
        _printed.info(line)

    def event(self, step: int, name: str, data: dict[str, Any]) -> None:
        """Record a one-off event (e.g. the ticket being drawn): a metrics line, a wandb row and summary entries
        ``<name>/<key>`` (plus ``<name>/step``) so it is visible on the run's overview."""
        if not self.active:
            return
        self._write({"step": step, "time": time.time(), "event": name, **data})
        if self._run is not None:
            flat = json.loads(json.dumps({f"{name}/{k}": v for k, v in data.items()}, default=_json_default))
            self._run.log(flat, step=step)
            self._run.summary.update({**flat, f"{name}/step": step})
        message = f"step {step}: {name} " + " ".join(f"{k}={_fmt(v)}" for k, v in data.items())
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)
        _printed.info(message)

    def log_image(self, step: int, key: str, png_path: str | Path) -> None:
        """Attach a figure (e.g. the mask-distance plot) to the wandb run at ``step``."""
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Image(str(png_path))}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Set final numbers (e.g. best validation loss) on the wandb run summary."""
        if self._run is not None:
            self._run.summary.update(values)

    def close(self, exit_code: int = 0) -> None:
        """Flush and finish; a non-zero ``exit_code`` marks the wandb run as failed. Safe to call twice.

        ``run.finish()`` can return before wandb's core process has written the last history row and the exit
        record; ``wandb.teardown()`` (~10 ms) waits for it, so the ``.wandb`` file is complete when this returns.
        """
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._run is not None:
            import wandb

            self._run.finish(exit_code=exit_code)
            self._run = None
            wandb.teardown()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(exit_code=0 if exc_type is None else 1)

    def _write(self, row: dict[str, Any]) -> None:
        assert self._jsonl is not None, "Monitor used after close()"
        self._jsonl.write(json.dumps(row, default=_json_default) + "\n")
        self._jsonl.flush()


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` with ``step <= step``; a torn last line from a crash is dropped too."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept
