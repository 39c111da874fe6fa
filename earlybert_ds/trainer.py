"""The training loop every stage shares, and what it trains on: the :class:`Task` (what differs between
pre-training and fine-tuning), the :class:`Run` (what every stage shares: the config, the task, the monitor and the
progress so far), and a :class:`Stage`'s hooks (the search stage's early-bird test). The loop logs, validates and
checkpoints on the configured cadence, and stops a run whose loss stays non-finite.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from . import checkpoint
from . import distributed as dist
from . import faults
from .config import RunConfig
from .data import ShardedBatches
from .engine import Engine
from .modeling import EarlyBertConfig, EarlyBertPreTrainedModel
from .monitor import Monitor
from .ticket import Ticket


class NonFiniteLossError(ArithmeticError):
    """The loss stayed non-finite for ``train.max_nonfinite`` consecutive steps."""


class Task(Protocol):
    """What differs between pre-training and fine-tuning; the three stages around it are the same."""

    model_class: type[EarlyBertPreTrainedModel]
    model_overrides: dict[str, Any]  # config fields the task decides (e.g. num_labels)
    tokenizer: Any
    epoch_examples: int | None  # training examples per epoch where the budget is in epochs (fine-tuning)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step."""

    def step_metrics(self, outputs: list[Any], device: torch.device) -> dict[str, float]:
        """The training metrics of one step from what the model returned (a collective: every rank calls it)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def epoch(self) -> int: ...

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Validation metrics (a collective: every rank calls it)."""

    def flops_per_token(self, config: EarlyBertConfig) -> float:
        """Training FLOPs per token of a model of ``config`` for the task."""

    def finish(self, engine: Engine, out: Path) -> None:
        """Anything the task writes at the end (e.g. predictions on a test file); a collective."""


def step_metrics(outputs: list[Any], device: torch.device, task_losses: list[float],
                 hits: tuple[float, float] = (0.0, 0.0)) -> dict[str, float]:
    """A training step's metrics over every rank's micro-batches: the task's ``loss`` (NaN if any rank's is not
    finite), the gates' ``gate_l1`` (search stage), and ``mlm_acc`` from ``hits`` (this rank's correct, counted)."""
    loss_sum, penalty_sum = sum(task_losses), sum(float(o.gate_penalty) for o in outputs if o.gate_penalty is not None)
    finite = 1.0 if math.isfinite(loss_sum) else 0.0
    tot = dist.all_reduce_sum([loss_sum if finite else 0.0, len(outputs), penalty_sum, *hits, 1.0 - finite], device)
    metrics = {"loss": float("nan") if tot[5] else tot[0] / tot[1]}
    if penalty_sum or tot[2]:
        metrics["gate_l1"] = tot[2] / tot[1]
    if tot[4]:
        metrics["mlm_acc"] = tot[3] / tot[4]
    return metrics


class ShardedTask:
    """The data position of a task that samples with :class:`~earlybert_ds.data.ShardedBatches`: what its
    checkpoints record, and its epoch; its training metrics from the models' ``task_loss``."""

    batches: ShardedBatches
    epoch_examples: int | None = None  # a budget in steps

    def step_metrics(self, outputs: list[Any], device: torch.device) -> dict[str, float]:
        return step_metrics(outputs, device, [float(o.task_loss) for o in outputs])

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    @property
    def epoch(self) -> int:
        return self.batches.epoch


@dataclass
class Run:
    """What every stage shares: the config, the task (data), the monitor, and the progress so far."""

    cfg: RunConfig
    out: Path
    task: Task
    monitor: Monitor | None = None
    step: int = 0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    search_log: list[dict[str, float]] = field(default_factory=list)
    last_eval: tuple[int, dict[str, float]] | None = None
    ticket: Ticket | None = None  # this rank's copy, once drawn or loaded
    peak_flops: float = 0.0  # all ranks' measured matmul rate in the run's precision (FLOP/s): MFU's denominator
    saved_step: int | None = None  # the step of the checkpoint this run last saved or loaded
    nonfinite: int = 0  # consecutive non-finite steps at the end of the last stage trained

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Validate now unless this step was already validated; logs and returns the metrics."""
        if self.last_eval is None or self.last_eval[0] != self.step:
            self.last_eval = (self.step, self.task.evaluate(engine))
            self.monitor.log(self.step, self.last_eval[1])
        return self.last_eval[1]

    def client_state(self, phase: str, **extra: Any) -> dict:
        return {"earlybert": {"phase": phase, "step": self.step, "data": self.task.state_dict(),
                              "stages": self.stages, "search_log": self.search_log, **extra}}

    def restore(self, state: dict) -> None:
        self.step = state["step"]
        self.task.load_state_dict(state["data"])
        self.stages = state["stages"]
        self.search_log[:] = state["search_log"]  # in place: the search stage appends to this very list


class Stage(Protocol):
    """What a stage adds to the training loop (the search stage: Taylor scores and the early-bird test)."""

    def before_step(self, engine: Engine) -> None:
        """Between the step's last backward and its optimizer step (the gradients are complete)."""

    def after_step(self, step: int, engine: Engine) -> bool:
        """After every step, on every rank; True ends the stage (the ticket is drawn)."""

    def state_dict(self) -> dict: ...


