"""The run configuration: one object that flows from the command line (or a JSON/YAML file) to every component.

Sections mirror the method's parts: ``model``, ``data``, ``train`` (the engine), ``earlybert`` (search, ticket
drawing and the efficient stage), ``log``. Every field is a command-line option ``--section.field`` with its help
text, so ``--help`` documents them all; unknown or wrongly typed fields fail early with a message naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import math
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

logger = logging.getLogger("earlybert_ds")


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the field and the problem."""


#: The draws that come at ``earlybert.fixed_step`` rather than when the masks converge.
FIXED_DRAWS = ("fixed", "random_at")


class _Section:
    """Fields stay settable until :meth:`RunConfig.resolve` freezes the config."""

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise dataclasses.FrozenInstanceError(f"cannot set {name}: the run config is resolved and frozen")
        super().__setattr__(name, value)


def _f(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,  # noqa: A002 - as argparse
       lt: float | None = None, le: float | None = None) -> Any:
    """A field with its help text and its range, declared once here: :meth:`RunConfig.validate` checks every
    field's range, however the value was set (file, command line, code, a derived field)."""
    bounds = {op: v for op, v in (("ge", ge), ("gt", gt), ("lt", lt), ("le", le)) if v is not None}
    return field(default=default, metadata={"help": help, "bounds": bounds})


_COMPARE = {"ge": operator.ge, "gt": operator.gt, "lt": operator.lt, "le": operator.le}


def _out_of_range(value: Any, bounds: dict[str, float]) -> str | None:
    """Why ``value`` is outside ``bounds`` (``None`` passes: optional fields are unset)."""
    if value is None or all(_COMPARE[op](value, v) for op, v in bounds.items()):
        return None
    lo, hi = bounds.get("ge", bounds.get("gt")), bounds.get("lt", bounds.get("le"))
    if hi is None:
        return f"must be {'>=' if 'ge' in bounds else '>'} {lo:g}"
    return f"must be in {'[' if 'ge' in bounds else '('}{lo:g}, {hi:g}{']' if 'le' in bounds else ')'}"


@dataclass
class ModelArgs(_Section):
    init_from: str | None = _f(None, "start from this checkpoint directory (Hugging Face BERT, or an earlybert_ds "
                                     "model); unset: random initialisation with the shape below")
    hidden_size: int = _f(256, "hidden size", ge=1)
    num_layers: int = _f(4, "number of encoder layers", ge=1)
    num_heads: int = _f(8, "attention heads per layer (of the unpruned model)", ge=1)
    intermediate_size: int = _f(1024, "FFN width per layer (of the unpruned model)", ge=1)
    dropout: float = _f(0.1, "dropout of hidden states and attention probabilities", ge=0, lt=1)


@dataclass
class DataArgs(_Section):
    corpus: str | None = _f(None, "text file, directory of text files, .jsonl/.parquet file, or a datasets hub "
                                  "name; unset: the built-in corpus (docstrings and comments of Python's stdlib)")
    text_column: str = _f("text", "column holding the text in JSON-lines/parquet/hub corpora")
    tokenizer: str | None = _f(None, "local Hugging Face tokenizer directory; unset: train a WordPiece vocabulary "
                                     "on the corpus (saved with the run)")
    vocab_size: int = _f(8192, "vocabulary size when training a WordPiece tokenizer", ge=1)
    seq_len: int = _f(128, "tokens per packed training sequence", ge=8)
    mlm_probability: float = _f(0.15, "fraction of tokens masked for MLM (80% [MASK] / 10% random / 10% kept)",
                                gt=0, lt=1)
    whole_word_mask: bool = _f(False, "mask whole words rather than single WordPiece tokens")
    val_fraction: float = _f(0.02, "fraction of sequences held out for validation", gt=0, lt=1)
    cache_dir: str | None = _f(None, "where tokenised corpora are cached; unset: ~/.cache/earlybert_ds")
    num_workers: int | None = _f(None, "processes tokenising the corpus; unset: the CPUs (at most 8)", ge=1)


