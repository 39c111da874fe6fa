"""Slimming gates: the search stage's learnable per-head and per-neuron scalars, their L1 cost, and reading them.

The gates themselves live in the model (``SelfAttention.head_gates``, ``FeedForward.ffn_gates``, created when
``config.use_gates``); this module is everything the training loop and the ticket need to know about them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
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


def l1_penalty(model: nn.Module, lambda_heads: float, lambda_ffn: float) -> torch.Tensor:
    """``lambda_heads * sum|head gates| + lambda_ffn * sum|ffn gates|``, as in the official EarlyBERT code.

    A raw sum (not a mean), so the coefficients are those of the paper. Zero (and no graph) without gates.
    """
    heads, ffn = head_gate_params(model), ffn_gate_params(model)
    if not heads and not ffn:
        return torch.zeros(())
    total = sum(lambda_heads * g.float().abs().sum() for g in heads)
    return total + sum(lambda_ffn * g.float().abs().sum() for g in ffn)


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


def _gathered(params: list[nn.Parameter]):
    """Under ZeRO-3 the gates are partitioned: gather them for reading (collective: every rank must enter)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def read_gates(model: nn.Module) -> GateValues:
    """Read every gate as numpy arrays; works on a plain module and under ZeRO-3 (where it is a collective)."""
    heads, ffn = head_gate_params(model), ffn_gate_params(model)
    with _gathered(heads + ffn):
        return GateValues(
            heads=[p.detach().float().cpu().numpy().copy() for p in heads],
            ffn=[p.detach().float().cpu().numpy().copy() for p in ffn],
        )
