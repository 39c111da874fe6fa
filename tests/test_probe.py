"""The probe route (earlybert_ds.probe, ``earlybert.draw probe``): the probe trains the classifier head alone, the
Taylor and Fisher scores against finite differences, per-layer normalisation, and real 2-rank ZeRO-2/ZeRO-3 runs
that draw one ticket on every rank, the same as one process draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from earlybert_ds.config import ConfigError, EarlyBertArgs, RunConfig
from earlybert_ds.finetune import ClassificationTask
from earlybert_ds.modeling import (EarlyBertForQuestionAnswering, EarlyBertForSequenceClassification,
                                   classification_loss)
from earlybert_ds.pipeline import initial_model
from earlybert_ds.probe import (check_probe, in_order, normalise_layers, pooled_features, probe_and_draw,
                                probe_head, score_batches, unit_scores)
from earlybert_ds.search import ffn_gate_params, head_gate_params, prune_spec
from earlybert_ds.tasks import TaskDataset
from earlybert_ds.ticket import Scores, Ticket, draw_masks

from conftest import WORDS, launch, run_single, tiny_bert_dir, tiny_config

def _data(n: int, seed: int, labels: int = 3) -> TaskDataset:
    """Rows of uneven length whose label says which third of the vocabulary their tokens come from: learnable from
    the pooled features even of a random encoder."""
    g = np.random.default_rng(seed)
    feats, ys = [], []
    for _ in range(n):
        y = int(g.integers(labels))
        ids = [2] + g.integers(5 + 38 * y, 5 + 38 * (y + 1), g.integers(4, 11)).tolist() + [3]
        feats.append({"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": [0] * len(ids)})
        ys.append(y)
    return TaskDataset(feats, ys, pad_token_id=0, regression=False)


def _model(seed: int = 0, **kw) -> EarlyBertForSequenceClassification:
    torch.manual_seed(seed)
    return EarlyBertForSequenceClassification(tiny_config(use_gates=True, num_labels=3, gate_l1_heads=1e-3,
                                                          gate_l1_ffn=1e-3, initializer_range=0.2, **kw))


def test_probe_trains_the_head_only():
    """The probe changes the classifier head and nothing else: every encoder weight and gate bit-identical before
    and after, the head's loss on its features lower than the fresh head's."""
    model, data = _model(), _data(96, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    e = EarlyBertArgs(probe_examples=64, probe_epochs=30, probe_lr=0.1)
    head, metrics = probe_head(model, data, e, micro=16, seed=0, device=torch.device("cpu"))
    assert set(head) == {"classifier.weight", "classifier.bias"}
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the model itself untouched
    assert not torch.equal(head["classifier.weight"], before["classifier.weight"])
    x, y = pooled_features(model, data, np.arange(96)[np.random.default_rng(0).permutation(96)[:64]], 16,
                           torch.device("cpu"))
    with torch.no_grad():
        fresh = float(classification_loss(model.classifier(x), y))
    assert metrics["probe/examples"] == 64 and metrics["probe/loss"] < 0.7 * fresh
    assert metrics["probe/accuracy"] > 0.7  # chance is 1/3
    ticket, drawn_head, m = probe_and_draw(model, data, EarlyBertArgs(probe_examples=64, probe_epochs=30,
                                                                     probe_lr=0.1, probe_batches=3, ffn_multiple=1),
                                           micro=16, seed=0)
    assert all(torch.equal(drawn_head[k], head[k]) for k in head)  # seeded: the same head again
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items() if not k.startswith("classifier."))
    assert (ticket.step, ticket.reason, ticket.heads_per_layer) == (0, "probe", [3, 3, 3])
    assert m["probe/loss"] == metrics["probe/loss"] and m["probe/seconds"] > 0


def _loss64(model: EarlyBertForSequenceClassification, batch: dict) -> float:
    """The batch's mean cross-entropy computed in float64 from the float64 model's logits."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return float(F.cross_entropy(logits.double(), batch["labels"]))


