"""Ticket drawing: masks from per-unit scores, mask distance, random tickets, and the ``Ticket`` file.

A ticket is the set of attention heads and FFN neurons that survive pruning, per layer: the units with the largest
scores. Which scores (the gates' magnitudes, their signed values, Taylor importance) and when the masks have
converged (the early-bird test) are the search stage's business: ``search.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .atomic import atomic_write_text
from .digest import json_digest

TICKET_FORMAT = "earlybert_ds.ticket"
TICKET_VERSION = 1
TICKET_FILE = "ticket.json"
Method = Literal["layerwise", "global"]
REASONS = ("converged", "max_steps", "fixed", "random", "given")


class TicketError(ValueError):
    """A ticket (or a request for one) that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class PruneSpec:
    """How much to prune and how: ratios are the *pruned* fraction, in [0, 1)."""

    head_ratio: float = 1 / 3
    ffn_ratio: float = 0.4
    head_method: Method = "layerwise"
    ffn_method: Method = "global"
    ffn_multiple: int = 1

    def __post_init__(self) -> None:
        for name in ("head_ratio", "ffn_ratio"):
            r = getattr(self, name)
            if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 <= r < 1.0 or math.isnan(r):
                raise TicketError(f"{name}={r!r}: a pruning ratio must be a number in [0, 1)")
        for name in ("head_method", "ffn_method"):
            if getattr(self, name) not in ("layerwise", "global"):
                raise TicketError(f"{name}={getattr(self, name)!r}: must be 'layerwise' or 'global'")
        if not isinstance(self.ffn_multiple, int) or isinstance(self.ffn_multiple, bool) or self.ffn_multiple < 1:
            raise TicketError(f"ffn_multiple={self.ffn_multiple!r}: must be an integer >= 1")


@dataclass
class Scores:
    """One score per unit (attention head, FFN neuron) as plain float arrays, one per layer: masks keep the units
    with the largest scores."""

    heads: list[np.ndarray]
    ffn: list[np.ndarray]


@dataclass
class Masks:
    """Boolean keep-masks, one array per layer."""

    heads: list[np.ndarray]
    ffn: list[np.ndarray]

    def kept(self) -> tuple[list[list[int]], list[list[int]]]:
        return ([np.flatnonzero(m).tolist() for m in self.heads], [np.flatnonzero(m).tolist() for m in self.ffn])


def _n_pruned(ratio: float, n: int) -> int:
    return int(math.floor(ratio * n + 0.5))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Mask keeping the ``k`` largest scores (ties broken by position, so masks are deterministic)."""
    keep = np.zeros(scores.shape, dtype=bool)
    keep[np.argsort(-scores, kind="stable")[:k]] = True
    return keep


def _layer_masks(scores: list[np.ndarray], ratio: float, method: Method, what: str) -> list[np.ndarray]:
    if method == "layerwise":
        masks = []
        for i, s in enumerate(scores):
            k = s.size - _n_pruned(ratio, s.size)
            if k < 1:
                raise TicketError(f"pruning {ratio:.3g} of the {s.size} {what} of layer {i} would leave it empty")
            masks.append(_top_k(s, k))
        return masks
    flat = np.concatenate(scores)
    keep = _top_k(flat, flat.size - _n_pruned(ratio, flat.size))
    masks = np.split(keep, np.cumsum([s.size for s in scores])[:-1])
    # Global pruning may empty a layer; a layer keeps at least its strongest unit so the network stays connected.
    return [m if m.any() else _top_k(s, 1) for m, s in zip(masks, scores)]


def draw_masks(scores: Scores, spec: PruneSpec) -> Masks:
    """Masks that keep the heads / neurons with the largest scores at ``spec``'s ratios."""
    heads = _layer_masks(scores.heads, spec.head_ratio, spec.head_method, "heads")
    ffn = _layer_masks(scores.ffn, spec.ffn_ratio, spec.ffn_method, "FFN neurons")
    if spec.ffn_multiple > 1:
        ffn = [
            _top_k(s, min(s.size, math.ceil(m.sum() / spec.ffn_multiple) * spec.ffn_multiple))
            for s, m in zip(scores.ffn, ffn)
        ]
    return Masks(heads=heads, ffn=ffn)


def random_masks(head_shape: list[int], ffn_shape: list[int], spec: PruneSpec, seed: int) -> Masks:
    """The paper's baseline: a random ticket at the same ratios and methods (random scores)."""
    rng = np.random.default_rng(seed)
    return draw_masks(Scores([rng.random(n) for n in head_shape], [rng.random(n) for n in ffn_shape]), spec)


def mask_distance(a: Masks, b: Masks) -> dict[str, float]:
    """Normalised Hamming distance between two masks, separately for heads and FFN neurons."""
    def dist(x: list[np.ndarray], y: list[np.ndarray]) -> float:
        fx, fy = np.concatenate(x), np.concatenate(y)
        if fx.shape != fy.shape:
            raise TicketError(f"masks of different sizes ({fx.size} vs {fy.size}) cannot be compared")
        return float((fx != fy).mean()) if fx.size else 0.0

    return {"heads": dist(a.heads, b.heads), "ffn": dist(a.ffn, b.ffn)}


