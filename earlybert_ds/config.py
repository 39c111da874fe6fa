"""The run configuration: one object that flows from the command line (or a JSON/YAML file) to every component.

Sections mirror the method's parts: ``model``, ``data``, ``train`` (the engine), ``earlybert`` (search, ticket
drawing and the efficient stage), ``log``. Every field is a command-line option ``--section.field`` with its help
text, so ``--help`` documents them all; unknown or wrongly typed fields fail early with a message naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the field and the problem."""


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArgs:
    init_from: str | None = _f(None, "start from this checkpoint directory (Hugging Face BERT, or an earlybert_ds "
                                     "model); unset: random initialisation with the shape below")
    hidden_size: int = _f(256, "hidden size")
    num_layers: int = _f(4, "number of encoder layers")
    num_heads: int = _f(8, "attention heads per layer (of the unpruned model)")
    intermediate_size: int = _f(1024, "FFN width per layer (of the unpruned model)")
    dropout: float = _f(0.1, "dropout of hidden states and attention probabilities")


@dataclass
class DataArgs:
    corpus: str | None = _f(None, "text file, directory of text files, .jsonl/.parquet file, or a datasets hub "
                                  "name; unset: the built-in corpus (docstrings and comments of Python's stdlib)")
    text_column: str = _f("text", "column holding the text in JSON-lines/parquet/hub corpora")
    tokenizer: str | None = _f(None, "local Hugging Face tokenizer directory; unset: train a WordPiece vocabulary "
                                     "on the corpus (saved with the run)")
    vocab_size: int = _f(8192, "vocabulary size when training a WordPiece tokenizer")
    seq_len: int = _f(128, "tokens per packed training sequence")
    mlm_probability: float = _f(0.15, "fraction of tokens masked for MLM (80% [MASK] / 10% random / 10% kept)")
    whole_word_mask: bool = _f(False, "mask whole words rather than single WordPiece tokens")
    val_fraction: float = _f(0.02, "fraction of sequences held out for validation")
    cache_dir: str | None = _f(None, "where tokenised corpora are cached; unset: ~/.cache/earlybert_ds")
    num_workers: int | None = _f(None, "processes tokenising the corpus; unset: the CPUs (at most 8)")


@dataclass
class TrainArgs:
    steps: int = _f(300, "total optimizer steps (search + efficient training)")
    micro_batch_size: int = _f(8, "sequences per rank per forward pass")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    optimizer: Literal["adamw", "lamb"] = _f("adamw", "optimizer (lamb: a per-parameter trust ratio at every ZeRO "
                                                      "stage; DeepSpeed's FusedLamb on CUDA at ZeRO-0)")
    lr: float = _f(1e-3, "peak learning rate")
    warmup_steps: int = _f(30, "linear warm-up steps")
    schedule: Literal["linear", "cosine", "constant"] = _f("linear", "decay after warm-up")
    weight_decay: float = _f(0.01, "decoupled weight decay (not on biases, LayerNorm and gates)")
    betas: tuple[float, float] = _f((0.9, 0.98), "Adam/LAMB betas")
    eps: float = _f(1e-6, "Adam/LAMB epsilon")
    clip_grad: float = _f(1.0, "global gradient-norm clipping (0: off)")
    precision: Literal["fp32", "bf16", "fp16"] | None = _f(None, "mixed precision; unset: as the DeepSpeed config "
                                                                 "says ('auto': bf16 on CUDA and on CPUs with bf16 "
                                                                 "units (AMX-BF16, AVX512-BF16), else fp32)")
    zero_stage: int | None = _f(None, "ZeRO stage 0-3; unset: as the DeepSpeed config says (0 if 'auto')")
    activation_checkpointing: bool = _f(False, "recompute each layer's activations in the backward pass")
    seed: int = _f(42, "random seed (model init, masking, data order)")
    log_every: int = _f(10, "log metrics every N steps")
    eval_every: int = _f(50, "validate every N steps (0: only at the end)")
    eval_batches: int = _f(20, "validation micro-batches per rank")
    save_every: int = _f(100, "checkpoint every N steps (0: only at stage ends)")
    keep_last: int = _f(2, "checkpoints kept (older ones are deleted)")
    max_nonfinite: int = _f(3, "stop after this many consecutive non-finite losses")


