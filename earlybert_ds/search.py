"""The search stage: slimming gates, their L1 term, their optimizer group, the scores a ticket is drawn from, and the
early-bird test.

- the gates themselves live in the model (``modeling.py``, whose code is saved with it; one scalar per head, one per
  FFN neuron, held as ``head_gates``/``ffn_gates`` when ``config.use_gates``): a block's output is scaled by them
  and their L1 term returned with it; the model's forward pass returns the sum (``gate_penalty``), computed where
  ZeRO-3 has the gates gathered, and nothing is stored on the modules;
- which parameters are gates, and reading them in full (fp32 master copies, gathered under ZeRO-3);
- their optimizer group: never weight-decayed (the L1 term regularises them), with its own learning rate
  (``earlybert.gate_lr``): at the weights' fine-tuning rate the gates move by ~1e-3 in a search of 20 steps, so the
  masks would be drawn from noise;
- the scores a ticket is drawn from (``earlybert.score``): ``magnitude`` |gate| (the paper), ``signed`` gate values
  (the official code's ranking), ``taylor`` Σ_steps |g·∂L/∂g| (first-order Taylor importance of each unit, summed
  over the search steps: Molchanov et al. 2017; Michel et al. 2019 for heads), read from full gradients so that it
  is the same under every ZeRO stage;
- :class:`SearchStage`: every ``detect_every`` steps it draws masks from the scores on the coordinator (rank 0) and
  asks the :class:`EarlyBirdDetector` whether they have stopped changing; the decision is broadcast.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as dist
from .config import ConfigError, EarlyBertArgs
from .plots import plot_gates, plot_mask_distances
from .ticket import Masks, PruneSpec, Scores, Ticket, TicketError, draw_masks, index_mask, mask_distance, random_masks

logger = logging.getLogger("earlybert_ds")

SCORES = ("magnitude", "signed", "taylor")


# ---- the gates ----------------------------------------------------------------------------------------------------

def head_gate_params(model: nn.Module) -> list[nn.Parameter]:
    """The per-layer head gates, in layer order (empty for a model built without gates)."""
    return [p for name, p in model.named_parameters() if name.endswith("head_gates")]


def ffn_gate_params(model: nn.Module) -> list[nn.Parameter]:
    """The per-layer FFN-neuron gates, in layer order (empty for a model built without gates)."""
    return [p for name, p in model.named_parameters() if name.endswith("ffn_gates")]


def is_gate(name: str) -> bool:
    """Whether a parameter name is a slimming gate."""
    return name.endswith(("head_gates", "ffn_gates"))


def gate_param_group(model: nn.Module, lr: float | None) -> dict | None:
    """The gates' optimizer group: no weight decay (their L1 term is their regulariser) and ``lr`` (``None``: the
    optimizer's, i.e. train.lr); ``None`` for a model without gates."""
    gates = [p for name, p in model.named_parameters() if p.requires_grad and is_gate(name)]
    if not gates:
        return None
    return {"params": gates, "weight_decay": 0.0, **({} if lr is None else {"lr": lr})}


def read_gates(model: nn.Module, optimizer: object = None) -> Scores:
    """Every gate's value as a numpy array: from the optimizer's fp32 master copy under mixed precision (pass the
    DeepSpeed optimizer), gathered under ZeRO-3 (a collective there: every rank must call it)."""
    return Scores(heads=[dist.full_fp32(p, optimizer).numpy() for p in head_gate_params(model)],
                  ffn=[dist.full_fp32(p, optimizer).numpy() for p in ffn_gate_params(model)])


def gate_stats(gates: Scores, threshold: float = 1e-2) -> dict[str, float]:
    """How far the search has moved the gates: the fraction below ``threshold`` in magnitude (``gate_sparsity/*``)
    and the spread (standard deviation) of their values (``gate_spread/*``), for heads and FFN neurons."""
    out = {}
    for what, arrays in (("heads", gates.heads), ("ffn", gates.ffn)):
        flat = np.concatenate(arrays) if arrays else np.zeros(0)
        out[f"gate_sparsity/{what}"] = float((np.abs(flat) < threshold).mean()) if flat.size else 0.0
        out[f"gate_spread/{what}"] = float(flat.std()) if flat.size else 0.0
    return out


