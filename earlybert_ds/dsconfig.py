"""The DeepSpeed JSON config.

The run config is the one source of truth for batch sizes, optimizer hyper-parameters, clipping, precision and
ZeRO stage. A DeepSpeed JSON may leave those fields ``"auto"`` (filled here) or repeat them; a different value is
an error naming the field and both values, never a silent override. DeepSpeed itself ignores unknown top-level
keys and quietly replaces ``"auto"`` in nested sections by its defaults, so both are checked here, before any rank
starts.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig, TrainArgs
from .hardware import Machine, auto_precision
from .optim import OptimizerChoice, choose_optimizer

AUTO = "auto"

# ds_configs/ sits next to the package in the repository but is not installed with it; the default is embedded
# too (tests keep the two identical).
DEFAULT_DS_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "cpu.json"
DEFAULT_DS_DICT: dict[str, Any] = {
    "train_batch_size": AUTO,
    "train_micro_batch_size_per_gpu": AUTO,
    "gradient_accumulation_steps": AUTO,
    "gradient_clipping": AUTO,
    "optimizer": {"type": AUTO, "params": {"lr": AUTO, "betas": AUTO, "eps": AUTO, "weight_decay": AUTO}},
    "bf16": {"enabled": AUTO},
    "fp16": {"enabled": AUTO},
    "zero_optimization": {"stage": AUTO},
    "wall_clock_breakdown": False,
}

# Top-level keys DeepSpeed 0.19.8 reads (DeepSpeedConfig and deepspeed.initialize); anything else it ignores.
KNOWN_KEYS = frozenset({
    "activation_checkpointing", "aio", "autotuning", "bf16", "bfloat16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compile", "csv_monitor", "data_efficiency", "data_parallel_size", "data_types",
    "dataloader_drop_last", "datastates_ckpt", "disable_allgather", "disable_python_gc", "dump_state",
    "expert_parallel", "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op",
    "gradient_clipping", "gradient_predivide_factor", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "optimizer", "pipeline", "prescale_gradients", "scheduler",
    "seq_parallel_communication_data_type", "sequence_parallel_size", "steps_per_print", "tensor_parallel",
    "tensorboard", "timers", "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu",
    "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
})

# Sections whose presence would fight something earlybert_ds does itself.
_REJECTED = {
    "scheduler": "the learning-rate schedule is earlybert_ds's own (run config train.schedule and "
                 "train.warmup_steps decide it); remove the 'scheduler' section",
    "activation_checkpointing": "earlybert_ds recomputes activations with torch.utils.checkpoint "
                                "(train.activation_checkpointing); DeepSpeed's section would not apply to the model",
    "bfloat16": "this is DeepSpeed's old name for 'bf16'; use 'bf16'",
}

_OPTIMIZERS = {"adamw": "AdamW", "lamb": "Lamb"}
_HYPER = frozenset({"lr", "betas", "eps", "weight_decay"})


class DSConfigError(ValueError):
    """A DeepSpeed config that cannot be used for this run; the message names the field and the values."""


# ---- loading ---------------------------------------------------------------------------------------------------

def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise DSConfigError(f"duplicate key '{dup}'")
    return dict(pairs)


def load_ds_config(path: str | Path | None) -> tuple[dict, str]:
    """The JSON at ``path`` (``None``: the default) and a name for it to put in error messages."""
    if path is None:
        if DEFAULT_DS_CONFIG.is_file():
            path = DEFAULT_DS_CONFIG
        else:
            return copy.deepcopy(DEFAULT_DS_DICT), "built-in default DeepSpeed config (ds_configs/cpu.json)"
    path = Path(path)
    source = f"DeepSpeed config {path}"
    if not path.is_file():
        raise DSConfigError(f"{source}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise DSConfigError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (DSConfigError, UnicodeDecodeError) as e:
        raise DSConfigError(f"{source}: {e}") from None
    if not isinstance(data, dict):
        raise DSConfigError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}")
    return data, source


# ---- typed access ----------------------------------------------------------------------------------------------

_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    "stage": ("a ZeRO stage 0, 1, 2 or 3", lambda v: isinstance(v, int) and not isinstance(v, bool)
              and v in (0, 1, 2, 3)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "betas": ("a list of two numbers", lambda v: isinstance(v, list) and len(v) == 2
              and all(_KINDS["number"][1](b) for b in v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "object": ("a JSON object", lambda v: isinstance(v, dict)),
}


def _get(cfg: dict, path: str, kind: str, source: str, auto: bool = True) -> Any:
    """The value at dotted ``path`` (None when absent), type-checked; ``"auto"`` passes where ``auto``."""
    *parents, name = path.split(".")
    node = cfg
    for i, p in enumerate(parents):
        node = node.get(p)
        if node is None:
            return None
        if not isinstance(node, dict):
            raise DSConfigError(f"{source}: {'.'.join(parents[:i + 1])}={json.dumps(node)} must be a JSON object")
    value = node.get(name)
    desc, ok = _KINDS[kind]
    if value is None or (auto and value == AUTO) or ok(value):
        return value
    raise DSConfigError(f"{source}: {path}={json.dumps(value)} must be {desc}" + (' or "auto"' if auto else ""))


def _set(cfg: dict, path: str, value: Any) -> None:
    *parents, name = path.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    cfg[name] = value


def _fill(cfg: dict, path: str, kind: str, want: Any, run_says: str, source: str) -> None:
    """Set ``path`` to the run config's value unless the JSON already gives a different one (then fail)."""
    given = _get(cfg, path, kind, source)
    if given not in (None, AUTO) and given != want:
        raise DSConfigError(f"{source}: {path}={json.dumps(given)} contradicts the run config: {run_says}; "
                            'set it in one place ("auto" in the JSON)')
    _set(cfg, path, want)


