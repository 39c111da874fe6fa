"""The search stage (earlybert_ds.search): the gates' optimizer group and learning rate, the scores (magnitude,
signed, Taylor) against hand computations under ZeRO 0-3, the detection schedule, and real runs: the same ticket on
every rank of a 2-rank ZeRO-2/ZeRO-3 search, and the same-step random control."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch

from earlybert_ds.config import ConfigError, EarlyBertArgs, RunConfig, settle_detect_every
from earlybert_ds.data import load_tokenizer
from earlybert_ds.engine import lr_lambda
from earlybert_ds.modeling import EarlyBertForPreTraining, EarlyBertForSequenceClassification
from earlybert_ds.pipeline import initial_model
from earlybert_ds.pretrain import MLMTask
from earlybert_ds.search import (
    EarlyBirdDetector,
    TaylorImportance,
    ffn_gate_params,
    gate_stats,
    head_gate_params,
    read_gates,
    scores_of,
)
from earlybert_ds.ticket import Masks, PruneSpec, Scores, Ticket, TicketError, draw_masks, random_masks

from conftest import MACHINE_PRECISION, launch, metrics, run_single, tiny_config, tiny_run_args

L1_HEADS, L1_FFN, LR, GATE_LR = 1e-3, 2e-3, 1e-3, 0.05


@pytest.fixture(scope="module")
def distributed():
    """A one-process gloo group, as every run sets it up."""
    from earlybert_ds import distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port)).items():
            mp.setenv(k, v)
        dist.init()
        yield


def _gated_model() -> EarlyBertForSequenceClassification:
    torch.manual_seed(0)
    model = EarlyBertForSequenceClassification(tiny_config(use_gates=True, gate_l1_heads=L1_HEADS, gate_l1_ffn=L1_FFN,
                                                           num_labels=3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # gates as mid-search: spread, some negative, so that g and sign(g) matter
        for p in head_gate_params(model) + ffn_gate_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.5)
    return model


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (6, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 3, (6,), generator=g)}


def _hand_taylor(state: dict[str, torch.Tensor], batch: dict) -> list[np.ndarray]:
    """|g · dL_task/dg| by plain autograd on a copy of the model without the L1 term: heads then FFN, per layer."""
    model = EarlyBertForSequenceClassification(tiny_config(use_gates=True, num_labels=3))
    model.load_state_dict(state, strict=False)
    model.train()
    model(**batch).loss.backward()
    return [(p.detach() * p.grad).abs().double().numpy() for p in head_gate_params(model) + ffn_gate_params(model)]


def _config(stage: int) -> RunConfig:
    cfg = RunConfig()
    cfg.train.zero_stage, cfg.train.precision, cfg.train.lr, cfg.train.micro_batch_size = stage, "fp32", LR, 6
    cfg.train.steps, cfg.train.warmup_steps, cfg.train.schedule = 10, 0, "constant"
    cfg.train.weight_decay = 0.5  # large: a decayed gate would visibly shrink
    cfg.train.clip_grad, cfg.train.eps = 0.0, 1e-12  # Adam's first step is then lr · sign(grad), exactly
    cfg.earlybert.gate_lr = GATE_LR
    return cfg


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gate_group_and_taylor_under_zero(distributed, stage):
    """Under every ZeRO stage: the gates train in their own undecayed group at gate_lr, and the Taylor importance
    accumulated over two steps equals |g · dL/dg| computed by hand on the weights of each step."""
    from earlybert_ds.engine import Engine

    model = _gated_model()
    engine = Engine(model, _config(stage))
    try:
        groups = [g for g in engine.optimizer.param_groups if g["lr"] == pytest.approx(GATE_LR)]
        assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
        assert sorted(g["lr"] for g in engine.optimizer.param_groups) == sorted([LR, LR, GATE_LR])
        taylor, expected = TaylorImportance(L1_HEADS, L1_FFN), None
        before = read_gates(engine.module, engine.optimizer)
        for step in range(2):
            state = engine.full_state_dict()
            hand = _hand_taylor(state, _batch(step))
            expected = hand if expected is None else [a + b for a, b in zip(expected, hand)]
            engine.train_step([_batch(step)], step, lambda: taylor.accumulate(engine.module, engine.optimizer))
            if step == 0:  # Adam's first step moves every gate by exactly its lr (no decay on gates)
                after = read_gates(engine.module, engine.optimizer)
                moved = np.concatenate([np.abs(a - b) for a, b in zip(after.heads + after.ffn,
                                                                      before.heads + before.ffn)])
                assert moved == pytest.approx(GATE_LR, rel=1e-3)
        got = taylor.total.heads + taylor.total.ffn
        assert [a.shape for a in got] == [(4,)] * 3 + [(48,)] * 3
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)
        assert taylor.digest() and json.dumps(taylor.state_dict())
    finally:
        engine.destroy()


def test_scores_rank_by_magnitude_signed_or_taylor():
    gates = Scores(heads=[np.array([0.9, -1.2, 0.1])], ffn=[np.array([0.5, -0.7, 0.2, 0.0])])
    spec = PruneSpec(head_ratio=1 / 3, ffn_ratio=0.5)
    assert draw_masks(scores_of("magnitude", gates), spec).kept() == ([[0, 1]], [[0, 1]])
    assert draw_masks(scores_of("signed", gates), spec).kept() == ([[0, 2]], [[0, 2]])
    taylor = TaylorImportance(0.0, 0.0)
    assert draw_masks(scores_of("taylor", gates, taylor), spec).kept() == ([[0, 1]], [[0, 1]])  # none yet: |gate|
    taylor.total = Scores([np.array([0.0, 0.1, 3.0])], [np.array([0.0, 0.1, 0.3, 0.2])])
    assert draw_masks(scores_of("taylor", gates, taylor), spec).kept() == ([[1, 2]], [[2, 3]])
    clone = TaylorImportance(0.0, 0.0)
    clone.load_state_dict(json.loads(json.dumps(taylor.state_dict())))
    assert clone.digest() == taylor.digest()


def test_taylor_decay_discounts_earlier_steps_by_hand():
    """Two steps of a 1-head, 2-neuron toy model: total = decay * |g·(dL/dg)|_1 + |g·(dL/dg)|_2, with the L1 term's
    gradient coef·sign(g) taken out of each."""
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head_gates = torch.nn.Parameter(torch.tensor([0.5]))
            self.ffn_gates = torch.nn.Parameter(torch.tensor([2.0, -1.0]))

    toy, coef = Toy(), 0.1
    steps = [(torch.tensor([0.3]), torch.tensor([0.2, 0.4])), (torch.tensor([-0.1]), torch.tensor([0.6, -0.2]))]
    for decay, expect_h, expect_f in ((1.0, [0.1 + 0.1], [0.2 + 1.0, 0.5 + 0.1]),
                                      (0.5, [0.5 * 0.1 + 0.1], [0.5 * 0.2 + 1.0, 0.5 * 0.5 + 0.1])):
        taylor = TaylorImportance(coef, coef, decay)
        for gh, gf in steps:  # |g·(grad - coef·sign g)|: head 0.5·(0.3-0.1), 0.5·|-0.1-0.1|; ffn 2·(0.2-0.1) ...
            toy.head_gates.grad, toy.ffn_gates.grad = gh, gf
            taylor.accumulate(toy, None)
        assert taylor.total.heads[0] == pytest.approx(expect_h) and taylor.total.ffn[0] == pytest.approx(expect_f)


def test_gate_stats_sparsity_and_spread():
    stats = gate_stats(Scores(heads=[np.array([1.0, 0.0]), np.array([0.005, -1.0])], ffn=[np.array([2.0, 2.0])]))
    assert stats["gate_sparsity/heads"] == 0.5 and stats["gate_sparsity/ffn"] == 0.0
    assert stats["gate_spread/heads"] == pytest.approx(np.std([1.0, 0.0, 0.005, -1.0]))
    assert stats["gate_spread/ffn"] == 0.0


def test_early_bird_detector_window_and_state_round_trip():
    det = EarlyBirdDetector(window=3, epsilon=0.1)
    heads = [np.array([True, False, True, True])]
    ffn = np.zeros(20, bool)
    seq, pos = [Masks(heads, [ffn.copy()])], 0
    for k in (8, 6, 1, 0, 2, 0):  # flip k fresh bits: consecutive distances .4 .3 .05 0 .1 0
        ffn[pos:pos + k] = ~ffn[pos:pos + k]
        pos += k
        seq.append(Masks(heads, [ffn.copy()]))
    verdicts = []
    for i, masks in enumerate(seq):
        det.update(masks)
        verdicts.append(det.converged)
        if i == 3:  # checkpoint mid-way and continue in a new detector: same decisions
            clone = EarlyBirdDetector()
            clone.load_state_dict(json.loads(json.dumps(det.state_dict())))
            det = clone
    assert verdicts == [False, False, False, False, False, True, True]


def test_detector_rejects_bad_thresholds():
    for eps in (0.0, -0.1, float("inf")):
        with pytest.raises(TicketError, match="epsilon"):
            EarlyBirdDetector(epsilon=eps)
    with pytest.raises(TicketError, match="window"):
        EarlyBirdDetector(window=0)


@pytest.mark.parametrize("budget,window,expected", [(16, 5, 1), (100, 5, 8), (13, 3, 1), (400, 5, 33)])
def test_detect_every_fits_the_search_budget(budget, window, expected):
    e = EarlyBertArgs(max_search_steps=budget, window=window)
    settle_detect_every(e)
    assert e.detect_every == expected
    assert (window + 1) * e.detect_every <= budget / 2 or e.detect_every == 1
    given = EarlyBertArgs(detect_every=7)
    settle_detect_every(given)
    assert given.detect_every == 7
    fixed = EarlyBertArgs(draw="random_at", fixed_step=24, max_search_steps=2)
    settle_detect_every(fixed)
    assert fixed.detect_every == 2  # the fixed step is the budget


@pytest.mark.parametrize("field,value,needle", [
    ("gate_lr", 0.0, "earlybert.gate_lr"), ("rewarmup_steps", -1, "earlybert.rewarmup_steps"),
    ("detect_every", 0, "earlybert.detect_every"), ("fixed_step", 0, "earlybert.fixed_step=0"),
])
def test_bad_search_fields_name_the_field(field, value, needle):
    cfg = RunConfig()
    setattr(cfg.earlybert, field, value)
    with pytest.raises(ConfigError, match=needle):
        cfg.validate()


# ---- real runs ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_taylor_search_two_ranks_same_ticket(corpus, tmp_path, stage):
    """A 2-rank ZeRO-2/3 search with Taylor scores: every rank accumulates the same scores (the stage checks it at
    every draw) and switches with the same ticket, drawn by convergence."""
    out = tmp_path / "run"
    proc = launch(tiny_run_args(*corpus, out, **{"train.zero_stage": stage, "train.precision": MACHINE_PRECISION,
                                                 "earlybert.score": "taylor", "earlybert.gate_lr": 0.05,
                                                 "train.save_every": 100}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ticket = Ticket.load(out / "ticket")
    assert ticket.reason == "converged" and ticket.step < 20
    latest = (out / "checkpoints" / "latest").read_text()
    digests = {torch.load(out / "checkpoints" / latest / f"rank{r}.pt", weights_only=True)["ticket"] for r in (0, 1)}
    assert digests == {ticket.digest()}
    assert any("gate_spread/ffn" in m for m in metrics(out))


def _given(tmp_path, hidden: int = 32) -> tuple[Ticket, str]:
    """A hand-made ticket for the tiny model of ``tiny_run_args`` (with its own ratios), saved to a file."""
    ticket = Ticket(step=11, reason="converged", heads=[[0, 2], [1, 2, 3]], ffn=[list(range(0, 64, 2)), [5, 9]],
                    spec=PruneSpec(head_ratio=0.5, ffn_ratio=0.5, ffn_method="global", ffn_multiple=1),
                    hidden_size=hidden, num_attention_heads=4, intermediate_size=64)
    return ticket, str(ticket.save(tmp_path / f"given{hidden}.json"))


@pytest.mark.slow
def test_given_ticket_trains_from_step_0(corpus, tmp_path):
    """draw=given: no search; the given ticket's very units from step 0, the kept weights the initial model's."""
    given, path = _given(tmp_path)
    out = tmp_path / "run"
    proc = run_single(tiny_run_args(*corpus, out, **{"earlybert.draw": "given", "earlybert.ticket": path,
                                                     "train.save_every": 0, "train.steps": 8}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ticket = Ticket.load(out / "ticket")
    assert (ticket.step, ticket.reason, ticket.spec) == (0, "given", given.spec)
    assert (ticket.heads, ticket.ffn) == (given.heads, given.ffn)
    summary = json.loads((out / "summary.json").read_text())
    assert "search" not in summary["stages"] and summary["steps"] == 8
    small = EarlyBertForPreTraining.from_pretrained(out / "final").config
    assert small.heads_per_layer == [2, 3] and small.intermediate_sizes == [32, 2]
    cfg = RunConfig.from_dict(json.loads((out / "run_config.json").read_text()))
    task = MLMTask.__new__(MLMTask)
    task.tokenizer = load_tokenizer(out / "ticket")
    init = initial_model(cfg, task, gates=True).bert.encoder.layer[1].ffn.intermediate.weight
    kept = EarlyBertForPreTraining.from_pretrained(out / "ticket").bert.encoder.layer[1].ffn.intermediate.weight
    assert torch.equal(kept, init[[5, 9]])  # rewound: the given rows of the initial weights


@pytest.mark.slow
def test_given_ticket_that_does_not_fit_fails_before_training(corpus, tmp_path):
    _, path = _given(tmp_path, hidden=48)
    proc = run_single(tiny_run_args(*corpus, tmp_path / "run", **{"earlybert.draw": "given",
                                                                  "earlybert.ticket": path}))
    assert proc.returncode != 0
    assert "earlybert.ticket" in proc.stderr and "does not fit the model" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["rewind", "continue"])
def test_same_step_random_control(corpus, tmp_path, weights):
    """draw=random_at: the same search, then a random ticket at the requested step (the seed's random masks), with
    the requested weights rule; the efficient stage re-warms its learning rate up over rewarmup_steps."""
    out, step, rewarm = tmp_path / "run", 7, 4
    args = {"earlybert.draw": "random_at", "earlybert.fixed_step": step, "earlybert.weights": weights,
            "earlybert.rewarmup_steps": rewarm, "train.save_every": 0, "train.seed": 3}
    proc = run_single(tiny_run_args(*corpus, out, **args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ticket = Ticket.load(out / "ticket")
    assert (ticket.step, ticket.reason) == (step, "random")
    cfg = RunConfig.from_dict(json.loads((out / "run_config.json").read_text()))
    expected = random_masks([4, 4], [64, 64], PruneSpec(ffn_multiple=1), seed=3)
    assert ticket.masks().kept() == expected.kept()
    # the weights rule: rewind starts the kept weights from the initial model, continue from the searched one
    task = MLMTask.__new__(MLMTask)  # only its model class and tokenizer: the initial model is rebuilt from them
    task.tokenizer = load_tokenizer(out / "ticket")
    init = initial_model(cfg, task, gates=True).bert.embeddings.word_embeddings.weight
    small = EarlyBertForPreTraining.from_pretrained(out / "ticket").bert.embeddings.word_embeddings.weight
    assert torch.equal(small, init) == (weights == "rewind")
    # the logged lr (the rate each step was taken at) after the switch: the schedule at the run's step times the
    # re-warm-up factor, by hand
    lr = {m["step"]: m["lr"] for m in metrics(out) if "lr" in m}
    base = lr_lambda(cfg)
    for k in range(rewarm + 2):  # the (k + 1)-th efficient step, the run's step + k (0-based), logged as step + k + 1
        assert lr[step + 1 + k] == pytest.approx(cfg.train.lr * base(step + k) * min(1.0, (k + 1) / rewarm))