@dataclass
class EarlyBertArgs:
    enabled: bool = _f(True, "run EarlyBERT (search, ticket, shrink); false: train the full model throughout")
    l1_heads: float = _f(1e-4, "L1 coefficient on the head gates (raw sum, as in the official code)")
    l1_ffn: float = _f(1e-4, "L1 coefficient on the FFN-neuron gates")
    gate_lr: float | None = _f(None, "learning rate of the gates' own optimizer group (never weight-decayed); "
                                     "unset: train.lr, as the official code")
    score: Literal["magnitude", "signed", "taylor"] = _f(
        "magnitude", "what units are ranked by: magnitude |gate| (the paper); signed gate values (the official "
                     "code); taylor: |gate x dL/dgate| summed over the search steps (first-order Taylor importance)")
    head_ratio: float = _f(1 / 3, "fraction of attention heads pruned")
    ffn_ratio: float = _f(0.4, "fraction of FFN neurons pruned")
    head_method: Literal["layerwise", "global"] = _f("layerwise", "head pruning: per layer or across layers")
    ffn_method: Literal["layerwise", "global"] = _f("global", "FFN pruning: per layer or across layers")
    ffn_multiple: int = _f(64, "round kept FFN widths up to a multiple of this: odd widths lose ~15% of the "
                               "speedup to slow GEMM kernels (bench throughput, variant c vs e); 1: exact ratio")
    draw: Literal["earlybird", "fixed", "random", "random_at"] = _f(
        "earlybird", "earlybird: when masks converge; fixed: at fixed_step; random: a random ticket at step 0 (the "
                     "paper's baseline); random_at: the same search, then a random ticket at fixed_step (the control "
                     "that isolates which units are kept)")
    detect_every: int | None = _f(None, "compute masks and their distance every N search steps; unset: from the "
                                        "search budget, so that window+1 checks fit in half of it")
    window: int = _f(5, "early-bird window: the last N mask distances must all be <= epsilon")
    epsilon: float = _f(0.1, "early-bird threshold on the normalised Hamming distance")
    max_search_steps: int = _f(100, "end the search here even without convergence")
    fixed_step: int | None = _f(None, "draw at this step (draw=fixed)")
    weights: Literal["rewind", "continue"] = _f("rewind", "rewind: kept weights restart from initial (or "
                                                          "pre-trained) values; continue: keep searched values")
    rewarmup_steps: int = _f(0, "after the ticket, warm the learning rate up again linearly over N steps (the "
                                "efficient stage starts with fresh optimizer moments at a mid-schedule rate)")


@dataclass
class FinetuneArgs:
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
    num_labels: int = _f(2, "custom task: number of classes (1: regression); with class names, their number")
    label_list: str | None = _f(None, "custom task: the class labels in id order, comma-separated (e.g. "
                                      "negative,positive); unset: from the training file, integers as they are, "
                                      "names in sorted order")
    max_len: int | None = _f(None, "maximum tokens per example (default: 128; 384 for SQuAD)")
    stride: int = _f(128, "SQuAD: overlap of the windows over long contexts")
    epochs: float | None = _f(3.0, "training epochs; sets train.steps (none: use train.steps)")
    search_epochs: float | None = _f(0.2, "EarlyBERT search budget in epochs (official code: 20% of the first); "
                                          "sets earlybert.max_search_steps (none: use that)")
    warmup_fraction: float | None = _f(0.1, "warm-up as a fraction of all steps; sets train.warmup_steps")


@dataclass
class LogArgs:
    wandb: Literal["auto", "online", "offline", "disabled"] = _f("auto", "auto: online if wandb is logged in, "
                                                                         "else offline")
    project: str = _f("earlybert_ds", "wandb project")
    run_name: str | None = _f(None, "wandb run name (default: the output directory's name)")
    progress: bool = _f(True, "live progress bar on rank 0")


