"""Slimming gates: the search stage's learnable per-head and per-neuron scalars, their L1 cost, and reading them.

The gates themselves live in the model (``SelfAttention.head_gates``, ``FeedForward.ffn_gates``, created when
``config.use_gates``), and so does their L1 term (``config.gate_l1_heads`` / ``gate_l1_ffn``, added to the loss in
the forward pass, where ZeRO-3 has the gates gathered); this module is what the training loop and the ticket need
to know about them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from .modeling import FeedForward, SelfAttention


def head_gate_params(model: nn.Module) -> list[nn.Parameter]:
    """The per-layer head gates, in layer order (empty for a model built without gates)."""
    return [m.head_gates for m in model.modules() if isinstance(m, SelfAttention) and m.head_gates is not None]


def ffn_gate_params(model: nn.Module) -> list[nn.Parameter]:
    """The per-layer FFN-neuron gates, in layer order (empty for a model built without gates)."""
    return [m.ffn_gates for m in model.modules() if isinstance(m, FeedForward) and m.ffn_gates is not None]


def is_gate(name: str) -> bool:
    """Whether a parameter name is a slimming gate (excluded from weight decay: the L1 term regularises it)."""
    return name.endswith(("head_gates", "ffn_gates"))


@dataclass
class GateValues:
    """All gate values as plain float32 arrays, one per layer."""

    heads: list[np.ndarray]
    ffn: list[np.ndarray]

    def sparsity(self, threshold: float = 1e-2) -> dict[str, float]:
        """Fraction of gates whose magnitude is below ``threshold`` (how far the L1 term has pushed them)."""
        def frac(arrays: list[np.ndarray]) -> float:
            flat = np.concatenate(arrays) if arrays else np.zeros(0)
            return float((np.abs(flat) < threshold).mean()) if flat.size else 0.0

        return {"heads": frac(self.heads), "ffn": frac(self.ffn)}


def read_gates(model: nn.Module, optimizer: object = None) -> GateValues:
    """Every gate as a numpy array: from the optimizer's fp32 master copy under mixed precision (pass the DeepSpeed
    optimizer), gathered under ZeRO-3 (a collective there: every rank must call it)."""
    from .distributed import full_fp32

    return GateValues(heads=[full_fp32(p, optimizer).numpy() for p in head_gate_params(model)],
                      ffn=[full_fp32(p, optimizer).numpy() for p in ffn_gate_params(model)])
