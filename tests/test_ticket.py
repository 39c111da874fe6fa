"""Masks from scores, mask distance, random tickets, and ticket.json validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earlybert_ds.search import read_gates, scores_of
from earlybert_ds.modeling import EarlyBertForPreTraining
from earlybert_ds.ticket import (
    Masks,
    Scores,
    PruneSpec,
    Ticket,
    TicketError,
    draw_masks,
    mask_distance,
    random_masks,
)

from conftest import randomize_gates, tiny_config


def test_layerwise_heads_global_ffn_keep_the_largest_gates():
    gates = Scores(
        heads=[np.array([0.9, -0.05, 0.4]), np.array([0.1, 0.2, -0.8])],
        ffn=[np.array([0.5, 0.01, -0.9, 0.3]), np.array([0.02, 0.03, 0.6, 0.04])],
    )
    spec = PruneSpec(head_ratio=1 / 3, ffn_ratio=0.5, head_method="layerwise", ffn_method="global")
    m = draw_masks(scores_of("magnitude", gates), spec)
    # 1 of 3 heads pruned per layer: the smallest |gate|
    assert m.kept()[0] == [[0, 2], [1, 2]]
    # 4 of 8 neurons pruned globally: |g| = .5 .01 .9 .3 | .02 .03 .6 .04 -> keep .9 .6 .5 .3
    assert m.kept()[1] == [[0, 2, 3], [2]]
    # the official code's rule ranks the signed values: -0.8 and -0.9 are the weakest, not the strongest
    signed = draw_masks(scores_of("signed", gates), spec)
    assert signed.kept()[0] == [[0, 2], [0, 1]]
    assert signed.kept()[1] == [[0, 3], [2, 3]]  # .6 .5 .3 .04 kept


def test_global_pruning_never_empties_a_layer_and_layerwise_refuses_to():
    gates = Scores(heads=[np.array([1.0, 0.9]), np.array([0.01, 0.02])],
                       ffn=[np.array([1.0, 0.9]), np.array([0.01, 0.02])])
    m = draw_masks(gates, PruneSpec(head_ratio=0.5, ffn_ratio=0.5, head_method="global", ffn_method="global"))
    assert m.kept() == ([[0, 1], [1]], [[0, 1], [1]])  # the weak layer keeps its strongest unit
    with pytest.raises(TicketError, match="layer 0 would leave it empty"):
        draw_masks(gates, PruneSpec(head_ratio=0.8, ffn_ratio=0.1, head_method="layerwise"))


def test_ffn_widths_rounded_up_to_a_multiple():
    rng = np.random.default_rng(0)
    gates = Scores(heads=[rng.random(4)] * 3, ffn=[rng.random(200), rng.random(200), rng.random(200) * 0.01])
    m = draw_masks(gates, PruneSpec(ffn_ratio=0.4, ffn_method="global", ffn_multiple=64))
    widths = [int(x.sum()) for x in m.ffn]
    assert all(w % 64 == 0 or w == 200 for w in widths), widths
    plain = [int(x.sum()) for x in draw_masks(gates, PruneSpec(ffn_ratio=0.4, ffn_method="global")).ffn]
    assert all(w >= p for w, p in zip(widths, plain))


def test_mask_distance_is_normalised_hamming():
    a = Masks([np.array([1, 1, 0, 0], bool)], [np.array([1, 0, 1, 0, 1], bool)])
    b = Masks([np.array([1, 0, 1, 0], bool)], [np.array([1, 0, 1, 0, 1], bool)])
    assert mask_distance(a, b) == {"heads": 0.5, "ffn": 0.0}


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.3", True])
def test_bad_ratios_are_refused(ratio):
    with pytest.raises(TicketError, match="ratio"):
        PruneSpec(head_ratio=ratio)


def test_random_ticket_has_the_same_shape_and_differs_by_seed():
    spec = PruneSpec()
    a, b = random_masks([12] * 4, [100] * 4, spec, seed=0), random_masks([12] * 4, [100] * 4, spec, seed=1)
    assert [int(m.sum()) for m in a.heads] == [8] * 4 and sum(int(m.sum()) for m in a.ffn) == 240
    assert mask_distance(a, b)["ffn"] > 0.2


def test_gates_read_and_l1_in_the_loss():
    import torch

    model = EarlyBertForPreTraining(tiny_config(use_gates=True, gate_l1_heads=1e-3, gate_l1_ffn=2e-4))
    randomize_gates(model)
    g = read_gates(model)
    assert [x.shape for x in g.heads] == [(4,)] * 3 and [x.shape for x in g.ffn] == [(48,)] * 3
    expected = 1e-3 * sum(np.abs(x).sum() for x in g.heads) + 2e-4 * sum(np.abs(x).sum() for x in g.ffn)
    ids = torch.randint(5, 120, (2, 9))
    out = model(ids, labels=ids)
    assert abs(out.gate_penalty.item() - expected) < 1e-5
    assert abs(out.loss.item() - out.mlm_loss.item() - expected) < 1e-5
    out.loss.backward()  # d/dg of the L1 term is coef * sign(g), on top of the task gradient
    plain = EarlyBertForPreTraining(tiny_config(use_gates=True))
    plain.load_state_dict(model.state_dict())
    plain(ids, labels=ids).loss.backward()
    g0 = model.bert.encoder.layer[0].attention.head_gates
    diff = g0.grad - plain.bert.encoder.layer[0].attention.head_gates.grad
    assert torch.allclose(diff, 1e-3 * g0.detach().sign(), atol=1e-7)
    assert model.eval()(ids, labels=ids).gate_penalty is None  # evaluation reports the task loss only


def _ticket(cfg) -> Ticket:
    model = EarlyBertForPreTraining(cfg)
    randomize_gates(model)
    return Ticket.from_masks(draw_masks(scores_of("magnitude", read_gates(model)), PruneSpec()), step=30, reason="converged",
                             spec=PruneSpec(), config=cfg)


def test_ticket_json_round_trip_and_fit(tmp_path):
    cfg = tiny_config(use_gates=True)
    t = _ticket(cfg)
    path = t.save(tmp_path)
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["step"] == 30 and data["heads_per_layer"] == [3, 3, 3]
    again = Ticket.load(tmp_path)
    assert again == t
    again.validate_for(cfg)
    with pytest.raises(TicketError, match="does not fit the model"):
        again.validate_for(tiny_config(num_hidden_layers=2))
    with pytest.raises(TicketError, match="does not fit the model"):
        again.validate_for(tiny_config(intermediate_size=64))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(format="other"), "not an earlybert_ds ticket"),
    (lambda d: d["heads"].pop(), "must list 3 layers"),
    (lambda d: d["heads"].__setitem__(0, []), "empty"),
    (lambda d: d["heads"].__setitem__(0, [3, 1]), "sorted unique"),
    (lambda d: d["ffn"].__setitem__(1, [0, 48]), r"\[0, 48\)"),
    (lambda d: d.pop("step"), "missing or malformed field 'step'"),
    (lambda d: d.update(reason="because"), "reason"),
    (lambda d: d.update(head_ratio=1.2), "ratio"),
])
def test_malformed_ticket_files_fail_clearly(tmp_path, edit, message):
    d = _ticket(tiny_config(use_gates=True)).to_dict()
    edit(d)
    (tmp_path / "ticket.json").write_text(json.dumps(d))
    with pytest.raises(TicketError, match=message):
        Ticket.load(tmp_path)


def test_ticket_file_not_json(tmp_path):
    (tmp_path / "ticket.json").write_text("{heads:")
    with pytest.raises(TicketError, match="not valid JSON"):
        Ticket.load(tmp_path)
    with pytest.raises(TicketError, match="no such ticket file"):
        Ticket.load(tmp_path / "missing")


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 60) | st.floats(allow_nan=True) | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["step", "reason", "heads", "ffn", "original", "head_ratio", "ffn_multiple",
                              "head_method", "version"]), value=json_values)
def test_fuzzed_tickets_load_or_fail_with_ticket_error(field, value):
    d = _FUZZ_BASE.to_dict()
    d[field] = value
    try:
        t = Ticket.from_dict(json.loads(json.dumps(d)))
    except TicketError:
        return
    t.validate_for(_FUZZ_CFG)  # whatever loads must be a usable ticket
    assert all(len(h) >= 1 for h in t.heads)


_FUZZ_CFG = tiny_config(use_gates=True)
_FUZZ_BASE = _ticket(_FUZZ_CFG)
