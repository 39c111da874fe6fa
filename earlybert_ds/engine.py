"""One DeepSpeed engine around one model: its parameter groups and schedule, a training step, inference, full
weights, and a clean teardown.

The learning rate is set from the run's own step before every optimizer step, not by a scheduler that DeepSpeed
steps: DeepSpeed does not step the scheduler on an fp16 step it skips for overflow (``runtime/engine.py``,
``_take_model_step``), so a scheduler's count falls behind the run's and the rate would never reach the end of its
schedule; and the efficient stage's new engine starts mid-run, at the ticket's step.

EarlyBERT changes the model mid-run (gated search model -> physically shrunk model), so an engine is built per
stage and released completely before the next one (``destroy``): old engines otherwise keep their memory.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from torch import nn

from . import distributed as dist
from .config import RunConfig
from .dsconfig import plan_ds
from .hardware import this_machine
from .optim import make_client_optimizer, zero_partitions
from .search import gate_param_group, is_gate

logger = logging.getLogger("earlybert_ds")


@dataclass
class Step:
    """One optimizer step: what the model returned for each micro-batch, and what the engine reads off itself
    (``loss``: the objective it minimised, mean over this rank's micro-batches; ``lr``; ``grad_norm``; under fp16
    ``loss_scale`` and ``skipped_steps``). ``step["lr"]`` reads one of them."""

    outputs: list[Any]
    readings: dict[str, float]

    def __getitem__(self, key: str) -> float:
        return self.readings[key]


class Engine:
    """A DeepSpeed engine for ``model``, created at the run's step ``start_step``: its learning rate follows the run's
    schedule (:func:`lr_lambda`), re-warmed up over its first ``rewarmup_steps``."""

    def __init__(self, model: torch.nn.Module, run: RunConfig, start_step: int = 0, rewarmup_steps: int = 0):
        plan = plan_ds(run, dist.world_size(), this_machine())
        groups = param_groups(model, run.train.weight_decay, run.earlybert.gate_lr)
        client = make_client_optimizer(plan.optimizer, groups, run.train)
        if plan.optimizer.jit_builder:  # compiled (or loaded) under the build lock, not inside deepspeed.initialize
            dist.build_op(plan.optimizer.jit_builder)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups if client is None else None, optimizer=client, config=plan.config)
        if client is not None:  # its trust ratio stays per parameter inside ZeRO's flat partitions
            client.partitions = zero_partitions(self.engine.optimizer)
        self.device = self.engine.device
        self.schedule = lr_lambda(run, start_step, rewarmup_steps)
        self.base_lrs = [g["lr"] for g in self.engine.basic_optimizer.param_groups]
        opt = type(self.engine.basic_optimizer)
        self.optimizer_name = f"{opt.__module__}.{opt.__qualname__}"
        if dist.rank() == 0:  # which implementation ran: DeepSpeed's fused kernels, torch's, or ours
            logger.info("optimizer: %s, %s (%s)", plan.optimizer.name, self.optimizer_name, plan.optimizer.why)

    def set_step(self, step: int) -> float:
        """Set every parameter group's learning rate for the run's step ``step`` (0-based); returns the first's."""
        factor = self.schedule(step)
        for group, base in zip(self.engine.basic_optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.base_lrs[0] * factor

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_device(batch, self.device)

    @property
    def grad_scale(self) -> float:
        """What the gradients are multiplied by: the fp16 loss scale, else 1."""
        return loss_scale(self.engine) or 1.0

    def train_step(self, micro_batches: Sequence[dict[str, torch.Tensor]], step: int,
                   before_step: Callable[[], None] | None = None) -> Step:
        """The run's step ``step`` (0-based): forward/backward over its micro-batches and one optimizer step at the
        schedule's rate for ``step``; what the model returned for each. ``before_step`` runs after the last
        backward, before the optimizer step (the gradients are complete)."""
        lr = self.set_step(step)
        self.engine.train()
        outputs = []
        for i, mb in enumerate(micro_batches):
            out = self.engine(**self._to_device(mb))
            self.engine.backward(out.loss)
            if before_step is not None and i == len(micro_batches) - 1:
                before_step()
            self.engine.step()
            outputs.append(out)
        readings = {"loss": sum(o.loss.item() for o in outputs) / len(outputs), "lr": lr}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            readings["grad_norm"] = float(grad_norm)
        scale = loss_scale(self.engine)
        if scale is not None:  # fp16: overflowed steps are skipped by DeepSpeed and counted
            readings.update(loss_scale=scale, skipped_steps=float(self.engine.skipped_steps))
        return Step(outputs, readings)

    @torch.no_grad()
    def infer(self, batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[Any]:
        """The model's outputs on ``batches`` in evaluation mode (no dropout, no gate penalty); under ZeRO-3 every
        rank must run the same number of batches."""
        self.engine.eval()
        try:
            for batch in batches:
                yield self.engine(**self._to_device(batch))
        finally:
            self.engine.train()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter in full and in fp32 (the master copy under mixed precision), on CPU; a collective."""
        return {name: dist.full_fp32(p, self.optimizer) for name, p in self.module.named_parameters()}

    def destroy(self) -> None:
        """Release the engine and everything it holds: DeepSpeed keeps ~150-200 MiB per rebuilt engine alive otherwise
        (its module stack and a class-level cache under ZeRO-3)."""
        self.engine.destroy()
        self.engine = self.optimizer = None
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        parameter_offload.FWD_MODULE_STACK.clear()
        # A class-level lru_cache (keyed by module) keeps every ZeRO-3 model alive; it sits under an NVTX wrapper.
        fn = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
        for cached in [fn, *(c.cell_contents for c in fn.__closure__ or ())]:
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch's model inputs on ``device``. An attention mask without padding is dropped here, on the host:
    the model then needs no mask (SDPA's fastest kernels) and never asks the device whether it has one."""
    mask = batch.get("attention_mask")
    unpadded = mask is not None and mask.device.type == "cpu" and bool(mask.all())
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()
            if k != "sample_idx" and not (k == "attention_mask" and unpadded)}


def loss_scale(engine: deepspeed.DeepSpeedEngine) -> float | None:
    """The fp16 dynamic loss scale (``None`` when not training in fp16)."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    for holder in (opt, getattr(opt, "loss_scaler", None)):
        scale = getattr(holder, "cur_scale", None)
        if scale is not None:
            return float(scale)
    return None


# ---- the optimizer's parameter groups and the learning-rate schedule (ours, set per step, not DeepSpeed's) -------

def param_groups(model: nn.Module, weight_decay: float, gate_lr: float | None = None) -> list[dict]:
    """Decayed and undecayed groups (biases and LayerNorm weights are not decayed), and the slimming gates' own
    group (``search.gate_param_group``: undecayed, at ``gate_lr``)."""
    no_decay = {id(p) for mod in model.modules() for name, p in mod.named_parameters(recurse=False)
                if isinstance(mod, nn.LayerNorm) or name == "bias"}
    groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for name, p in model.named_parameters():
        if p.requires_grad and not is_gate(name):
            groups[id(p) not in no_decay].append(p)
    gates = gate_param_group(model, gate_lr)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0} for decay, ps in groups.items() if ps] \
        + ([gates] if gates else [])


def lr_lambda(run: RunConfig, start_step: int = 0, rewarmup_steps: int = 0) -> Callable[[int], float]:
    """Multiplier of each group's learning rate at the run's step ``step`` (0-based): linear warm-up, then
    linear/cosine decay or constant; times a linear re-warm-up over the ``rewarmup_steps`` steps from
    ``start_step`` (after a rewind, fresh optimizer moments meet a mid-schedule rate).

    Warm-up reaches the peak on its last step (the first step is not wasted at lr 0); decay reaches 0 at
    train.steps.
    """
    t = run.train
    warmup, decay_steps = t.warmup_steps, max(1, t.steps - t.warmup_steps)

    def f(step: int) -> float:
        rewarm = min(1.0, (step - start_step + 1) / rewarmup_steps) if rewarmup_steps else 1.0
        return rewarm * g(step)

    def g(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / decay_steps)
        return 1.0 - progress if t.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