def _leftover_auto(node: Any, path: str = "") -> str | None:
    if node == AUTO:
        return path
    if isinstance(node, dict):
        return next((p for k, v in node.items() if (p := _leftover_auto(v, f"{path}.{k}".lstrip(".")))), None)
    return None


# ---- the config ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DSPlan:
    """The DeepSpeed config of a run, with the two decisions taken on the way that the log reports: the precision
    (and why) and the optimizer implementation."""

    config: dict
    precision: str
    precision_why: str
    optimizer: OptimizerChoice

    def describe_precision(self) -> str:
        """One line for the log and the model card: the precision the run trains in and why."""
        return f"precision {self.precision} ({self.precision_why})"


def plan_ds(run: RunConfig, world_size: int, machine: Machine) -> DSPlan:
    """The DeepSpeed config for this run on ``machine``: the JSON (run.deepspeed, or the default) with every "auto"
    filled, the precision ``auto`` chose and the optimizer implementation (``optim.choose_optimizer``).

    Raises DSConfigError for a missing or malformed file, unknown or wrongly typed fields, any field that
    contradicts the run config, and an optimizer the machine cannot provide.
    """
    cfg, source = load_ds_config(run.deepspeed)
    t = run.train
    _check_top_level(cfg, source)
    _fill_batch(cfg, t, world_size, source)
    stage, offload = _fill_zero(cfg, t, source)
    precision, why = precision_choice(cfg, t.precision, source, machine, stage)
    for k in ("bf16", "fp16"):
        _fill(cfg, f"{k}.enabled", "bool", precision == k, f"train.precision={precision}", source)
    if precision == "fp16" and stage == 0:
        raise DSConfigError(f"{source}: fp16 with ZeRO stage 0 is refused: DeepSpeed does not apply the loss scale "
                            "in backward there, so gradients come out 2^16 too small; use ZeRO-1/2 "
                            "(--train.zero_stage 1) or bf16 (--train.precision bf16)")

    optimizer = _fill_optimizer(cfg, run, source, machine, offload["offload_optimizer"], stage, precision)

    _get(cfg, "steps_per_print", "int", source, auto=False)
    _get(cfg, "wall_clock_breakdown", "bool", source, auto=False)
    cfg.setdefault("steps_per_print", 1_000_000_000)  # earlybert_ds logs itself
    cfg.setdefault("wall_clock_breakdown", False)
    left = _leftover_auto(cfg)
    if left:
        raise DSConfigError(f'{source}: {left}="auto" is not a field earlybert_ds fills (DeepSpeed would quietly use '
                            "its default); give a value or remove it")
    _validate_with_deepspeed(cfg, source)
    return DSPlan(cfg, precision, why, optimizer)