@dataclass
class TrainArgs(_Section):
    steps: int = _f(300, "total optimizer steps (search + efficient training)", ge=1)
    micro_batch_size: int = _f(8, "sequences per rank per forward pass", ge=1)
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step", ge=1)
    optimizer: Literal["adamw", "lamb"] = _f("adamw", "optimizer (adamw: torch's fused AdamW, DeepSpeed's FusedAdam "
                                                      "where prebuilt, CPUAdam under ZeRO-Offload; lamb: a "
                                                      "per-parameter trust ratio at every ZeRO stage)")
    lr: float = _f(1e-3, "peak learning rate", gt=0)
    warmup_steps: int = _f(30, "linear warm-up steps", ge=0)
    schedule: Literal["linear", "cosine", "constant"] = _f("linear", "decay after warm-up")
    weight_decay: float = _f(0.01, "decoupled weight decay (not on biases, LayerNorm and gates)", ge=0)
    betas: tuple[float, float] = _f((0.9, 0.98), "Adam/LAMB betas")
    eps: float = _f(1e-6, "Adam/LAMB epsilon", gt=0)
    clip_grad: float = _f(1.0, "global gradient-norm clipping (0: off)", ge=0)
    precision: Literal["fp32", "bf16", "fp16"] | None = _f(None, "mixed precision; unset: as the DeepSpeed config "
                                                                 "says ('auto': bf16 on GPUs of compute capability "
                                                                 ">= 8.0 and on CPUs with bf16 units (AMX-BF16, "
                                                                 "AVX512-BF16); fp16 on older GPUs under ZeRO >= 1; "
                                                                 "else fp32)")
    zero_stage: Literal[0, 1, 2, 3] | None = _f(None, "ZeRO stage; unset: as the DeepSpeed config says (0 if 'auto')")
    activation_checkpointing: bool = _f(False, "recompute each layer's activations in the backward pass")
    seed: int = _f(42, "random seed (model init, masking, data order)", ge=0)
    deterministic: bool = _f(False, "deterministic kernels (torch.use_deterministic_algorithms, "
                                    "CUBLAS_WORKSPACE_CONFIG): on CUDA, what bit-identical resume and reruns need; "
                                    "CPU runs are deterministic without it")
    log_every: int = _f(10, "log metrics every N steps", ge=1)
    eval_every: int = _f(50, "validate every N steps (0: only at the end)", ge=0)
    eval_batches: int = _f(20, "validation micro-batches per rank", ge=1)
    save_every: int = _f(100, "checkpoint every N steps (0: only at stage ends)", ge=0)
    keep_last: int = _f(2, "checkpoints kept (older ones are deleted)", ge=1)
    max_nonfinite: int = _f(3, "stop after this many consecutive non-finite losses", ge=1)