# ---- scores -------------------------------------------------------------------------------------------------------

class TaylorImportance:
    """Σ over the search steps of |g · ∂L/∂g| per gate, with L the task loss (the L1 term's gradient, coef·sign(g),
    is taken out): the first-order estimate of how much the loss changes when the unit is removed. With ``decay``
    < 1 the sum is discounted, Σ_t decay^(T−t)·|g·∂L/∂g|_t, so that it ranks units as the model of the last
    ~1/(1 − decay) steps does: fine-tuning from a pre-trained encoder ranks the layers the other way round in its
    first steps than once trained (docs/results-finetuning.md, "When the good widths appear").

    Gradients are read in full with DeepSpeed's ``safe_get_full_grad`` after the step's last backward and before its
    optimizer step: under ZeRO-1/2 they are partitioned by then, under ZeRO-3 so are the gates; both are gathered,
    so every rank accumulates the same numbers (checked at every draw by :meth:`digest`)."""

    def __init__(self, l1_heads: float, l1_ffn: float, decay: float = 1.0):
        self.l1, self.decay = {"heads": l1_heads, "ffn": l1_ffn}, decay
        self.total: Scores | None = None

    def accumulate(self, model: nn.Module, optimizer: Any, grad_scale: float = 1.0) -> None:
        """Add this step's |g·∂L/∂g| (gradients divided by ``grad_scale``, the fp16 loss scale); a collective under
        ZeRO. A step with a non-finite gradient (an fp16 overflow) adds nothing."""
        def unit(p: nn.Parameter, coef: float) -> np.ndarray:
            g = dist.full_fp32(p, optimizer).numpy().astype(np.float64)
            grad = dist.full_grad(p).numpy().astype(np.float64) / grad_scale
            return np.abs(g * (grad - coef * np.sign(g)))

        step = Scores(heads=[unit(p, self.l1["heads"]) for p in head_gate_params(model)],
                      ffn=[unit(p, self.l1["ffn"]) for p in ffn_gate_params(model)])
        if not all(np.isfinite(a).all() for a in step.heads + step.ffn):
            return
        if self.total is None:
            self.total = step
        else:
            d = self.decay
            self.total = Scores([d * a + b for a, b in zip(self.total.heads, step.heads)],
                                [d * a + b for a, b in zip(self.total.ffn, step.ffn)])

    def digest(self) -> str:
        if self.total is None:
            return ""
        data = b"".join(np.ascontiguousarray(a).tobytes() for a in self.total.heads + self.total.ffn)
        return hashlib.sha256(data).hexdigest()[:16]

    def state_dict(self) -> dict | None:
        return None if self.total is None else {"heads": [a.tolist() for a in self.total.heads],
                                                "ffn": [a.tolist() for a in self.total.ffn]}

    def load_state_dict(self, state: dict | None) -> None:
        self.total = None if state is None else Scores([np.asarray(a) for a in state["heads"]],
                                                       [np.asarray(a) for a in state["ffn"]])


def scores_of(score: str, gates: Scores, taylor: TaylorImportance | None = None) -> Scores:
    """The per-unit scores ``score`` ranks units by: |gate| (``magnitude``), the gate (``signed``), or the
    accumulated Taylor importance (``taylor``; |gate| before the first accumulated step)."""
    if score == "signed":
        return gates
    if score == "taylor" and taylor is not None and taylor.total is not None:
        return taylor.total
    return Scores([np.abs(g) for g in gates.heads], [np.abs(g) for g in gates.ffn])


# ---- the early-bird test ------------------------------------------------------------------------------------------