def build_ds_config(run: RunConfig, world_size: int, machine: Machine) -> dict:
    """The DeepSpeed config of :func:`plan_ds`."""
    return plan_ds(run, world_size, machine).config


def _check_top_level(cfg: dict, source: str) -> None:
    """Refuse fields DeepSpeed would ignore, and those that would fight earlybert_ds (its own wandb)."""
    for key in cfg:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DSConfigError(f"{source}: unknown top-level field '{key}'{hint}: DeepSpeed would silently ignore it")
        if key in _REJECTED:
            raise DSConfigError(f"{source}: '{key}' is not accepted: {_REJECTED[key]}")
    if _get(cfg, "wandb.enabled", "bool", source, auto=False):
        raise DSConfigError(f"{source}: 'wandb' is not accepted: earlybert_ds logs to wandb itself (log.wandb); "
                            "DeepSpeed's monitor would log against a different step")


def _fill_batch(cfg: dict, t: TrainArgs, world_size: int, source: str) -> None:
    """Batch sizes and clipping from the run config (a contradicting JSON value is refused)."""
    _fill(cfg, "train_micro_batch_size_per_gpu", "int", t.micro_batch_size,
          f"train.micro_batch_size={t.micro_batch_size}", source)
    _fill(cfg, "gradient_accumulation_steps", "int", t.grad_accum, f"train.grad_accum={t.grad_accum}", source)
    total = t.micro_batch_size * t.grad_accum * world_size
    _fill(cfg, "train_batch_size", "int", total, f"train.micro_batch_size {t.micro_batch_size} × train.grad_accum "
                                                 f"{t.grad_accum} × world size {world_size} = {total}", source)
    _fill(cfg, "gradient_clipping", "number", float(t.clip_grad), f"train.clip_grad={t.clip_grad}", source)


def _fill_zero(cfg: dict, t: TrainArgs, source: str) -> tuple[int, dict[str, bool]]:
    """The ZeRO stage (the run config's, else the JSON's, else 0) and which offloads are on, checked together."""
    _get(cfg, "zero_optimization", "object", source, auto=False)
    given_stage = _get(cfg, "zero_optimization.stage", "stage", source)
    stage = t.zero_stage if t.zero_stage is not None else (0 if given_stage in (None, AUTO) else given_stage)
    _fill(cfg, "zero_optimization.stage", "stage", stage, f"train.zero_stage={t.zero_stage}", source)
    offload = {k: _get(cfg, f"zero_optimization.{k}.device", "str", source, auto=False) not in (None, "none")
               for k in ("offload_optimizer", "offload_param")}
    if offload["offload_param"] and stage != 3:
        raise DSConfigError(f"{source}: zero_optimization.offload_param needs ZeRO stage 3, but the stage is {stage}")
    if offload["offload_optimizer"] and stage == 0:
        raise DSConfigError(f"{source}: zero_optimization.offload_optimizer needs ZeRO stage 1-3, but the stage is 0")
    return stage, offload


