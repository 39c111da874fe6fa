"""Physical shrinking keeps the function of the gated model with pruned gates at zero, and costs fewer FLOPs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from earlybert_ds.flops import forward_flops_per_token, train_flops_per_token
from earlybert_ds.search import ffn_gate_params, head_gate_params, read_gates, scores_of
from earlybert_ds.modeling import (
    EarlyBertConfig,
    EarlyBertForPreTraining,
    EarlyBertForQuestionAnswering,
    EarlyBertForSequenceClassification,
)
from earlybert_ds.shrink import shrink
from earlybert_ds.ticket import PruneSpec, Ticket, TicketError, draw_masks

from conftest import randomize_gates, tiny_config


def _searched(model_cls, **kw):
    torch.manual_seed(0)
    model = model_cls(tiny_config(use_gates=True, **kw)).eval()
    randomize_gates(model)
    spec = PruneSpec(head_ratio=0.5, ffn_ratio=0.4, ffn_method="global")
    ticket = Ticket.from_masks(draw_masks(scores_of("magnitude", read_gates(model)), spec), 10, "converged", spec, model.config)
    return model, ticket


def _zero_pruned_gates(model, ticket):
    """The reference: the gated model with every pruned gate set to zero."""
    masks = ticket.masks()
    with torch.no_grad():
        for g, m in zip(head_gate_params(model), masks.heads):
            g[~torch.from_numpy(m)] = 0
        for g, m in zip(ffn_gate_params(model), masks.ffn):
            g[~torch.from_numpy(m)] = 0


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (4, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    return ids, mask


@pytest.mark.parametrize("model_cls, out", [(EarlyBertForPreTraining, "logits"),
                                            (EarlyBertForSequenceClassification, "logits"),
                                            (EarlyBertForQuestionAnswering, "start_logits")])
def test_shrunk_model_computes_what_the_gated_model_computes(model_cls, out):
    model, ticket = _searched(model_cls)
    small = shrink(model, ticket)
    _zero_pruned_gates(model, ticket)
    ids, mask = _inputs()
    with torch.no_grad():
        ref, got = getattr(model(ids, mask), out), getattr(small(ids, mask), out)
    valid = mask.bool() if ref.dim() >= 2 and ref.shape[:2] == mask.shape else slice(None)
    assert (ref - got)[valid].abs().max() < 1e-5
    # physically smaller: smaller matrices, no gates
    assert not [n for n, _ in small.named_parameters() if n.endswith("_gates")]
    for i, layer in enumerate(small.bert.encoder.layer):
        assert layer.attention.qkv.weight.shape == (3 * 8 * len(ticket.heads[i]), 32)
        assert layer.ffn.intermediate.weight.shape == (len(ticket.ffn[i]), 32)
        assert layer.ffn.output.weight.shape == (32, len(ticket.ffn[i]))
    assert small.num_parameters() < model.num_parameters()


def test_shrunk_model_saves_and_loads_with_auto_classes(tmp_path):
    model, ticket = _searched(EarlyBertForSequenceClassification, num_labels=3)
    small = shrink(model, ticket).eval()
    small.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.heads_per_layer == ticket.heads_per_layer
    ids, mask = _inputs()
    with torch.no_grad():
        assert torch.allclose(small(ids, mask).logits, loaded(ids, mask).logits, atol=1e-6)


def test_shrink_without_folding_rewinds_to_plain_weights():
    model, ticket = _searched(EarlyBertForPreTraining)
    small = shrink(model, ticket, fold_gates=False)
    w, sw = model.bert.encoder.layer[0].ffn.output.weight, small.bert.encoder.layer[0].ffn.output.weight
    assert torch.equal(sw, w[:, ticket.ffn[0]])


def test_shrink_refuses_a_ticket_for_another_shape():
    model, ticket = _searched(EarlyBertForPreTraining)
    other = EarlyBertForPreTraining(tiny_config(num_hidden_layers=2, use_gates=True))
    with pytest.raises(TicketError, match="does not fit the model"):
        shrink(other, ticket)
    with pytest.raises(TicketError, match="already shrunk"):
        shrink(shrink(model, ticket), ticket)


def test_flop_counter_against_hand_computed_values():
    # BERT-base, seq 128, no MLM head: per layer 4*2*768*768 (projections) + 2*2*128*768 (scores)
    # + 2*2*768*3072 (FFN) = 4,718,592 + 393,216 + 9,437,184 = 14,548,992; x12 layers = 174,587,904
    base = EarlyBertConfig()
    f = forward_flops_per_token(base, seq_len=128, include_head=False)
    assert f["total"] == 174_587_904
    # MLM head on 15% of tokens: 0.15 * (2*768*768 + 2*768*30522) = 0.15 * (1,179,648 + 46,881,792) = 7,209,216
    assert forward_flops_per_token(base, 128)["head"] == pytest.approx(7_209_216)
    assert train_flops_per_token(base, 128) == pytest.approx(3 * (174_587_904 + 7_209_216))
    # Paper ratios: 8 of 12 heads everywhere, 60% of the FFN: attention parts scale by 2/3, FFN by 0.6
    small = EarlyBertConfig(heads_per_layer=[8] * 12, intermediate_sizes=[1843] * 12)
    s = forward_flops_per_token(small, 128, include_head=False)
    assert s["attention"] == pytest.approx(f["attention"] * 8 / 12)
    assert s["ffn"] == 12 * 2 * 2 * 768 * 1843
