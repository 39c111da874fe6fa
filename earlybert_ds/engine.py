"""One DeepSpeed engine around one model: a training step, validation, full weights, and a clean teardown.

EarlyBERT changes the model mid-run (gated search model -> physically shrunk model), so an engine is built per
stage and released completely before the next one (``destroy``): old engines otherwise keep their memory.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import deepspeed
import torch
from torch.optim.lr_scheduler import LambdaLR

from . import distributed as dist
from .config import RunConfig
from .dsconfig import build_ds_config, lr_lambda, make_client_optimizer, param_groups
from .optim import Lamb, zero_partitions

logger = logging.getLogger("earlybert_ds")


class Engine:
    """A DeepSpeed engine for ``model`` whose learning-rate schedule continues from ``start_step`` (re-warmed up
    over its first ``rewarmup_steps``)."""

    def __init__(self, model: torch.nn.Module, run: RunConfig, start_step: int = 0, rewarmup_steps: int = 0):
        self.run = run
        cuda = dist.on_cuda()
        self.ds_config = build_ds_config(run, dist.world_size(), on_cuda=cuda)
        groups = param_groups(model, run.train.weight_decay, run.earlybert.gate_lr)
        client_optimizer = make_client_optimizer(run, groups, on_cuda=cuda,
                                                 zero_stage=self.ds_config["zero_optimization"]["stage"])
        schedule = lr_lambda(run, start_step, rewarmup_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=groups if client_optimizer is None else None,
            optimizer=client_optimizer,
            lr_scheduler=lambda opt: LambdaLR(opt, schedule),
            config=self.ds_config,
        )
        if isinstance(client_optimizer, Lamb):  # its trust ratio stays per parameter inside ZeRO's flat partitions
            client_optimizer.partitions = zero_partitions(self.engine.optimizer)
        self.device = self.engine.device
        self.tokens_per_micro_batch = 0
        opt = type(self.engine.basic_optimizer)
        self.optimizer_name = f"{opt.__module__}.{opt.__qualname__}"
        if dist.rank() == 0:  # which implementation ran: DeepSpeed's fused kernels, torch's, or ours
            logger.info("optimizer: %s", self.optimizer_name)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k != "sample_idx"}

    @property
    def grad_scale(self) -> float:
        """What the gradients are multiplied by: the fp16 loss scale, else 1."""
        return loss_scale(self.engine) or 1.0

    def train_step(self, micro_batches: Sequence[dict[str, torch.Tensor]],
                   before_step: Callable[[], None] | None = None) -> dict[str, float]:
        """Forward/backward over the step's micro-batches and one optimizer step; metrics averaged over ranks.
        ``before_step`` runs after the last backward, before the optimizer step (the gradients are complete)."""
        self.engine.train()
        loss_sum = penalty_sum = correct = count = 0.0
        for i, mb in enumerate(micro_batches):
            out = self.engine(**self._to_device(mb))
            self.engine.backward(out.loss)
            if before_step is not None and i == len(micro_batches) - 1:
                before_step()
            self.engine.step()
            task = out.mlm_loss if hasattr(out, "mlm_loss") else out.task_loss
            loss_sum += float(task)
            penalty_sum += float(out.gate_penalty) if out.gate_penalty is not None else 0.0
            if getattr(out, "mlm_count", None) is not None:
                correct += float(out.mlm_correct)
                count += float(out.mlm_count)
        n = len(micro_batches)
        finite = 1.0 if math.isfinite(loss_sum) else 0.0
        tot = dist.all_reduce_sum([loss_sum if finite else 0.0, n, penalty_sum, correct, count, 1.0 - finite],
                                  self.device)
        metrics = {"loss": float("nan") if tot[5] else tot[0] / tot[1], "lr": self.scheduler.get_last_lr()[0]}
        if penalty_sum or tot[2]:
            metrics["gate_l1"] = tot[2] / tot[1]
        if tot[4]:
            metrics["mlm_acc"] = tot[3] / tot[4]
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        scale = loss_scale(self.engine)
        if scale is not None:  # fp16: overflowed steps are skipped by DeepSpeed and counted
            metrics.update(loss_scale=scale, skipped_steps=float(self.engine.skipped_steps))
        return metrics

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
        """Release the engine and everything it holds (see ../shared/NOTES.md: engines leak otherwise)."""
        self.engine.destroy()
        self.engine = self.optimizer = self.scheduler = None
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
