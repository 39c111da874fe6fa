"""Physical shrinking: from a (gated) model and a ticket, a *smaller* model with smaller matrices.

Only the kept heads' rows of the fused q/k/v projection and the kept columns of the attention output projection
survive; likewise the kept rows of the FFN's first linear layer and columns of its second. Each kept gate's value is
folded into the linear layer that follows it, so the shrunk model computes exactly what the gated model computes
with the pruned gates set to zero — and carries no gates, so it costs nothing extra.
"""

from __future__ import annotations

import torch

from .modeling import EarlyBertConfig, EarlyBertPreTrainedModel
from .ticket import Ticket


def shrunk_config(config: EarlyBertConfig, ticket: Ticket) -> EarlyBertConfig:
    """The ticket-shaped configuration (per-layer heads and FFN widths), without gates."""
    ticket.validate_for(config)
    d = config.to_dict()
    d.update(heads_per_layer=ticket.heads_per_layer, intermediate_sizes=ticket.intermediate_sizes, use_gates=False,
             gate_l1_heads=0.0, gate_l1_ffn=0.0)
    return EarlyBertConfig.from_dict(d)


def _layer_prefixes(state: dict[str, torch.Tensor], num_layers: int) -> list[str]:
    """The key prefix of each encoder layer (``bert.encoder.layer.N.`` or ``encoder.layer.N.``)."""
    qkv = [k for k in state if k.endswith("attention.qkv.weight")]
    out = []
    for i in range(num_layers):
        match = [k for k in qkv if k.endswith(f"encoder.layer.{i}.attention.qkv.weight")]
        if len(match) != 1:
            raise ValueError(f"state dict has no unique encoder layer {i}")
        out.append(match[0][: -len("attention.qkv.weight")])
    return out


@torch.no_grad()
def shrink_state_dict(
    state: dict[str, torch.Tensor], config: EarlyBertConfig, ticket: Ticket, fold_gates: bool = True
) -> dict[str, torch.Tensor]:
    """Select the ticket's heads and neurons from an unpruned ``state`` (gated or not) and fold the gates.

    ``fold_gates=False`` drops the gates instead (used when rewinding to weights whose gates were never trained).
    """
    ticket.validate_for(config)
    hs, inner = config.head_size, config.num_attention_heads * config.head_size
    out = {k: v for k, v in state.items() if not k.endswith(("head_gates", "ffn_gates"))}
    for i, p in enumerate(_layer_prefixes(state, config.num_hidden_layers)):
        heads = torch.tensor(ticket.heads[i])
        cols = (heads[:, None] * hs + torch.arange(hs)).reshape(-1)  # kept columns of the context
        rows = torch.cat([cols, cols + inner, cols + 2 * inner])  # kept rows of q, k and v
        neurons = torch.tensor(ticket.ffn[i])
        dense_w = state[p + "attention.dense.weight"][:, cols]
        ffn_out_w = state[p + "ffn.output.weight"][:, neurons]
        if fold_gates and p + "attention.head_gates" in state:
            gate = state[p + "attention.head_gates"].to(dense_w.dtype)[heads].repeat_interleave(hs)
            dense_w = dense_w * gate
            ffn_out_w = ffn_out_w * state[p + "ffn.ffn_gates"].to(ffn_out_w.dtype)[neurons]
        out[p + "attention.qkv.weight"] = state[p + "attention.qkv.weight"][rows].clone()
        out[p + "attention.qkv.bias"] = state[p + "attention.qkv.bias"][rows].clone()
        out[p + "attention.dense.weight"] = dense_w.contiguous()
        out[p + "ffn.intermediate.weight"] = state[p + "ffn.intermediate.weight"][neurons].clone()
        out[p + "ffn.intermediate.bias"] = state[p + "ffn.intermediate.bias"][neurons].clone()
        out[p + "ffn.output.weight"] = ffn_out_w.contiguous()
    return out


def shrink(model: EarlyBertPreTrainedModel, ticket: Ticket, fold_gates: bool = True) -> EarlyBertPreTrainedModel:
    """A new model of the same class, physically shrunk to ``ticket``, on the same device and dtype."""
    config = shrunk_config(model.config, ticket)
    small = type(model)(config)
    state = shrink_state_dict(model.state_dict(), model.config, ticket, fold_gates=fold_gates)
    small.load_state_dict(state, strict=True)
    small.tie_weights()
    param = next(model.parameters())
    return small.to(device=param.device, dtype=param.dtype).train(model.training)