def test_taylor_and_fisher_against_finite_differences():
    """Each gate's dL/dg by central finite differences of the float64 model's loss (no autograd), per batch:
    Taylor = Σ_batches |g · dL/dg| and Fisher = Σ_batches (dL/dg)², the gates spread away from 1 so that g matters."""
    model, data = _model(1, num_hidden_layers=2, intermediate_size=8), _data(40, 1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in head_gate_params(model) + ffn_gate_params(model):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    model.double().eval()
    batches = score_batches(len(data), 8, 2, seed=0)
    assert [len(b) for b in batches] == [8, 8] and len(set(np.concatenate(batches))) == 16
    taylor = unit_scores(model, data, batches, "taylor", torch.device("cpu"))
    fisher = unit_scores(model, data, batches, "fisher", torch.device("cpu"))
    gates, eps = head_gate_params(model) + ffn_gate_params(model), 1e-6
    want_t = [np.zeros(p.numel()) for p in gates]
    want_f = [np.zeros(p.numel()) for p in gates]
    with torch.no_grad():
        for idx in batches:
            batch = data.collate([data[int(i)] for i in idx])
            for p, t, f in zip(gates, want_t, want_f):
                for u in range(p.numel()):
                    v = float(p[u])
                    p[u] = v + eps
                    up = _loss64(model, batch)
                    p[u] = v - eps
                    down = _loss64(model, batch)
                    p[u] = v
                    d = (up - down) / (2 * eps)
                    t[u] += abs(v * d)
                    f[u] += d * d
    for got, want in ((taylor, want_t), (fisher, want_f)):
        assert [a.shape for a in got.heads + got.ffn] == [(4,)] * 2 + [(8,)] * 2
        for a, b in zip(got.heads + got.ffn, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # left as found


def test_per_layer_normalisation():
    s = normalise_layers(Scores([np.array([3.0, 4.0]), np.zeros(2)], [np.array([1.0, 0.0, 0.0])]))
    np.testing.assert_allclose(s.heads[0], [0.6, 0.8])
    assert s.heads[1].tolist() == [0.0, 0.0] and s.ffn[0].tolist() == [1.0, 0.0, 0.0]


def test_probe_needs_a_classification_head():
    check_probe(EarlyBertArgs(draw="probe"), EarlyBertForSequenceClassification)
    check_probe(EarlyBertArgs(draw="random"), EarlyBertForQuestionAnswering)
    with pytest.raises(ConfigError, match="earlybert.draw=probe probes a sequence-classification head"):
        check_probe(EarlyBertArgs(draw="probe"), EarlyBertForQuestionAnswering)


# ---- real runs ----------------------------------------------------------------------------------------------------

def probe_args(tiny_bert: tuple[Path, Path], out: Path, **overrides) -> list[str]:
    model, data = tiny_bert
    opts = {"--task": "custom", "--model": model, "--finetune.train_file": data / "train.jsonl",
            "--finetune.dev_file": data / "dev.jsonl", "--finetune.text_a": "text", "--finetune.max_len": 16,
            "--finetune.epochs": 1, "--train.micro_batch_size": 8, "--train.lr": 1e-3, "--train.precision": "fp32",
            "--earlybert.draw": "probe", "--earlybert.probe_examples": 48, "--earlybert.probe_batches": 3,
            "--earlybert.ffn_multiple": 1, "--output-dir": out, "--log.progress": "false", "--log.wandb": "disabled"}
    opts.update({k if k.startswith("--") else f"--{k}": v for k, v in overrides.items()})
    # options the run's mode would ignore are refused: the probe's without the probe, EarlyBERT's without it
    drop = ("--earlybert.",) if str(opts.get("--earlybert.enabled")) == "false" else \
        ("--earlybert.probe_",) if opts["--earlybert.draw"] != "probe" else ()
    return [str(x) for k, v in opts.items() if not k.startswith(drop) or k == "--earlybert.enabled" for x in (k, v)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_probe_draw_two_ranks_same_ticket(tiny_bert, tmp_path, stage):
    """A 2-rank ZeRO-2/ZeRO-3 fine-tuning run drawn by the probe: both ranks switch with the same ticket at step 0
    (their checkpoints' ticket digests), which is the ticket one process draws from the same model and data; the
    ticket starts from the probed head."""
    out = tmp_path / "run"
    proc = launch(probe_args(tiny_bert, out, **{"train.zero_stage": stage}), command="finetune")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ticket = Ticket.load(out / "ticket")
    assert (ticket.step, ticket.reason, ticket.heads_per_layer) == (0, "probe", [3, 3])
    latest = (out / "checkpoints" / "latest").read_text()
    digests = {torch.load(out / "checkpoints" / latest / f"rank{r}.pt", weights_only=True)["ticket"] for r in (0, 1)}
    assert digests == {ticket.digest()}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"probe", "efficient"} and summary["stages"]["probe"]["wall_s"] > 0
    cfg = RunConfig.from_dict(json.loads((out / "run_config.json").read_text()))
    task = ClassificationTask(cfg)
    alone, head, _ = probe_and_draw(initial_model(cfg, task, gates=True), task.train, cfg.earlybert, 8, cfg.train.seed)
    assert (alone.heads, alone.ffn) == (ticket.heads, ticket.ffn)
    drawn = EarlyBertForSequenceClassification.from_pretrained(out / "ticket").classifier.weight.detach()
    fresh = initial_model(cfg, task, gates=False).classifier.weight.detach()
    torch.testing.assert_close(drawn, head["classifier.weight"], rtol=1e-4, atol=1e-6)  # rounding: threads
    assert (drawn - fresh).abs().max() > 1e-3


def _task_args(tiny_bert: tuple[Path, Path]) -> list[str]:
    """The task and probe options of ``probe_args`` without a model, a draw or an output directory."""
    args = probe_args(tiny_bert, Path("unused"))
    drop = {"--model", "--earlybert.draw", "--output-dir", "--log.progress", "--log.wandb"}
    return [x for k, v in zip(args[::2], args[1::2]) if k not in drop for x in (k, v)]


@pytest.mark.slow
def test_ticket_command_draws_what_given_then_trains(tiny_bert, tmp_path):
    """`earlybert-ds ticket` without training: from the pre-trained model by the probe, and from a finished full run
    (its trained head, on all of its own training data, with its own config); `--earlybert.draw given` then trains
    exactly the units drawn; a run whose final model is already shrunk is refused."""
    model, _ = tiny_bert
    task = _task_args(tiny_bert)
    proc = run_single([*task, "--model", str(model), "--out", str(tmp_path / "probe.json")], "ticket")
    assert proc.returncode == 0, proc.stderr[-3000:]
    probed = Ticket.load(tmp_path / "probe.json")
    assert (probed.step, probed.reason, probed.vocab_size, probed.heads_per_layer) == (0, "probe", 64, [3, 3])

    full = tmp_path / "full"
    proc = run_single(probe_args(tiny_bert, full, **{"earlybert.enabled": "false"}), "finetune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_single(["--run", str(full), "--out", str(tmp_path / "trained.json")], "ticket")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = Ticket.load(tmp_path / "trained.json")
    cfg = RunConfig.from_dict(json.loads((full / "run_config.json").read_text()))
    final = EarlyBertForSequenceClassification.from_pretrained(full / "final", use_gates=True)
    scores = unit_scores(final, ClassificationTask(cfg).train, in_order(96, 8), "taylor", torch.device("cpu"))
    assert (trained.reason, trained.ffn) == ("trained", draw_masks(scores, prune_spec(cfg.earlybert)).kept()[1])

    given = tmp_path / "given"
    proc = run_single(probe_args(tiny_bert, given, **{"earlybert.draw": "given",
                                                      "earlybert.ticket": tmp_path / "probe.json"}), "finetune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ticket = Ticket.load(given / "ticket")
    assert (ticket.step, ticket.reason, ticket.heads, ticket.ffn) == (0, "given", probed.heads, probed.ffn)
    small = EarlyBertForSequenceClassification.from_pretrained(given / "final").config
    assert small.intermediate_sizes == probed.intermediate_sizes and small.heads_per_layer == [3, 3]

    proc = run_single(["--run", str(given), "--out", str(tmp_path / "again.json")], "ticket")
    assert proc.returncode == 2 and "already shrunk to a ticket" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "again.json").exists()


@pytest.mark.slow
def test_a_ticket_of_another_model_is_refused(tiny_bert, tmp_path):
    """A ticket drawn for a model of another vocabulary (by `earlybert-ds ticket` from another pre-trained model of
    the same shape) or of another shape fails a `--earlybert.draw given` run before anything is trained."""
    other = tiny_bert_dir(tmp_path / "other", " ".join(WORDS[::-1]) + " and some other words", 80)
    proc = run_single([*_task_args(tiny_bert), "--model", str(other), "--out", str(tmp_path / "other.json")],
                      "ticket")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Ticket.load(tmp_path / "other.json").vocab_size == 80
    wide = Ticket.load(tmp_path / "other.json")
    wide.hidden_size, wide.vocab_size = 48, 64
    wide.save(tmp_path / "wide.json")
    for name, needle in (("other", "drawn for a model with a vocabulary of 80, this one has 64"),
                         ("wide", "(layers, hidden, heads, ffn) = (2, 48, 4, 64), the model is (2, 32, 4, 64)")):
        out = tmp_path / f"run-{name}"
        proc = run_single(probe_args(tiny_bert, out, **{"earlybert.draw": "given",
                                                        "earlybert.ticket": tmp_path / f"{name}.json"}), "finetune")
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
        assert not (out / "checkpoints").exists() and not (out / "ticket").exists()