class _Interval:
    """Seconds, tokens and samples since the last logged step: the throughput a logged step reports."""

    def __init__(self, flops_per_token: float, peak_flops: float):
        self.flops, self.peak = flops_per_token, peak_flops
        self.reset()

    def reset(self) -> None:
        self.s, self.tokens, self.samples = 0.0, 0.0, 0

    def add(self, s: float, tokens: float, samples: int) -> None:
        self.s, self.tokens, self.samples = self.s + s, self.tokens + tokens, self.samples + samples

    def rates(self, epoch: int) -> dict[str, float]:
        tps = self.tokens / self.s
        return dict(tokens_per_s=tps, samples_per_s=self.samples / self.s, tflops=tps * self.flops / 1e12,
                    mfu=tps * self.flops / self.peak, epoch=epoch)


def train(run: Run, engine: Engine, phase: str, last_step: int, stage: Stage | None = None) -> None:
    """Train from ``run.step`` to ``last_step``, or until ``stage.after_step`` ends the stage. Logs, validates and
    checkpoints on the configured cadence; its steps, tokens and times go to ``run.stages[phase]``."""
    t = run.cfg.train
    totals = run.stages.setdefault(phase, {"steps": 0, "train_s": 0.0, "wall_s": 0.0, "tokens": 0.0,
                                           "first_step": run.step + 1})
    interval, bad, wall0 = _Interval(run.task.flops_per_token(engine.module.config), run.peak_flops), 0, \
        time.perf_counter()
    before_step = None if stage is None else lambda: stage.before_step(engine)
    while run.step < last_step:
        t0 = time.perf_counter()
        micro = run.task.next_step()
        step = engine.train_step(micro, run.step, before_step)
        m = {**step.readings, **run.task.step_metrics(step.outputs, engine.device)}
        dt = time.perf_counter() - t0
        tokens = dist.world_size() * sum(float(mb["attention_mask"].sum()) for mb in micro)  # this rank's x ranks
        run.step += 1
        totals.update(steps=totals["steps"] + 1, train_s=totals["train_s"] + dt, tokens=totals["tokens"] + tokens)
        interval.add(dt, tokens, dist.world_size() * sum(len(mb["input_ids"]) for mb in micro))
        bad = bad + 1 if not math.isfinite(m["loss"]) else 0
        if run.step % t.log_every == 0 or run.step == last_step or bad:  # a non-finite step is always logged
            run.monitor.log(run.step, {**m, **interval.rates(run.task.epoch)})
            interval.reset()
        if bad >= t.max_nonfinite:
            raise NonFiniteLossError(f"the loss was non-finite for {bad} consecutive steps (up to step {run.step}); "
                                     f"stopping. {last_good(run)}")
        if t.eval_every and run.step % t.eval_every == 0:
            run.evaluate(engine)
        if stage is not None and stage.after_step(run.step, engine):
            break
        if t.save_every and run.step % t.save_every == 0 and bad == 0:
            save(run, engine, phase, stage)
        faults.after_step(run.step, engine.module)
    totals["wall_s"] += time.perf_counter() - wall0
    totals["last_step"] = run.step
    run.nonfinite = bad


def last_good(run: Run) -> str:
    latest = Path(run.out, checkpoint.CHECKPOINTS, checkpoint.LATEST)
    where = latest.read_text().strip() if latest.is_file() else "none yet"
    return f"Last good checkpoint: {where}. Lower train.lr or use bf16."


def save(run: Run, engine: Engine, phase: str, stage: Stage | None = None) -> None:
    """A checkpoint of this step (a collective), with the stage's own state."""
    extra = {"search": stage.state_dict()} if stage is not None else {}
    rank_state = {"ticket": run.ticket.digest()} if run.ticket else {}
    checkpoint.save(engine, run.out / checkpoint.CHECKPOINTS, run.step, run.client_state(phase, **extra), run.cfg.train.keep_last,
                    rank_state)
    run.saved_step = run.step


def load(run: Run, engine: Engine, path: Path) -> dict:
    """Restore ``engine`` and the run's progress from a checkpoint; returns its client state."""
    state, rank_state = checkpoint.load(engine, path)
    if run.ticket is not None and rank_state.get("ticket", run.ticket.digest()) != run.ticket.digest():
        raise checkpoint.CheckpointError(f"{path}: written for another ticket than {run.out / checkpoint.TICKET_DIR}")
    run.restore(state)
    if checkpoint.resolve(path)[0].resolve() == (run.out / checkpoint.CHECKPOINTS).resolve():  # not one of another run's
        run.saved_step = run.step
    return state