@dataclass
class EarlyBertArgs(_Section):
    enabled: bool = _f(True, "run EarlyBERT (search, ticket, shrink); false: train the full model throughout")
    l1_heads: float = _f(1e-4, "L1 coefficient on the head gates (raw sum, as in the official code)", ge=0)
    l1_ffn: float = _f(1e-4, "L1 coefficient on the FFN-neuron gates", ge=0)
    gate_lr: float | None = _f(None, "learning rate of the gates' own optimizer group (never weight-decayed); "
                                     "unset: train.lr, as the official code", gt=0)
    score: Literal["magnitude", "signed", "taylor"] = _f(
        "magnitude", "what units are ranked by: magnitude |gate| (the paper); signed gate values (the official "
                     "code); taylor: |gate x dL/dgate| summed over the search steps (first-order Taylor importance)")
    taylor_decay: float = _f(1.0, "score=taylor: the running total is multiplied by this before each step's score is "
                                  "added; 1: the plain sum; < 1: an exponential average over the last ~1/(1 - decay) "
                                  "steps, which forgets the first steps' ranking (in fine-tuning it reverses later)",
                             gt=0, le=1)
    head_ratio: float = _f(1 / 3, "fraction of attention heads pruned", ge=0, lt=1)
    ffn_ratio: float = _f(0.4, "fraction of FFN neurons pruned", ge=0, lt=1)
    head_method: Literal["layerwise", "global"] = _f("layerwise", "head pruning: per layer or across layers")
    ffn_method: Literal["layerwise", "global"] = _f("global", "FFN pruning: per layer or across layers")
    ffn_multiple: int = _f(64, "round kept FFN widths up to a multiple of this: odd widths lose ~15% of the "
                               "speedup to slow GEMM kernels (bench throughput, variant c vs e); 1: exact ratio", ge=1)
    draw: Literal["earlybird", "fixed", "random", "random_at", "given"] = _f(
        "earlybird", "earlybird: when masks converge; fixed: at fixed_step; random: a random ticket at step 0 (the "
                     "paper's baseline); random_at: the same search, then a random ticket at fixed_step (the control "
                     "that isolates which units are kept); given: no search, earlybert.ticket from step 0")
    ticket: str | None = _f(None, "draw=given: a ticket.json (or a run's ticket/ directory) drawn elsewhere, e.g. by "
                                  "another run or task; it keeps its own ratios and must fit the model")
    detect_every: int | None = _f(None, "compute masks and their distance every N search steps; unset: from the "
                                        "search budget, so that window+1 checks fit in half of it", ge=1)
    window: int = _f(5, "early-bird window: the last N mask distances must all be <= epsilon", ge=1)
    epsilon: float = _f(0.1, "early-bird threshold on the normalised Hamming distance", gt=0)
    max_search_steps: int = _f(100, "end the search here even without convergence", ge=1)
    fixed_step: int | None = _f(None, "draw at this step (draw=fixed)", ge=1)
    weights: Literal["rewind", "continue"] = _f("rewind", "rewind: kept weights restart from initial (or "
                                                          "pre-trained) values; continue: keep searched values")
    rewarmup_steps: int = _f(0, "after the ticket, warm the learning rate up again linearly over N steps (the "
                                "efficient stage starts with fresh optimizer moments at a mid-schedule rate)", ge=0)


@dataclass
class FinetuneArgs(_Section):
    task: str | None = _f(None, "GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), squad, squad_v2, "
                                "or custom (a CSV/JSON-lines file with named columns)")
    data: str | None = _f(None, "GLUE directory in the standard TSV layout (or 'hub' when online); for SQuAD a "
                                "directory holding train-v1.1.json/dev-v1.1.json (v2.0 for squad_v2)")
    train_file: str | None = _f(None, "training file (overrides data)")
    dev_file: str | None = _f(None, "development file (overrides data)")
    test_file: str | None = _f(None, "unlabelled file to write predictions for (OUTPUT/predictions/)")
    text_a: str = _f("sentence1", "custom task: column of the first text")
    text_b: str | None = _f(None, "custom task: column of the second text (pairs)")
    label_column: str = _f("label", "custom task: column of the label")
    num_labels: int = _f(2, "custom task: number of classes (1: regression); with class names, their number", ge=1)
    label_list: str | None = _f(None, "custom task: the class labels in id order, comma-separated (e.g. "
                                      "negative,positive); unset: from the training file, integers as they are, "
                                      "names in sorted order")
    max_len: int | None = _f(None, "maximum tokens per example (default: 128; 384 for SQuAD)", ge=8)
    stride: int = _f(128, "SQuAD: overlap of the windows over long contexts", ge=0)
    epochs: float | None = _f(3.0, "training epochs; sets train.steps (none: use train.steps)", gt=0)
    search_epochs: float | None = _f(0.2, "EarlyBERT search budget in epochs (official code: 20% of the first); "
                                          "sets earlybert.max_search_steps (none: use that)", gt=0)
    warmup_fraction: float | None = _f(0.1, "warm-up as a fraction of all steps; sets train.warmup_steps", ge=0, lt=1)


