"""LAMB with exactly DeepSpeed FusedLamb's update rule and a layer-wise trust ratio under ZeRO, and the choice of
every optimizer implementation (:func:`choose_optimizer`).

DeepSpeed builds AdamW itself from the config's optimizer section: torch's fused AdamW by default, DeepSpeedCPUAdam
under ZeRO-Offload, its FusedAdam where prebuilt or asked for. LAMB is always this ``Lamb``, handed to the engine as
a client optimizer: FusedLamb's rule, same defaults, so a run moves between CPU and GPU without changing its
optimizer. FusedLamb is a CUDA kernel only, and under ZeRO 1-3 it would see each parameter group flattened into one
partition per rank, so its trust ratio would be per group partition, not per layer: what makes LAMB work at large
batch would be lost. Our ``Lamb`` is told where each parameter lies in those partitions (:func:`zero_partitions`)
and takes every parameter's norms across ranks, so its trust ratio is per parameter at every ZeRO stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed

from .config import TrainArgs
from .hardware import Machine


@dataclass(frozen=True)
class Partition:
    """Where the parameters of one flattened group lie in this rank's flat ZeRO partition: parameter ``k`` of the
    group's ``n`` (the same numbering on every rank) has its local elements at ``start : start + length`` for each
    ``(k, start, length)`` in ``spans``; a parameter may lie on several ranks, or none of its elements here. Norms
    are summed over ``group``, the ranks the group is partitioned across."""

    spans: tuple[tuple[int, int, int], ...]
    n: int
    group: Any

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat.narrow(0, start, length) for _, start, length in self.spans]

    def norms(self, w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each parameter's whole ``||w||`` and ``||u||`` (one all-reduce), and for each local span its index."""
        index = torch.tensor([k for k, _, _ in self.spans], dtype=torch.long, device=w.device)
        sq = torch.zeros(2, self.n, dtype=w.dtype, device=w.device)
        if self.spans:
            sq[0, index] = torch.stack(torch._foreach_norm(self.views(w))).square()
            sq[1, index] = torch.stack(torch._foreach_norm(self.views(u))).square()
        torch.distributed.all_reduce(sq, group=self.group)
        return sq.sqrt(), index