def index_mask(indices: list[int], n: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[indices] = True
    return m


@dataclass
class Ticket:
    """The drawn ticket: kept head and FFN-neuron indices per layer, and how and when it was drawn."""

    step: int
    reason: str
    heads: list[list[int]]
    ffn: list[list[int]]
    spec: PruneSpec
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int

    @classmethod
    def from_masks(cls, masks: Masks, step: int, reason: str, spec: PruneSpec, config) -> "Ticket":
        heads, ffn = masks.kept()
        ticket = cls(step=step, reason=reason, heads=heads, ffn=ffn, spec=spec, hidden_size=config.hidden_size,
                     num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size)
        ticket.check()
        return ticket

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def heads_per_layer(self) -> list[int]:
        return [len(h) for h in self.heads]

    @property
    def intermediate_sizes(self) -> list[int]:
        return [len(f) for f in self.ffn]

    def masks(self) -> Masks:
        return Masks([index_mask(h, self.num_attention_heads) for h in self.heads],
                     [index_mask(f, self.intermediate_size) for f in self.ffn])

    # ---- validation -------------------------------------------------------------------------------------------
    def check(self, source: str = "ticket") -> None:
        """Internal consistency: indices in range, sorted, unique, at least one per layer."""
        if self.reason not in REASONS:
            raise TicketError(f"{source}: reason {self.reason!r} is not one of {REASONS}")
        if not isinstance(self.step, int) or self.step < 0:
            raise TicketError(f"{source}: step must be a non-negative integer, got {self.step!r}")
        if len(self.heads) != len(self.ffn) or not self.heads:
            raise TicketError(f"{source}: 'heads' has {len(self.heads)} layers but 'ffn' has {len(self.ffn)}")
        for what, per_layer, limit in (("heads", self.heads, self.num_attention_heads),
                                       ("ffn", self.ffn, self.intermediate_size)):
            for i, idx in enumerate(per_layer):
                if not isinstance(idx, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in idx):
                    raise TicketError(f"{source}: {what}[{i}] must be a list of integers")
                if not idx:
                    raise TicketError(f"{source}: {what}[{i}] is empty; every layer keeps at least one")
                if idx != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= limit:
                    raise TicketError(
                        f"{source}: {what}[{i}] must be sorted unique indices in [0, {limit}), got {idx}")

    def validate_for(self, config) -> None:
        """Fail with a clear message unless this ticket was drawn for a model of ``config``'s original shape."""
        mine = (self.num_layers, self.hidden_size, self.num_attention_heads, self.intermediate_size)
        theirs = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size)
        if mine != theirs:
            raise TicketError(
                "ticket does not fit the model: ticket is for (layers, hidden, heads, ffn) = "
                f"{mine}, the model is {theirs}")
        if config.is_pruned:
            raise TicketError("ticket must be applied to the unpruned model, but this model is already shrunk")

    def digest(self) -> str:
        """A short fingerprint of the ticket, to check that every rank holds the same one."""
        return json_digest(self.to_dict())

    # ---- JSON -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": TICKET_FORMAT, "version": TICKET_VERSION, "step": self.step, "reason": self.reason,
            "original": {"num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                         "num_attention_heads": self.num_attention_heads,
                         "intermediate_size": self.intermediate_size},
            **asdict(self.spec),
            "heads_per_layer": self.heads_per_layer, "intermediate_sizes": self.intermediate_sizes,
            "heads": self.heads, "ffn": self.ffn,
        }

    @classmethod
    def from_dict(cls, d: object, source: str = "ticket") -> "Ticket":
        if not isinstance(d, dict):
            raise TicketError(f"{source}: expected a JSON object")
        if d.get("format") != TICKET_FORMAT:
            raise TicketError(f"{source}: not an earlybert_ds ticket (format {d.get('format')!r})")
        if d.get("version") != TICKET_VERSION:
            raise TicketError(f"{source}: ticket version {d.get('version')!r}; this program reads version "
                              f"{TICKET_VERSION}")
        try:
            original = d["original"]
            spec = PruneSpec(**{k: d[k] for k in ("head_ratio", "ffn_ratio", "head_method", "ffn_method",
                                                  "ffn_multiple")})
            ticket = cls(step=d["step"], reason=d["reason"], heads=d["heads"], ffn=d["ffn"], spec=spec,
                         hidden_size=original["hidden_size"], num_attention_heads=original["num_attention_heads"],
                         intermediate_size=original["intermediate_size"])
            layers = original["num_hidden_layers"]
        except (KeyError, TypeError) as e:
            raise TicketError(f"{source}: missing or malformed field {e}") from e
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in
                   (layers, ticket.hidden_size, ticket.num_attention_heads, ticket.intermediate_size)):
            raise TicketError(f"{source}: 'original' must hold positive integers, got {original}")
        if not isinstance(ticket.heads, list) or not isinstance(ticket.ffn, list) or len(ticket.heads) != layers:
            raise TicketError(f"{source}: 'heads' must list {layers} layers")
        ticket.check(source)
        return ticket

    def save(self, path: str | Path) -> Path:
        """Write ``ticket.json`` atomically (``path`` may be the file or its directory)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / TICKET_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Ticket":
        path = Path(path)
        if path.is_dir():
            path = path / TICKET_FILE
        if not path.is_file():
            raise TicketError(f"{path}: no such ticket file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TicketError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data, source=str(path))