@dataclass
class LogArgs(_Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = _f("auto", "auto: online if wandb is logged in, "
                                                                         "else offline")
    project: str = _f("earlybert_ds", "wandb project")
    run_name: str | None = _f(None, "wandb run name (default: the output directory's name)")
    progress: bool = _f(True, "live progress bar on rank 0")


@dataclass
class RunConfig(_Section):
    output_dir: str = _f("runs/earlybert", "where checkpoints, the ticket, metrics and the final model go")
    deepspeed: str | None = _f(None, "DeepSpeed JSON config; unset: ds_configs/cpu.json's defaults "
                                     "(earlybert_ds.dsconfig.DEFAULT_DS_CONFIG)")
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    earlybert: EarlyBertArgs = field(default_factory=EarlyBertArgs)
    finetune: FinetuneArgs = field(default_factory=FinetuneArgs)
    log: LogArgs = field(default_factory=LogArgs)

    def __post_init__(self) -> None:
        #: The ``section.field`` keys set by a config file or the command line (not by a command's defaults):
        #: what a resume from a ticket must not silently ignore. Not a field: it is not saved with the run.
        self.given: set[str] = set()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "RunConfig":
        """A checked config from sections as mappings (``{"train": {"lr": 3e-4}}``, a saved ``run_config.json``) or
        ``section.field`` keys (``{"train.lr": 3e-4}``, as the benchmarks write their settings), or both."""
        cfg = cls()
        _apply(cfg, _flatten(data, source), source)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every field's declared type choices and range, then what one field cannot say alone."""
        fields = all_fields()
        for key, hint in _hints().items():
            value = self._get(key)
            if (choices := _choices(hint)) is not None:
                if not _is_choice(value, choices):
                    raise ConfigError(f"{key}={value!r} must be one of {', '.join(map(str, choices))}")
            elif why := _out_of_range(value, fields[key].metadata.get("bounds", {})):
                raise ConfigError(f"{key}={value} {why}")
        t, e, m = self.train, self.earlybert, self.model

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(t.warmup_steps <= t.steps, f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
        need(m.hidden_size % m.num_heads == 0, f"model.hidden_size={m.hidden_size} is not a multiple of "
                                               f"model.num_heads={m.num_heads}")
        need(self.data.seq_len <= 512 or m.init_from is None, f"data.seq_len={self.data.seq_len}: BERT checkpoints "
                                                              "have 512 positions")
        need(e.draw == "given" or e.ticket is None, f"earlybert.ticket={e.ticket} needs earlybert.draw=given")
        need(e.draw != "given" or bool(e.ticket), "earlybert.draw=given needs earlybert.ticket (a ticket.json)")
        need(e.ticket is None or Path(e.ticket).exists(), f"earlybert.ticket={e.ticket}: no such ticket file")
        need(e.taylor_decay == 1.0 or e.score == "taylor",
             f"earlybert.taylor_decay={e.taylor_decay:g} needs earlybert.score=taylor (it discounts the Taylor sums)")
        if e.enabled and e.draw in FIXED_DRAWS:  # their own budget
            need(e.fixed_step is not None and e.fixed_step < t.steps,
                 f"earlybert.draw={e.draw} needs earlybert.fixed_step in [1, train.steps={t.steps})")
        elif e.enabled and e.draw == "earlybird":  # random and given draw at step 0, without a search
            need(e.max_search_steps < t.steps,
                 f"earlybert.max_search_steps={e.max_search_steps} must be in [1, train.steps={t.steps})")

    def resolve(self, epoch_examples: int | None = None, world_size: int = 1) -> "RunConfig":
        """The one step that settles the derived fields, then checks everything and freezes the config, so that
        every component reads the same final values: an epoch-based budget (fine-tuning: ``epoch_examples``
        training examples) becomes ``train.steps``, the search limit and the warm-up; the early-bird schedule is
        fitted to the search budget."""
        if epoch_examples is not None:
            _settle_epochs(self, epoch_examples, world_size)
        settle_detect_every(self.earlybert)
        self.validate()
        for part in (self, *(getattr(self, sec) for sec in _sections())):
            object.__setattr__(part, "_frozen", True)
        return self

    def _get(self, key: str) -> Any:
        *path, name = key.split(".")
        return getattr(getattr(self, path[0]) if path else self, name)


def _settle_epochs(cfg: RunConfig, examples: int, world_size: int) -> None:
    """An epoch-based budget in steps: ``finetune.epochs`` -> ``train.steps``, ``finetune.search_epochs`` -> the
    search limit, ``finetune.warmup_fraction`` -> ``train.warmup_steps``."""
    t, f = cfg.train, cfg.finetune
    per_epoch = max(1, math.ceil(examples / (t.micro_batch_size * t.grad_accum * world_size)))
    if f.epochs is not None:
        t.steps = max(2, math.ceil(f.epochs * per_epoch))
    if f.search_epochs is not None:
        cfg.earlybert.max_search_steps = min(t.steps - 1, max(1, math.ceil(f.search_epochs * per_epoch)))
    if f.warmup_fraction is not None:
        t.warmup_steps = int(f.warmup_fraction * t.steps)
    logger.info("fine-tuning on %d examples: %d steps per epoch, %d steps, search limit %d", examples, per_epoch,
                t.steps, cfg.earlybert.max_search_steps)


def settle_detect_every(e: EarlyBertArgs) -> None:
    """Fit the detection schedule to the search budget when ``detect_every`` is unset: ``window + 1`` checks must
    fit in half the budget, or the test could never fire before the limit (a fine-tuning search of 16 steps with
    checks every 10 steps and a window of 5 always drew at max_steps)."""
    if e.detect_every is not None or not e.enabled:
        return
    budget = e.fixed_step if e.draw in FIXED_DRAWS else e.max_search_steps
    e.detect_every = max(1, budget // (2 * (e.window + 1)))
    logger.info("early-bird checks every %d step(s): %d checks fit in the search budget of %d steps (window %d)",
                e.detect_every, budget // e.detect_every, budget, e.window)


# ---- loading and the command line ----------------------------------------------------------------------------

def _sections() -> dict[str, type]:
    return {"model": ModelArgs, "data": DataArgs, "train": TrainArgs, "earlybert": EarlyBertArgs,
            "finetune": FinetuneArgs, "log": LogArgs}


@functools.cache
def all_fields() -> dict[str, dataclasses.Field]:
    """Every option as ``section.name`` (or ``name`` at the top level) -> its dataclass field."""
    out = {f.name: f for f in dataclasses.fields(RunConfig) if f.name not in _sections()}
    for sec, cls in _sections().items():
        out.update({f"{sec}.{f.name}": f for f in dataclasses.fields(cls)})
    return out


@functools.cache
def _hints() -> dict[str, Any]:
    hints = typing.get_type_hints(RunConfig)
    out = {k: v for k, v in hints.items() if k not in _sections()}
    for sec, cls in _sections().items():
        out.update({f"{sec}.{k}": v for k, v in typing.get_type_hints(cls).items()})
    return out


def _choices(hint: Any) -> tuple | None:
    """The values a ``Literal`` (or optional ``Literal``) field admits; ``None`` for other fields."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return args
    literal = [a for a in args if typing.get_origin(a) is Literal]
    return (*typing.get_args(literal[0]), None) if literal else None


def _is_choice(value: Any, choices: tuple) -> bool:
    return any(value == c and type(value) is type(c) for c in choices)  # True is not the ZeRO stage 1


def _flatten(data: dict, source: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if k in _sections():
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: section '{k}' must be a mapping")
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Check (and for command-line strings, parse) ``value`` against the field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], source)
    if origin is Literal:
        if isinstance(value, str) and all(type(a) is int for a in args) and value.lstrip("-").isdigit():
            value = int(value)  # a ZeRO stage from the command line
        if not _is_choice(value, args):
            raise ConfigError(f"{source}: {key}={value!r} must be one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {key}={value!r} must be {len(args)} numbers")
        return tuple(_coerce(key, v, a, source) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{source}: {key}={value!r} must be true or false")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {key}={value!r} must be a number, not a boolean")
        if isinstance(value, str):
            try:
                value = float(value) if hint is float else int(value)
            except ValueError:
                raise ConfigError(f"{source}: {key}={value!r} is not a valid {hint.__name__}") from None
        if hint is int and not isinstance(value, int):
            raise ConfigError(f"{source}: {key}={value!r} must be an integer")
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}={value!r} must be a number")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _apply(cfg: RunConfig, flat: dict[str, Any], source: str) -> None:
    hints = _hints()
    for key, value in flat.items():
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown field '{key}'{hint}")
        value = _coerce(key, value, hints[key], source)
        if source != "defaults":
            cfg.given.add(key)
        target = cfg
        *path, name = key.split(".")
        for p in path:
            target = getattr(target, p)
        setattr(target, name, value)


def load_config_file(path: str | Path) -> dict:
    """A JSON or YAML run-config file as a dict (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse config ({e})") from e
    return data or {}


#: Each command's defaults where they differ from the fields' own. Fine-tuning: BERT's fine-tuning recipe; the
#: paper's ``rewind`` (to the pre-trained weights) stays. Pre-training from scratch: ``continue``, as measured by
#: ``bench tickets --task pretrain`` (README, "Pre-training at 1,000 steps": rewind ends 1.6% above the full model's
#: loss, continue within its interval).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"earlybert.weights": "continue"},
    "finetune": {"train.lr": 2e-5, "train.micro_batch_size": 32, "train.weight_decay": 0.01,
                 "train.betas": (0.9, 0.999), "train.eval_every": 0, "train.save_every": 0, "model.dropout": 0.1},
}


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                         defaults: dict[str, Any] | None = None) -> None:
    """Add ``--config`` and one ``--section.field`` option per field (values are parsed and checked later);
    sections in ``skip`` are left out (they still load from a config file); ``defaults``, the command's own, are
    the ones its ``--help`` shows."""
    parser.add_argument("--config", help="JSON or YAML run-config file (command-line options override it)")
    groups = {sec: parser.add_argument_group(f"{sec} options") for sec in _sections() if sec not in skip}
    for key, f in all_fields().items():
        sec = key.split(".")[0] if "." in key else None
        if sec in skip:
            continue
        group = groups[sec] if sec else parser
        flag = "--" + key.replace("_", "-") if sec is None else "--" + key
        default = (defaults or {}).get(key, f.default if f.default is not dataclasses.MISSING else None)
        group.add_argument(flag, dest=f"cfg:{key}", default=None, metavar=_metavar(key),
                           help=f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%"))


def _metavar(key: str) -> str:
    hint = _hints()[key]
    if typing.get_origin(hint) is Literal:
        return "{" + ",".join(map(str, typing.get_args(hint))) + "}"
    return key.split(".")[-1].upper()


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None,
                     defaults: dict[str, Any] | None = None) -> RunConfig:
    """``defaults`` (a command's own), then ``--config``, then ``extra`` (shortcut options), then explicit
    ``--section.field`` options."""
    cfg = RunConfig()
    _apply(cfg, defaults or {}, "defaults")
    if getattr(args, "config", None):
        _apply(cfg, _flatten(load_config_file(args.config), args.config), args.config)
    if extra:
        _apply(cfg, {k: v for k, v in extra.items() if v is not None}, "command line")
    cli = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    _apply(cfg, cli, "command line")
    cfg.validate()
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2) + "\n")