@dataclass
class EarlyBirdDetector:
    """Declares convergence when the last ``window`` mask distances (heads and FFN) are all ``<= epsilon``.

    Defaults follow the Early-Bird paper (window 5, epsilon 0.1). Its state is plain JSON-able data so it goes into
    every search-stage checkpoint: a resumed search then draws the same ticket at the same step.
    """

    window: int = 5
    epsilon: float = 0.1
    previous: Masks | None = None
    history: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise TicketError(f"window={self.window!r}: must be an integer >= 1")
        if not self.epsilon > 0 or math.isinf(self.epsilon):
            raise TicketError(f"epsilon={self.epsilon!r}: the mask-distance threshold must be > 0")
        self.history = deque(self.history, maxlen=self.window)

    def update(self, masks: Masks) -> dict[str, float] | None:
        """Record the masks of this check; returns the distance to the previous check (``None`` on the first)."""
        distance = None if self.previous is None else mask_distance(self.previous, masks)
        if distance is not None:
            self.history.append(distance)
        self.previous = masks
        return distance

    @property
    def converged(self) -> bool:
        return len(self.history) == self.window and all(
            d["heads"] <= self.epsilon and d["ffn"] <= self.epsilon for d in self.history
        )

    def state_dict(self) -> dict:
        prev = None
        if self.previous is not None:
            heads, ffn = self.previous.kept()
            prev = {"heads": heads, "ffn": ffn, "sizes": [[m.size for m in self.previous.heads],
                                                          [m.size for m in self.previous.ffn]]}
        return {"window": self.window, "epsilon": self.epsilon, "previous": prev, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.window, self.epsilon = state["window"], state["epsilon"]
        prev = state["previous"]
        self.previous = None if prev is None else Masks(
            heads=[index_mask(idx, n) for idx, n in zip(prev["heads"], prev["sizes"][0])],
            ffn=[index_mask(idx, n) for idx, n in zip(prev["ffn"], prev["sizes"][1])],
        )
        self.history = deque(state["history"], maxlen=self.window)


# ---- what is drawn -------------------------------------------------------------------------------------------------

def prune_spec(e: EarlyBertArgs) -> PruneSpec:
    """How a ticket is drawn from scores: the run's ratios and methods."""
    return PruneSpec(head_ratio=e.head_ratio, ffn_ratio=e.ffn_ratio, head_method=e.head_method,
                     ffn_method=e.ffn_method, ffn_multiple=e.ffn_multiple)


def check_prunable(e: EarlyBertArgs, config: Any) -> None:
    """Fail before training when the ratios cannot be applied to this model (e.g. a layer would be emptied), or
    when a given ticket does not fit it."""
    if e.draw == "given":
        given_ticket(e, config)
        return
    ones = Scores([np.ones(config.num_attention_heads)] * config.num_hidden_layers,
                  [np.ones(config.intermediate_size)] * config.num_hidden_layers)
    try:
        draw_masks(ones, prune_spec(e))
    except TicketError as e:
        raise ConfigError(f"earlybert ratios do not fit the model: {e}") from e


def given_ticket(e: EarlyBertArgs, config: Any) -> Ticket:
    """A ticket drawn elsewhere (``earlybert.ticket``: by another run, on another task, or from a trained model's
    scores), applied at step 0 like the random baseline, with its own ratios."""
    try:
        ticket = Ticket.load(e.ticket)
        ticket.validate_for(config)
    except TicketError as err:
        raise ConfigError(f"earlybert.ticket: {err}") from err
    return replace(ticket, step=0, reason="given")


def random_ticket(e: EarlyBertArgs, config: Any, seed: int) -> Ticket:
    """The paper's baseline: no search, a random ticket at step 0 with the same ratios."""
    spec, layers = prune_spec(e), config.num_hidden_layers
    masks = random_masks([config.num_attention_heads] * layers, [config.intermediate_size] * layers, spec, seed)
    return Ticket.from_masks(masks, 0, "random", spec, config)


# ---- the stage ----------------------------------------------------------------------------------------------------

class SearchStage:
    """What the search keeps between steps: the Taylor sums, the early-bird detector, and the log of mask distances.

    The training loop calls ``before_step`` between each step's backward and its optimizer step, and ``after_step``
    after it, on every rank; on check steps that reads the gates (a collective), the coordinator draws masks from
    the scores, updates the detector, logs, and decides; every rank gets the same decision, and once it is a ticket
    (``self.ticket``) the search ends. Its ``state_dict`` goes into every search checkpoint.
    """

    def __init__(self, e: EarlyBertArgs, seed: int, monitor: Any, history: list[dict], plots: Path):
        self.e, self.spec, self.seed, self.monitor, self.history, self.plots = e, prune_spec(e), seed, monitor, \
            history, plots
        self.ticket: Ticket | None = None
        self.detector = EarlyBirdDetector(window=e.window, epsilon=e.epsilon)
        self.taylor = TaylorImportance(e.l1_heads, e.l1_ffn, e.taylor_decay) if e.score == "taylor" else None
        self.limit = e.search_limit

    def before_step(self, engine: Any) -> None:
        """After the step's backward, before the optimizer step: where the gradients are there to read."""
        if self.taylor is not None:
            self.taylor.accumulate(engine.module, engine.optimizer, engine.grad_scale)

    def after_step(self, step: int, engine: Any) -> bool:
        """The early-bird test after ``step``; whether the ticket is drawn (``self.ticket``): the search is over."""
        self.ticket = self.check(step, engine)
        return self.ticket is not None

    def check(self, step: int, engine: Any) -> Ticket | None:
        """The early-bird test at ``step`` (a collective on check steps); the ticket once drawn, else ``None``."""
        e = self.e
        if step % e.detect_every and step < self.limit:
            return None
        gates = read_gates(engine.module, engine.optimizer)  # collective under ZeRO: every rank takes part
        if self.taylor is not None:
            digests = dist.all_gather_object(self.taylor.digest())
            if len(set(digests)) > 1:
                raise RuntimeError(f"the ranks accumulated different Taylor scores (digests {digests})")
        # the coordinator decides; every rank switches at the same step with the same ticket, or fails with it
        return dist.on_rank0(self._coordinate, step, gates, engine.module.config)

    def _coordinate(self, step: int, gates: Scores, config: Any) -> Ticket | None:
        """Rank 0: masks from the scores, their distance to the last ones, and the decision (a ticket or None)."""
        e = self.e
        masks = draw_masks(scores_of(e.score, gates, self.taylor), self.spec)
        distance = self.detector.update(masks)
        metrics = gate_stats(gates)
        if distance is not None:
            self.history.append({"step": step, **distance})
            metrics.update({"mask_distance/heads": distance["heads"], "mask_distance/ffn": distance["ffn"]})
        self.monitor.log(step, metrics)
        reason = ("converged" if e.draw == "earlybird" and self.detector.converged else
                  None if step < self.limit else "max_steps" if e.draw == "earlybird" else
                  "random" if e.draw == "random_at" else "fixed")
        if reason == "max_steps":
            logger.warning("no early-bird ticket by step %d (max_search_steps): drawing from the current scores", step)
        if reason == "random":  # the same-step control: the same search, units chosen at random
            masks = random_masks([m.size for m in masks.heads], [m.size for m in masks.ffn], self.spec, self.seed)
        if not reason:
            return None
        decision = Ticket.from_masks(masks, step, reason, self.spec, config)
        self._plot(gates, masks, decision)
        return decision

    def _plot(self, gates: Scores, masks: Masks, ticket: Ticket) -> None:
        """The mask distances and the gates at the ticket, as PNGs in ``plots`` and on wandb; skipped, saying so,
        where matplotlib is not installed (an optional dependency: ``pip install earlybert-ds[plots]``)."""
        log = self.history
        try:
            dist_png = plot_mask_distances([r["step"] for r in log], [r["heads"] for r in log],
                                           [r["ffn"] for r in log], self.e.epsilon, ticket.step,
                                           self.plots / "mask_distance.png")
        except ModuleNotFoundError as e:
            logger.warning("%s: the ticket's plots are skipped (pip install 'earlybert-ds[plots]')", e)
            return
        gates_png = plot_gates(gates.heads, gates.ffn, self.plots / "gates.png", head_masks=masks.heads,
                               ffn_masks=masks.ffn)
        self.monitor.log_image(ticket.step, "plots/mask_distance", dist_png)
        self.monitor.log_image(ticket.step, "plots/gates", gates_png)

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(),
                "taylor": None if self.taylor is None else self.taylor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        if self.taylor is not None:
            self.taylor.load_state_dict(state["taylor"])