class Lamb(torch.optim.Optimizer):
    """LAMB as DeepSpeed's ``fused_lamb_cuda_kernel.cu`` computes it, per parameter tensor, in fp32 (or fp64):

    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g²`` (uncorrected moments);
    ``u = m / (sqrt(v) + eps) + weight_decay * w`` (``sqrt(v + eps)`` with ``eps_inside_sqrt``);
    ``r = clamp(||w|| / ||u||, min_coeff, max_coeff)``, or 1 when either norm is 0;
    ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * r * u`` (just ``lr`` without ``bias_correction``).

    Note the kernel's quirk, kept on purpose: bias correction scales the step size only, so the trust ratio is
    taken on the uncorrected update and the decay term is scaled by the correction factor too. FusedLamb's
    ``max_grad_norm`` is left out: DeepSpeed refuses it and clips with ``gradient_clipping`` instead.

    A tensor listed in ``partitions`` is a ZeRO flat partition: the ratio is then taken per parameter inside it,
    on the parameter's norms over all ranks (:class:`Partition`), exactly as if the parameter were stepped whole.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, eps_inside_sqrt: bool = False,
                 weight_decay: float = 0.0, max_coeff: float = 10.0, min_coeff: float = 0.01):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas) or min_coeff > max_coeff:
            raise ValueError(f"invalid Lamb hyper-parameters: lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay} min_coeff={min_coeff} max_coeff={max_coeff}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        eps_inside_sqrt=eps_inside_sqrt, weight_decay=weight_decay, max_coeff=max_coeff,
                        min_coeff=min_coeff)
        super().__init__(params, defaults)
        self.partitions: dict[torch.Tensor, Partition] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            eps, decay = group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                g, w = p.grad.to(dtype), p.to(dtype)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v + eps).sqrt_() if group["eps_inside_sqrt"] else v.sqrt().add_(eps)
                update = (m / denom).add_(w, alpha=decay)
                step_size = group["lr"]
                if group["bias_correction"]:
                    step_size *= math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                part = self.partitions.get(p)
                if part is None:
                    update.mul_(_trust_ratio(w.norm(), update.norm(), group) * step_size)
                else:
                    (w_norms, u_norms), index = part.norms(w, update)
                    ratios = _trust_ratio(w_norms, u_norms, group)[index] * step_size
                    for view, r in zip(part.views(update), ratios):
                        view.mul_(r)
                p.copy_(w - update)
        return loss


def _trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, group: dict) -> torch.Tensor:
    """``clamp(||w|| / ||u||, min_coeff, max_coeff)``, or 1 where either norm is 0 (elementwise over parameters)."""
    return torch.where((w_norm > 0) & (u_norm > 0), (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"]),
                       torch.ones_like(w_norm))


def zero_partitions(wrapper: torch.optim.Optimizer) -> dict[torch.Tensor, Partition]:
    """For each flat fp32 partition that DeepSpeed's mixed-precision/ZeRO ``wrapper`` hands its inner optimizer, where
    each parameter of the group lies in it; ``{}`` where the inner optimizer steps the parameters themselves.

    Reads DeepSpeed 0.19's layout: ZeRO-1/2 flatten each group (in round-robin order, each parameter at its recorded
    offset) and give rank r the r-th equal slice; BF16_Optimizer (bf16 ZeRO-1 with fp32 gradient accumulation)
    does the same without reordering; ZeRO-3 partitions each parameter into equal slices (``ds_tensor``) and
    concatenates this rank's slices of a sub-group. An unknown wrapper is refused rather than stepped per group.
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    out = {}
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        out = {flat: _zero3_partition(wrapper, sub, flat)
               for sub, flat in enumerate(wrapper.fp32_partitioned_groups_flat)}
    elif isinstance(wrapper, DeepSpeedZeroOptimizer):  # stages 1 and 2
        for i, flat in enumerate(wrapper.single_partition_of_fp32_groups):
            group = wrapper.real_dp_process_group[i]
            parts = wrapper.parallel_partitioned_bit16_groups[i]
            left = sum(t.numel() for t in parts[:torch.distributed.get_rank(group)])
            out[flat] = _sliced(flat, [m.numel() for m in wrapper.round_robin_bit16_meta[i]],
                               wrapper.round_robin_bit16_offsets[i], left, group)
    elif isinstance(wrapper, BF16_Optimizer):
        for i, flat in enumerate(wrapper.fp32_groups_flat_partition):
            group = wrapper.real_dp_process_group[i]
            sizes = [p.numel() for p in wrapper.bf16_groups[i]]
            offsets = [sum(sizes[:k]) for k in range(len(sizes))]
            out[flat] = _sliced(flat, sizes, offsets, torch.distributed.get_rank(group) * flat.numel(), group)
    elif not isinstance(wrapper, (Lamb, FP16_UnfusedOptimizer)):  # these two step each parameter's own tensor
        raise RuntimeError(f"LAMB cannot keep its per-parameter trust ratio under DeepSpeed's "
                           f"{type(wrapper).__name__}; use --train.optimizer adamw")
    return out


def _sliced(flat: torch.Tensor, sizes: list[int], offsets: list[int], left: int, group: Any) -> Partition:
    """The parameters (of ``sizes``, at ``offsets`` in their group's flat tensor) that fall in this rank's slice
    ``flat``, which starts at ``left``."""
    spans = []
    for k, (size, offset) in enumerate(zip(sizes, offsets)):
        lo, hi = max(offset, left), min(offset + size, left + flat.numel())
        if lo < hi:
            spans.append((k, lo - left, hi - lo))
    return Partition(tuple(spans), len(sizes), group)


def _zero3_partition(wrapper: Any, sub: int, flat: torch.Tensor) -> Partition:
    """ZeRO-3 sub-group ``sub``: this rank's slice of each parameter, concatenated in order into ``flat``."""
    params, group = wrapper.fp16_groups[sub], wrapper.sub_group_process_groups[sub]
    rank, spans, start = torch.distributed.get_rank(group), [], 0
    for k, p in enumerate(params):
        length = min(p.partition_numel(), max(0, p.ds_numel - rank * p.partition_numel()))
        if length:
            spans.append((k, start, length))
        start += p.partition_numel()
    if start != flat.numel():
        raise RuntimeError(f"LAMB under ZeRO-3: sub-group {sub} holds {flat.numel()} elements, its "
                           f"parameters' partitions {start}: DeepSpeed's layout is not the one expected")
    return Partition(tuple(spans), len(params), group)


@dataclass(frozen=True)
class OptimizerChoice:
    """Which optimizer implementation a run uses, and why. ``client``: our :class:`Lamb`, handed to
    ``deepspeed.initialize`` (the config's optimizer section is dropped); else DeepSpeed builds it from the config,
    with ``ds_params`` added to the section's params. ``jit_builder``: the DeepSpeed op builder whose kernel is
    compiled (or loaded) before the engine is built, under the project's build lock."""

    name: str
    why: str
    client: bool = False
    ds_params: dict = field(default_factory=dict)
    jit_builder: str | None = None