@dataclass
class RunConfig:
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
        cfg = cls()
        _apply(cfg, _flatten(data, source), source)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Cross-field checks that a single field's type cannot express."""
        t, e, d = self.train, self.earlybert, self.data

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("steps", "micro_batch_size", "grad_accum", "log_every", "keep_last", "eval_batches",
                     "max_nonfinite"):
            need(getattr(t, name) >= 1, f"train.{name}={getattr(t, name)} must be >= 1")
        for name in ("warmup_steps", "eval_every", "save_every"):
            need(getattr(t, name) >= 0, f"train.{name}={getattr(t, name)} must be >= 0")
        need(t.warmup_steps <= t.steps, f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
        need(t.lr > 0, f"train.lr={t.lr} must be > 0")
        need(t.zero_stage is None or t.zero_stage in (0, 1, 2, 3), f"train.zero_stage={t.zero_stage}: ZeRO stages "
                                                                    "are 0, 1, 2, 3")
        need(t.clip_grad >= 0, f"train.clip_grad={t.clip_grad} must be >= 0")
        need(0 < d.mlm_probability < 1, f"data.mlm_probability={d.mlm_probability} must be in (0, 1)")
        need(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in (0, 1)")
        need(d.seq_len >= 8, f"data.seq_len={d.seq_len} is too short (>= 8)")
        need(d.vocab_size >= 1, f"data.vocab_size={d.vocab_size} must be >= 1")
        need(d.num_workers is None or d.num_workers >= 1, f"data.num_workers={d.num_workers} must be >= 1")
        need(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
        need(t.eps > 0, f"train.eps={t.eps} must be > 0")
        need(t.seed >= 0, f"train.seed={t.seed} must be >= 0")
        m = self.model
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            need(getattr(m, name) >= 1, f"model.{name}={getattr(m, name)} must be >= 1")
        need(0 <= m.dropout < 1, f"model.dropout={m.dropout} must be in [0, 1)")
        need(m.hidden_size % m.num_heads == 0, f"model.hidden_size={m.hidden_size} is not a multiple of "
                                               f"model.num_heads={m.num_heads}")
        need(d.seq_len <= 512 or m.init_from is None, f"data.seq_len={d.seq_len}: BERT checkpoints have 512 "
                                                      "positions")
        f = self.finetune
        need(f.num_labels >= 1, f"finetune.num_labels={f.num_labels} must be >= 1 (1: regression)")
        need(f.max_len is None or f.max_len >= 8, f"finetune.max_len={f.max_len} is too short (>= 8)")
        need(f.stride >= 0, f"finetune.stride={f.stride} must be >= 0")
        for name in ("epochs", "search_epochs"):
            need(getattr(f, name) is None or getattr(f, name) > 0, f"finetune.{name}={getattr(f, name)} must be > 0")
        need(f.warmup_fraction is None or 0 <= f.warmup_fraction < 1,
             f"finetune.warmup_fraction={f.warmup_fraction} must be in [0, 1)")
        if e.enabled:
            for name in ("head_ratio", "ffn_ratio"):
                r = getattr(e, name)
                need(0 <= r < 1, f"earlybert.{name}={r}: a pruning ratio must be in [0, 1)")
            need(e.epsilon > 0, f"earlybert.epsilon={e.epsilon}: the mask-distance threshold must be > 0")
            for name in ("l1_heads", "l1_ffn"):
                need(getattr(e, name) >= 0, f"earlybert.{name}={getattr(e, name)}: an L1 coefficient must be >= 0")
            need(e.window >= 1, f"earlybert.window={e.window} must be >= 1")
            need(e.detect_every is None or e.detect_every >= 1,
                 f"earlybert.detect_every={e.detect_every} must be >= 1")
            need(e.gate_lr is None or e.gate_lr > 0, f"earlybert.gate_lr={e.gate_lr} must be > 0")
            need(e.rewarmup_steps >= 0, f"earlybert.rewarmup_steps={e.rewarmup_steps} must be >= 0")
            need(e.ffn_multiple >= 1, f"earlybert.ffn_multiple={e.ffn_multiple} must be >= 1")
            fixed = e.draw in ("fixed", "random_at")  # their own budget
            need(fixed or 1 <= e.max_search_steps < t.steps,
                 f"earlybert.max_search_steps={e.max_search_steps} must be in [1, train.steps={t.steps})")
            if fixed:
                need(e.fixed_step is not None and 1 <= e.fixed_step < t.steps,
                     f"earlybert.draw={e.draw} needs earlybert.fixed_step in [1, train.steps={t.steps})")


# ---- loading and the command line ----------------------------------------------------------------------------

def _sections() -> dict[str, type]:
    return {"model": ModelArgs, "data": DataArgs, "train": TrainArgs, "earlybert": EarlyBertArgs,
            "finetune": FinetuneArgs, "log": LogArgs}


def all_fields() -> dict[str, dataclasses.Field]:
    """Every option as ``section.name`` (or ``name`` at the top level) -> its dataclass field."""
    out = {f.name: f for f in dataclasses.fields(RunConfig) if f.name not in _sections()}
    for sec, cls in _sections().items():
        out.update({f"{sec}.{f.name}": f for f in dataclasses.fields(cls)})
    return out


def _hints() -> dict[str, Any]:
    hints = typing.get_type_hints(RunConfig)
    out = {k: v for k, v in hints.items() if k not in _sections()}
    for sec, cls in _sections().items():
        out.update({f"{sec}.{k}": v for k, v in typing.get_type_hints(cls).items()})
    return out


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
        if value not in args:
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


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add ``--config`` and one ``--section.field`` option per field (values are parsed and checked later);
    sections in ``skip`` are left out (they still load from a config file)."""
    parser.add_argument("--config", help="JSON or YAML run-config file (command-line options override it)")
    groups = {sec: parser.add_argument_group(f"{sec} options") for sec in _sections() if sec not in skip}
    for key, f in all_fields().items():
        sec = key.split(".")[0] if "." in key else None
        if sec in skip:
            continue
        group = groups[sec] if sec else parser
        flag = "--" + key.replace("_", "-") if sec is None else "--" + key
        default = f.default if f.default is not dataclasses.MISSING else None
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
