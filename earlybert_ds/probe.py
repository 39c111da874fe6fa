"""The step-0 draw (``earlybert.draw probe``): how much each attention head and FFN neuron matters to the task,
read through a trained classifier head before any weight is fine-tuned, and the ticket drawn from it.

Why: scored through a freshly initialised head, a unit's gradient says what that random head needs (fine-tuning
through a random head distorts the pre-trained features: LP-FT, Kumar et al. 2022), and tickets drawn by the early
search were no better than random ones (docs/tickets-finetune.md). Methods that rank BERT's heads and neurons well
score them through a trained head (Michel et al. 2019; Liang et al. 2021; Kwon et al. 2022). So:

1. probe   the classifier head alone trains on the frozen pre-trained encoder: the pooled features of
           ``probe_examples`` training examples are computed once (dropout off), then the head trains on them for
           ``probe_epochs`` epochs, far cheaper than one fine-tuning epoch;
2. score   Taylor |g·∂L/∂g| or Fisher (∂L/∂g)² of every gate (all at 1), summed over ``probe_batches`` training
           batches through the probed head, no weight updated; optionally each layer's scores divided by their L2
           norm (Molchanov et al. 2017);
3. draw    masks at the run's ratios, at step 0; the efficient stage trains the ticket from the pre-trained weights
           for the whole budget, from the probed head (``probe_head=probed``) or a fresh one.

Every rank computes the features and scores of its share of the examples and batches (the sums all-reduced); the
coordinator trains the head and draws, and every rank receives the same head and ticket.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as dist
from .config import ConfigError, EarlyBertArgs
from .modeling import EarlyBertForSequenceClassification, classification_loss
from .search import ffn_gate_params, head_gate_params, prune_spec
from .ticket import Scores, Ticket, draw_masks

HEAD = "classifier."  # the parameters the probe trains


def check_probe(e: EarlyBertArgs, model_class: type) -> None:
    """Fail before any work when ``draw=probe`` meets a task without a sequence-classification head."""
    if e.draw == "probe" and not issubclass(model_class, EarlyBertForSequenceClassification):
        raise ConfigError(f"earlybert.draw=probe probes a sequence-classification head; this task's model is "
                          f"{model_class.__name__}: use another earlybert.draw")


def _subset(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` of ``0..n-1`` (all if fewer), in a seeded order."""
    return np.random.default_rng(seed).permutation(n)[:count]


def _inputs(data: Any, idx: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in data.collate([data[int(i)] for i in idx]).items()}


