"""Training checkpoints: DeepSpeed's own shards plus our client state, complete or ignored.

Layout: ``CKPT/global_stepN/`` (DeepSpeed's model/optimizer shards, one RNG file per rank) and ``CKPT/latest``
naming the last *complete* checkpoint. ``latest`` is written atomically only after every rank has finished
writing, so a crash mid-save leaves it pointing at the previous checkpoint; older ones beyond ``keep_last`` are
deleted only after that. DeepSpeed checkpoints are pickles: load only checkpoints you trust (your own runs).
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist
from .atomic import atomic_write_text
from .faults import fault_point
from .engine import Engine

logger = logging.getLogger("earlybert_ds")

LATEST = "latest"
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint; the message says what was expected."""


def rng_state() -> dict[str, Any]:
    """This process's random number generators (dropout draws from them): what an exact resume restores."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int,
         rank_state: dict | None = None) -> Path:
    """Save on every rank (collective); returns the checkpoint's directory. ``rank_state`` is what this rank alone
    knows (beside its RNG state), written to ``rankR.pt``."""
    tag = f"global_step{step}"
    dist.on_rank0(_abandon_from, ckpt_dir, step)
    engine.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save({"rng": rng_state(), **(rank_state or {})}, ckpt_dir / tag / rank_file())
    fault_point(f"checkpoint:{tag}")  # every shard written, `latest` not yet moved
    dist.barrier()
    dist.on_rank0(_complete, ckpt_dir, tag, keep_last)
    return ckpt_dir / tag


def _complete(ckpt_dir: Path, tag: str, keep_last: int) -> None:
    """Rank 0, once every rank has written its part: ``latest`` names ``tag``, the oldest beyond ``keep_last`` go."""
    atomic_write_text(ckpt_dir / LATEST, tag)
    for old in sorted(_tags(ckpt_dir))[:-keep_last]:  # `tag` is the highest one now: never deleted
        shutil.rmtree(ckpt_dir / f"global_step{old}", ignore_errors=True)


def _abandon_from(ckpt_dir: Path, step: int) -> None:
    """Before saving ``step``: delete the checkpoints of steps >= ``step`` (rank 0).

    They are an unfinished save of this step or a branch this run has left (it resumed from an earlier checkpoint
    or from the ticket): kept, they would be overwritten in place (a crash then leaves ``latest`` on a torn
    checkpoint, or mixes shards of two world sizes) and outrank the new checkpoint when older ones are pruned.
    When ``latest`` names one of them it first moves back to the newest checkpoint before ``step`` (removed when
    there is none), so that it always names a complete checkpoint.
    """
    later = sorted(t for t in _tags(ckpt_dir) if t >= step) if ckpt_dir.is_dir() else []
    if not later:
        return
    latest = ckpt_dir / LATEST
    named = _TAG.match(latest.read_text().strip()) if latest.is_file() else None
    if named and int(named.group(1)) >= step:
        earlier = [t for t in _tags(ckpt_dir) if t < step]
        if earlier:
            atomic_write_text(latest, f"global_step{max(earlier)}")
        else:
            latest.unlink()
    names = [f"global_step{t}" for t in later]
    logger.warning("%s: deleting %s before saving step %d: left by an earlier attempt (an unfinished save, or "
                   "later steps of a branch this run has left by resuming from an earlier point)", ckpt_dir,
                   ", ".join(names), step)
    for name in names:
        shutil.rmtree(ckpt_dir / name)


def _tags(ckpt_dir: Path) -> list[int]:
    return [int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _TAG.match(p.name)) and p.is_dir()]


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoint root, tag) for a root holding ``latest`` or for one ``global_stepN`` directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / LATEST).is_file():
        tag = (path / LATEST).read_text().strip()
        if not (path / tag).is_dir():
            raise CheckpointError(f"{path}/latest names {tag!r}, which does not exist")
        return path, tag
    if _TAG.match(path.name) and list(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise CheckpointError(f"{path}: not a checkpoint (expected a directory with a 'latest' file or a "
                          "'global_stepN' directory written by earlybert_ds)")


def peek_client_state(path: str | Path) -> dict:
    """The client state of a checkpoint, read without an engine (to know which model to build before loading)."""
    root, tag = resolve(path)
    files = sorted((root / tag).glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{root / tag}: no model states file")
    try:  # DeepSpeed's checkpoint holds arbitrary pickles (trusted input only: your own runs)
        state = torch.load(files[0], map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file fails in many ways inside torch.load
        raise CheckpointError(f"{files[0]}: unreadable ({type(e).__name__}: {e}); resume from another checkpoint "
                              "or from the ticket") from e
    if not isinstance(state, dict) or "earlybert" not in state:
        raise CheckpointError(f"{root / tag}: not an earlybert_ds checkpoint (no 'earlybert' client state)")
    return state["earlybert"]


def rank_file(rank: int | None = None) -> str:
    return f"rank{dist.rank() if rank is None else rank}.pt"


def load(engine: Engine, path: str | Path) -> tuple[dict, dict]:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the client state and this rank's state
    (empty when the checkpoint was written by another number of ranks)."""
    root, tag = resolve(path)
    try:
        load_path, client = engine.engine.load_checkpoint(str(root), tag=tag)
    except (AssertionError, RuntimeError, ValueError) as e:
        if "world size" in str(e):
            raise CheckpointError(
                f"{root / tag}: saved with another number of ranks ({e}). Restart from the ticket checkpoint "
                "(--resume-from OUTPUT/ticket), or convert with `python -m deepspeed.checkpoint.ds_to_universal "
                "--inject_missing_state` and set \"checkpoint\": {\"load_universal\": true}") from e
        raise
    if load_path is None:
        raise CheckpointError(f"{root / tag}: DeepSpeed found nothing to load")
    rank_state = {}
    if (root / tag / rank_file()).is_file():
        rank_state = torch.load(root / tag / rank_file(), weights_only=True)
        set_rng_state(rank_state.pop("rng"))
    return client["earlybert"], rank_state