_TORCH_ADAMW = {"torch_adam": True, "fused": True}  # DeepSpeed builds torch.optim.AdamW(fused=True) from these


def choose_optimizer(optimizer: str, machine: Machine, precision: str, zero_stage: int, offload: bool,
                     torch_adam: bool | None = None) -> OptimizerChoice:
    """The one place that decides the optimizer implementation, from what the machine has and what the user asked.

    LAMB is always our :class:`Lamb`: DeepSpeed's FusedLamb needs a CUDA build, hands bf16 gradients to a kernel that
    dispatches only float/double/half (``fused_lamb_cuda_kernel.cu``) and, under ZeRO, takes its trust ratio per
    partition instead of per layer.

    AdamW: ZeRO-Offload steps on the CPU with DeepSpeedCPUAdam. Otherwise torch's fused AdamW, except where
    DeepSpeed's FusedAdam is compiled into the installed wheel (``DS_BUILD_FUSED_ADAM=1``) and its wrapper is one
    the project trains with (ZeRO >= 1, or fp32; at ZeRO-0 in bf16 DeepSpeed would wrap it in FP16_Optimizer), or
    where the DeepSpeed config asks for it (``"torch_adam": false``): FusedAdam is then built just in time if it
    must be, which needs nvcc of torch's CUDA major release. ``torch_adam``: the config's explicit choice, if any.
    """
    if optimizer == "lamb":
        return OptimizerChoice("earlybert_ds Lamb", "LAMB is always earlybert_ds's (per-parameter trust ratio at "
                                                    "every ZeRO stage, any precision, no kernel to build)", client=True)
    if torch_adam:
        return OptimizerChoice("torch AdamW (fused)", "the DeepSpeed config sets torch_adam", ds_params=_TORCH_ADAMW)
    if offload:
        return OptimizerChoice("DeepSpeed CPUAdam", "ZeRO-Offload steps the optimizer on the CPU",
                               jit_builder=None if "cpu_adam" in machine.prebuilt_ops else "CPUAdamBuilder")
    if torch_adam is False:
        if "fused_adam" in machine.prebuilt_ops:
            return OptimizerChoice("DeepSpeed FusedAdam", "the DeepSpeed config sets torch_adam: false; prebuilt")
        if machine.on_cuda:
            if machine.nvcc is None:
                raise ValueError("optimizer.params.torch_adam=false asks for DeepSpeed's FusedAdam, which the "
                                 "installed DeepSpeed does not include prebuilt and which cannot be built here: no nvcc "
                                 "(CUDA_HOME). Remove torch_adam to train with torch's fused AdamW, or install "
                                 "DeepSpeed with DS_BUILD_FUSED_ADAM=1")
            if machine.torch_cuda is None or machine.nvcc[0] != machine.torch_cuda[0]:
                raise ValueError("optimizer.params.torch_adam=false asks for DeepSpeed's FusedAdam, to be built with "
                                 f"nvcc of CUDA {'%d.%d' % machine.nvcc}, but torch was built for CUDA "
                                 f"{'.'.join(map(str, machine.torch_cuda or ())) or 'none'}; point CUDA_HOME at a "
                                 "toolkit of torch's release, or remove torch_adam")
        return OptimizerChoice("DeepSpeed FusedAdam", "the DeepSpeed config sets torch_adam: false; built just in "
                                                      "time", jit_builder="FusedAdamBuilder")
    if machine.on_cuda and "fused_adam" in machine.prebuilt_ops and (zero_stage >= 1 or precision == "fp32"):
        return OptimizerChoice("DeepSpeed FusedAdam", "prebuilt into the installed DeepSpeed")
    return OptimizerChoice("torch AdamW (fused)", "needs no kernel build" + (
        "" if machine.on_cuda else " (CPU)"), ds_params=_TORCH_ADAMW)


def make_client_optimizer(choice: OptimizerChoice, param_groups: list[dict], t: TrainArgs) -> Lamb | None:
    """The optimizer to hand ``deepspeed.initialize``: our Lamb where ``choice`` says so, else None (DeepSpeed builds
    it from the config). Once the engine exists, our Lamb must be told its partitions (:func:`zero_partitions`)."""
    if not choice.client:
        return None
    return Lamb(param_groups, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