def precision_choice(cfg: dict, run_precision: str, source: str, machine: Machine,
                     zero_stage: int) -> tuple[str, str]:
    """bf16/fp16/fp32 and why: --train.precision, else the JSON's explicit choice, else ``auto``
    (``hardware.auto_precision``: what the device computes fast)."""
    explicit = {k: v for k in ("bf16", "fp16")
                if isinstance(v := _get(cfg, f"{k}.enabled", "bool", source), bool)}
    if explicit.get("bf16") and explicit.get("fp16"):
        raise DSConfigError(f"{source}: bf16.enabled=true and fp16.enabled=true: enable at most one")
    if run_precision != "auto":
        return run_precision, "train.precision"
    if any(explicit.values()):
        return next(k for k, v in explicit.items() if v), source
    precision, why = auto_precision(machine, zero_stage)
    if precision != "fp32" and explicit.get(precision) is False:
        return "fp32", f"{source} disables {precision}"
    return precision, f"auto: {why}"


def _fill_optimizer(cfg: dict, run: RunConfig, source: str, machine: Machine, offload: bool, stage: int,
                    precision: str) -> OptimizerChoice:
    t = run.train
    given = _get(cfg, "optimizer.type", "str", source)
    if given not in (None, AUTO) and given.lower() not in _OPTIMIZERS:
        raise DSConfigError(f"{source}: optimizer.type={json.dumps(given)}: earlybert_ds trains with "
                            f"{' or '.join(_OPTIMIZERS.values())} (train.optimizer)")
    if given not in (None, AUTO) and given.lower() != t.optimizer:
        raise DSConfigError(f"{source}: optimizer.type={json.dumps(given)} contradicts the run config: "
                            f"train.optimizer={t.optimizer}")
    _set(cfg, "optimizer.type", _OPTIMIZERS[t.optimizer])
    _get(cfg, "optimizer.params", "object", source, auto=False)
    for name, kind, want in (("lr", "number", t.lr), ("betas", "betas", list(t.betas)), ("eps", "number", t.eps),
                             ("weight_decay", "number", t.weight_decay)):
        _fill(cfg, f"optimizer.params.{name}", kind, want, f"train.{name}={want}", source)
    params = cfg["optimizer"]["params"]
    if "max_grad_norm" in params:
        raise DSConfigError(f"{source}: optimizer.params.max_grad_norm is not supported: clipping is "
                            "gradient_clipping, filled from train.clip_grad")
    if t.optimizer == "lamb" and offload:
        raise DSConfigError(f"{source}: train.optimizer=lamb cannot run with zero_optimization.offload_optimizer "
                            "(ZeRO-Offload steps on the CPU with DeepSpeedCPUAdam); use --train.optimizer adamw "
                            "or remove the offload")
    try:
        choice = choose_optimizer(t.optimizer, machine, precision, stage, offload,
                                  _get(cfg, "optimizer.params.torch_adam", "bool", source, auto=False))
    except ValueError as e:
        raise DSConfigError(f"{source}: {e}") from None
    if choice.client:  # our Lamb (optim.Lamb), handed to the engine: the section would be ignored
        extra = sorted(set(params) - _HYPER)
        if extra:
            raise DSConfigError(f"{source}: optimizer.params.{extra[0]} is not used: LAMB is earlybert_ds's own "
                                "Lamb (FusedLamb's rule and defaults), which takes lr, betas, eps and weight_decay")
        if stage > 0:  # DeepSpeed lists only its own optimizers as ZeRO-tested
            cfg.setdefault("zero_allow_untested_optimizer", True)
        del cfg["optimizer"]
    for k, v in choice.ds_params.items():
        params.setdefault(k, v)
    return choice


def _validate_with_deepspeed(cfg: dict, source: str) -> None:
    """Let DeepSpeed's own parser check the nested sections (types, unknown keys) before any rank starts."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from pydantic import ValidationError

    probe = {k: v for k, v in cfg.items() if k != "train_batch_size"}  # its world size may not be ours yet
    try:
        DeepSpeedConfig(copy.deepcopy(probe))
    except (DeepSpeedConfigError, ValidationError, AssertionError, ValueError, TypeError, KeyError) as e:
        raise DSConfigError(f"{source}: DeepSpeed rejects the config: {e}") from None
