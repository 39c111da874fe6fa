"""FLOPs and parameters of a (ticket-shaped) BERT, to state what shrinking buys before measuring it.

Counts the matrix multiplications of one token's forward pass (2 FLOPs per multiply-add); layer norms, softmax,
activations and embedding look-ups are left out, as is customary (they are well under 1% at BERT shapes).
A training step costs three times the forward pass (forward, and backward for activations and weights).
"""

from __future__ import annotations

from .modeling import EarlyBertConfig


def forward_flops_per_token(
    config: EarlyBertConfig, seq_len: int, mlm_fraction: float = 0.15, include_head: bool = True
) -> dict[str, float]:
    """Forward FLOPs per token, by part: ``attention`` (q/k/v and output projections), ``scores`` (QK^T and the
    weighted sum over ``seq_len`` positions), ``ffn``, ``head`` (the MLM head, applied to the ``mlm_fraction`` of
    tokens that are masked), and ``total``."""
    h, d = config.hidden_size, config.head_size
    attention = scores = ffn = 0.0
    for i in range(config.num_hidden_layers):
        inner = config.layer_heads(i) * d
        attention += 2 * h * 3 * inner + 2 * inner * h
        scores += 2 * 2 * seq_len * inner
        ffn += 2 * 2 * h * config.layer_ffn(i)
    head = mlm_fraction * (2 * h * h + 2 * h * config.vocab_size) if include_head else 0.0
    return {"attention": attention, "scores": scores, "ffn": ffn, "head": head,
            "total": attention + scores + ffn + head}


def train_flops_per_token(config: EarlyBertConfig, seq_len: int, mlm_fraction: float = 0.15) -> float:
    """FLOPs of one training step per token (forward + backward = 3 x forward)."""
    return 3 * forward_flops_per_token(config, seq_len, mlm_fraction)["total"]


def count_parameters(config: EarlyBertConfig, model_class: type | None = None) -> int:
    """Parameters of ``model_class`` (default: the pre-training model) built from ``config`` (tied embeddings
    counted once), without allocating it."""
    import torch

    from .modeling import EarlyBertForPreTraining

    with torch.device("meta"):
        return (model_class or EarlyBertForPreTraining)(config).num_parameters()
