"""Fault injection for the tests: every place a test can break a run for real, and nothing else.

A test arms a fault with ``$EARLYBERT_FAULT`` (comma-separated ``point`` or ``point@rankR``); users never set it.
The product calls these hooks unconditionally; unarmed, each one is a no-op:

- :func:`fault_point` SIGKILLs the process at a named point (``write:NAME``, ``dir:NAME``, ``checkpoint:TAG``,
  ``step:N``): a crash at the worst moment;
- :func:`after_step` is the training loop's hook: ``step:N`` kills there, ``diverge:N`` fills a weight with NaN as a
  real divergence would;
- :func:`slow` stalls a named piece of work (``slow:node_once``: a corpus slower than the collective timeout).
"""

from __future__ import annotations

import os
import signal
import time

import torch

FAULT_ENV = "EARLYBERT_FAULT"


def fault_active(name: str) -> bool:
    """Whether ``$EARLYBERT_FAULT`` names the point ``name`` for this rank."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    rank = os.environ.get("RANK", "0")
    return any(f == name or f == f"{name}@rank{rank}" for f in spec.split(","))


def fault_point(name: str) -> None:
    """SIGKILL this process here when the point ``name`` is armed."""
    if fault_active(name):
        os.kill(os.getpid(), signal.SIGKILL)


def after_step(step: int, model: torch.nn.Module) -> None:
    """The end of training step ``step``: killed (``step:N``), or a weight goes NaN (``diverge:N``)."""
    fault_point(f"step:{step}")
    if fault_active(f"diverge:{step}"):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))


def slow(name: str, seconds: float = 20) -> None:
    """Stall here when ``slow:NAME`` is armed."""
    if fault_active(f"slow:{name}"):
        time.sleep(seconds)