@torch.no_grad()
def pooled_features(model: EarlyBertForSequenceClassification, data: Any, indices: np.ndarray, micro: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen encoder's pooled features of ``data[indices]`` (dropout off) and their labels, on CPU, in the
    order of ``indices``: each rank encodes its contiguous share, then all ranks exchange them (a collective)."""
    model.eval()
    per_rank = math.ceil(len(indices) / dist.world_size())
    mine = indices[dist.rank() * per_rank:(dist.rank() + 1) * per_rank]
    feats, labels = [], []
    for i in range(0, len(mine), micro):
        inputs = _inputs(data, mine[i:i + micro], device)
        labels.append(inputs.pop("labels").cpu())
        feats.append(model.bert(**inputs).pooler_output.float().cpu())
    shares = dist.all_gather_object((torch.cat(feats) if feats else torch.zeros(0, model.config.hidden_size),
                                     torch.cat(labels) if labels else torch.zeros(0)))
    return torch.cat([f for f, _ in shares]), torch.cat([y for _, y in shares if len(y)])


def train_head(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int,
               seed: int) -> dict[str, float]:
    """Train ``head`` alone on cached features (AdamW, no weight decay, seeded batches); its final loss and (for
    classes) accuracy over all of them."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            opt.zero_grad(set_to_none=True)
            classification_loss(head(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        logits = head(x)
        out = {"probe/loss": float(classification_loss(logits, y)), "probe/examples": float(len(x))}
        if logits.shape[-1] > 1:
            out["probe/accuracy"] = float((logits.argmax(-1) == y).float().mean())
    return out


def probe_head(model: EarlyBertForSequenceClassification, data: Any, e: EarlyBertArgs, micro: int, seed: int,
               device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Step 1: the classifier head trained alone on the frozen encoder's features (on the coordinator; every rank
    receives it): its state on CPU and its metrics. ``model`` itself is left as it was."""
    x, y = pooled_features(model, data, _subset(len(data), e.probe_examples, seed), micro, device)

    def train() -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        head = copy.deepcopy(model.classifier).cpu()  # no fresh initialisation: the global RNG stays untouched
        metrics = train_head(head, x, y, e.probe_epochs, e.probe_lr, micro, seed)
        return {HEAD + k: v.detach().cpu() for k, v in head.state_dict().items()}, metrics

    return dist.on_rank0(train)


def in_order(n: int, micro: int) -> list[np.ndarray]:
    """Every one of ``n`` examples once, in order, in batches of ``micro``."""
    return [np.arange(k, min(k + micro, n)) for k in range(0, n, micro)]


def score_batches(n: int, micro: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` batches of ``micro`` training examples (at most every example once), in a seeded order."""
    order = _subset(n, count * micro, seed + 1)  # not the probe's order: scored on other examples where there are
    return [order[i:i + micro] for i in range(0, len(order), micro)]


def unit_scores(model: nn.Module, data: Any, batches: list[np.ndarray], kind: str, device: torch.device) -> Scores:
    """Σ over ``batches`` of |g·∂L/∂g| (``taylor``) or (∂L/∂g)² (``fisher``) for every gate, L the task loss of
    the batch (its mean over examples, dropout off), no weight updated. Each rank scores every world-size-th batch
    and the float64 sums are all-reduced (a collective): the same scores on every rank and, but for rounding, for
    every number of ranks."""
    gates = head_gate_params(model) + ffn_gate_params(model)
    if not gates:
        raise ValueError("scoring units needs a model built with gates (use_gates=True)")
    gate_ids = {id(p) for p in gates}
    trainable = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    total = torch.zeros(sum(p.numel() for p in gates), dtype=torch.float64)
    try:
        for p in trainable:  # gradients for the gates only: the backward computes no weight gradient
            p.requires_grad_(id(p) in gate_ids)
        for idx in batches[dist.rank()::dist.world_size()]:
            for p in gates:
                p.grad = None
            model(**_inputs(data, idx, device)).task_loss.backward()
            g = torch.cat([p.detach().reshape(-1) for p in gates]).double().cpu()
            grad = torch.cat([p.grad.reshape(-1) for p in gates]).double().cpu()
            total += (g * grad).abs() if kind == "taylor" else grad.square()
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
            if id(p) in gate_ids:
                p.grad = None
    total = dist.all_reduce_tensor(total.to(device)).cpu().numpy()
    parts = np.split(total, np.cumsum([p.numel() for p in gates])[:-1])
    n_heads = len(head_gate_params(model))
    return Scores(heads=list(parts[:n_heads]), ffn=list(parts[n_heads:]))


def normalise_layers(scores: Scores) -> Scores:
    """Each layer's head scores and FFN scores divided by their L2 norm."""
    def unit(a: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(a)
        return a / norm if norm > 0 else a

    return Scores([unit(a) for a in scores.heads], [unit(a) for a in scores.ffn])


def draw_scored(model: nn.Module, data: Any, batches: list[np.ndarray], e: EarlyBertArgs, reason: str) -> Ticket:
    """Steps 2 and 3 (a collective): every unit of ``model`` (gated, on this rank's device) scored through its own
    head on ``batches`` of ``data`` (``earlybert.probe_score``, ``probe_normalise``), and the ticket drawn from the
    scores on the coordinator at the run's ratios (every rank receives it)."""
    scores = unit_scores(model, data, batches, e.probe_score, dist.device())
    if e.probe_normalise:
        scores = normalise_layers(scores)
    spec = prune_spec(e)
    return dist.on_rank0(lambda: Ticket.from_masks(draw_masks(scores, spec), 0, reason, spec, model.config))


def probe_and_draw(model: EarlyBertForSequenceClassification, data: Any, e: EarlyBertArgs, micro: int, seed: int
                   ) -> tuple[Ticket, dict[str, torch.Tensor], dict[str, float]]:
    """Probe, score, draw (a collective): the ticket at step 0, the probed head's state and the probe's metrics
    (its loss and accuracy on its features; its wall and this process's CPU seconds). ``model``: the gated
    pre-trained model at step 0; ``data``: the training split."""
    t0, cpu0, device = time.perf_counter(), time.process_time(), dist.device()
    model.to(device)
    head, metrics = probe_head(model, data, e, micro, seed, device)
    model.load_state_dict(head, strict=False)
    ticket = draw_scored(model, data, score_batches(len(data), micro, e.probe_batches, seed), e, "probe")
    return ticket, head, {**metrics, "probe/seconds": time.perf_counter() - t0,
                          "probe/cpu_seconds": time.process_time() - cpu0}
