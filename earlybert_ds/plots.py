"""Figures for runs and benchmarks, written as PNG files (Agg backend: no display needed on training nodes).

Each function writes ``path`` and returns it, so callers can hand it on to :meth:`Monitor.log_image`. matplotlib is
an optional dependency (``pip install earlybert-ds[plots]``), imported by the first figure: without it, drawing one
raises ModuleNotFoundError, and nothing else needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@cache
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # before pyplot loads
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_mask_distances(steps: Sequence[int], head_dists: Sequence[float], ffn_dists: Sequence[float],
                        epsilon: float, drawn_step: int | None, path: str | Path) -> Path:
    """The EarlyBERT paper's convergence figure: distance between consecutive masks against the search step,
    for heads and FFN neurons, with the threshold ε and the step where the ticket was drawn (if it was)."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 4))
    ax.plot(steps, head_dists, marker="o", ms=3, label="attention heads")
    ax.plot(steps, ffn_dists, marker="s", ms=3, label="FFN neurons")
    ax.axhline(epsilon, color="gray", ls="--", lw=1, label=f"ε = {epsilon:g}")
    if drawn_step is not None:
        ax.axvline(drawn_step, color="tab:red", lw=1.5, label=f"ticket drawn (step {drawn_step})")
    ax.set(xlabel="training step", ylabel="normalised mask distance", title="Early-bird ticket detection")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _ragged(arrays: Sequence[np.ndarray], fill: float) -> np.ndarray:
    """Stack per-layer arrays of possibly different lengths into one matrix, padding with ``fill``."""
    out = np.full((len(arrays), max((a.size for a in arrays), default=0)), fill)
    for i, a in enumerate(arrays):
        out[i, :a.size] = a
    return out


def plot_gates(head_gates: Sequence[np.ndarray], ffn_gates: Sequence[np.ndarray], path: str | Path,
               head_masks: Sequence[np.ndarray] | None = None, ffn_masks: Sequence[np.ndarray] | None = None) -> Path:
    """Gate magnitudes per layer: a layer×head heatmap of |head gate| and, per layer, the FFN gates' |values|
    sorted in decreasing order. With keep-masks (True = kept), pruned heads get an ✕ and pruned FFN neurons are
    drawn as grey dots, showing where the ticket cut each layer."""
    fig, (ax_h, ax_f) = _pyplot().subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.4]},
                                     layout="constrained")
    heat = _ragged([np.abs(np.asarray(g, dtype=float)) for g in head_gates], np.nan)
    im = ax_h.imshow(heat, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax_h, label="|head gate|")
    if head_masks is not None:
        pruned = np.argwhere(_ragged([~np.asarray(m, dtype=bool) for m in head_masks], 0).astype(bool))
        ax_h.scatter(pruned[:, 1], pruned[:, 0], marker="x", color="white", s=40)
    ax_h.set(xlabel="head", ylabel="layer", xticks=range(heat.shape[1]), yticks=range(heat.shape[0]),
             title="Attention-head gates" + (" (✕ pruned)" if head_masks is not None else ""))

    colors = _pyplot().get_cmap("viridis")(np.linspace(0, 0.9, max(len(ffn_gates), 1)))
    for layer, g in enumerate(ffn_gates):
        mag = np.abs(np.asarray(g, dtype=float))
        order = np.argsort(-mag, kind="stable")
        ax_f.plot(np.arange(mag.size), mag[order], color=colors[layer], lw=1.2, label=f"layer {layer}")
        if ffn_masks is not None:
            gone = ~np.asarray(ffn_masks[layer], dtype=bool)[order]
            ax_f.scatter(np.flatnonzero(gone), mag[order][gone], color="gray", s=4, zorder=3,
                         label="pruned" if layer == 0 else None)
    ax_f.set(xlabel="neuron rank (by |gate|)", ylabel="|FFN gate|", title="FFN-neuron gates, sorted per layer")
    ax_f.grid(alpha=0.3)
    ax_f.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def plot_curves(series: dict[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str, path: str | Path,
                title: str = "") -> Path:
    """One line per named series of (x, y) points, e.g. validation loss against wall-clock time for several runs."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 4))
    for name, points in series.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_intervals(points: dict[str, tuple[float, float, float, float]], xlabel: str, ylabel: str,
                   path: str | Path, title: str = "") -> Path:
    """One point per named method at (x, y) with its 95% intervals: ``name -> (x, x half-width, y, y half-width)``,
    e.g. mean dev accuracy against mean CPU time relative to the full model, over seeds."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.4))
    for name, (x, dx, y, dy) in points.items():
        ax.errorbar([x], [y], xerr=[dx], yerr=[dy], marker="o", ms=5, capsize=3, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
