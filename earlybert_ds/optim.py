"""LAMB for machines without CUDA, with exactly DeepSpeed FusedLamb's update rule, and the client-optimizer choice.

DeepSpeed builds AdamW (and, on CUDA, FusedLamb) itself from the config's optimizer section, which is what gives
ZeRO-Offload its DeepSpeedCPUAdam. FusedLamb is a CUDA kernel only, so on CPU ``build_ds_config`` drops the section
and the engine gets this ``Lamb`` as a client optimizer: same rule, same defaults, so a run moves between CPU and
GPU without changing its optimizer.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable

import torch

from .config import RunConfig


class Lamb(torch.optim.Optimizer):
    """LAMB as DeepSpeed's ``fused_lamb_cuda_kernel.cu`` computes it, per parameter tensor, in fp32 (or fp64):

    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g²`` (uncorrected moments);
    ``u = m / (sqrt(v) + eps) + weight_decay * w`` (``sqrt(v + eps)`` with ``eps_inside_sqrt``);
    ``r = clamp(||w|| / ||u||, min_coeff, max_coeff)``, or 1 when either norm is 0;
    ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * r * u`` (just ``lr`` without ``bias_correction``).

    Note the kernel's quirk, kept on purpose: bias correction scales the step size only, so the trust ratio is
    taken on the uncorrected update and the decay term is scaled by the correction factor too. FusedLamb's
    ``max_grad_norm`` is left out: DeepSpeed refuses it and clips with ``gradient_clipping`` instead.
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
                w_norm, u_norm = w.norm(), update.norm()
                ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                    (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"]),
                                    torch.ones_like(w_norm))
                step_size = group["lr"]
                if group["bias_correction"]:
                    step_size *= math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                p.copy_(w - update.mul_(ratio * step_size))
        return loss


def cuda_op_available(op: str) -> bool:
    """Whether DeepSpeed can provide its CUDA kernel ``op`` (``fused_adam``, ``fused_lamb``): built into the installed
    wheel (``DS_BUILD_*``), or buildable just in time, which needs ``nvcc`` (``CUDA_HOME``). A pip-only CUDA torch
    has neither, and ``deepspeed.initialize`` would fail trying to build it."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(installed_ops.get(op)) or (CUDA_HOME is not None and os.path.isfile(os.path.join(CUDA_HOME, "bin",
                                                                                                 "nvcc")))


def uses_own_lamb(run: RunConfig, on_cuda: bool) -> bool:
    """LAMB runs as this module's :class:`Lamb` where DeepSpeed's FusedLamb cannot: on CPU, and on CUDA without the
    fused_lamb kernel (see :func:`cuda_op_available`)."""
    return run.train.optimizer == "lamb" and not (on_cuda and cuda_op_available("fused_lamb"))


def make_client_optimizer(run: RunConfig, param_groups: list[dict], on_cuda: bool) -> torch.optim.Optimizer | None:
    """The optimizer to hand ``deepspeed.initialize``: our Lamb where :func:`uses_own_lamb`, else None (DeepSpeed
    builds it).

    Must agree with ``dsconfig.build_ds_config``, which drops the config's optimizer section in exactly that case.
    """
    t = run.train
    if uses_own_lamb(run, on_cuda):
        return Lamb(param_groups, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    return None
