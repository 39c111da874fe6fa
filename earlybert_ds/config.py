"""The run configuration: one object that flows from the command line (or a JSON/YAML file) to every component.

Sections mirror the method's parts: ``model``, ``data``, ``train`` (the engine), ``earlybert`` (search, ticket
drawing and the efficient stage), ``finetune``, ``log``. Every field is a command-line option ``--section.field``
of the commands it applies to, with its help text; a field declares its range, its command and whether a resumed
run may change it, so that adding one is one declaration. Everything wrong with a configuration is reported at
once, naming each field.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

logger = logging.getLogger("earlybert_ds")

RECIPES = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names each field and its problem (all of them)."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems in the run configuration:\n"
                             + "\n".join(f"  - {p}" for p in self.problems))


#: The draws that come at ``earlybert.fixed_step`` rather than when the masks converge.
FIXED_DRAWS = ("fixed", "random_at")
#: The draws without a search: the ticket is there at step 0.
NO_SEARCH_DRAWS = ("random", "given", "probe")


class _Section:
    """Fields stay settable until :meth:`RunConfig.resolve` freezes the config."""

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise dataclasses.FrozenInstanceError(f"cannot set {name}: the run config is resolved and frozen")
        super().__setattr__(name, value)


def _f(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,  # noqa: A002 - as argparse
       lt: float | None = None, le: float | None = None, only: str | None = None, resume: bool = False) -> Any:
    """A field with its help text and its range, declared once here: :meth:`RunConfig.validate` checks every
    field's range, however the value was set (file, command line, code, a derived field). ``only``: the one command
    whose option it is; ``resume``: a resumed run may change it (``--resume-override``)."""
    bounds = {op: v for op, v in (("ge", ge), ("gt", gt), ("lt", lt), ("le", le)) if v is not None}
    return field(default=default, metadata={"help": help, "bounds": bounds, "only": only, "resume": resume})


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
    init_from: str | None = _f(None, "start from this model directory (a Hugging Face BERT, or an earlybert_ds "
                                     "model); its tokenizer is the default data.tokenizer. Unset: random "
                                     "initialisation with the shape below (pre-training only)")
    hidden_size: int = _f(256, "hidden size", ge=1, only="pretrain")
    num_layers: int = _f(4, "number of encoder layers", ge=1, only="pretrain")
    num_heads: int = _f(8, "attention heads per layer (of the unpruned model)", ge=1, only="pretrain")
    intermediate_size: int = _f(1024, "FFN width per layer (of the unpruned model)", ge=1, only="pretrain")
    dropout: float = _f(0.1, "dropout of hidden states and attention probabilities", ge=0, lt=1)


@dataclass
class DataArgs(_Section):
    corpus: str | None = _f(None, "text file, directory of text files, .jsonl/.parquet file, or a datasets hub "
                                  "name; unset: the built-in corpus (docstrings and comments of Python's stdlib)",
                            only="pretrain")
    text_column: str = _f("text", "column holding the text in JSON-lines/parquet/hub corpora", only="pretrain")
    tokenizer: str | None = _f(None, "local Hugging Face tokenizer directory; unset: model.init_from's, else "
                                     "(pre-training) a WordPiece vocabulary trained on the corpus, saved with the run")
    vocab_size: int = _f(8192, "vocabulary size of the WordPiece tokenizer trained when there is none", ge=1,
                         only="pretrain")
    seq_len: int = _f(128, "tokens per packed training sequence", ge=8, only="pretrain")
    mlm_probability: float = _f(0.15, "fraction of tokens masked for MLM (80% [MASK] / 10% random / 10% kept)",
                                gt=0, lt=1, only="pretrain")
    whole_word_mask: bool = _f(False, "mask whole words rather than single WordPiece tokens", only="pretrain")
    val_fraction: float = _f(0.02, "fraction of sequences held out for validation", gt=0, lt=1, only="pretrain")
    cache_dir: str | None = _f(None, "where tokenised corpora are cached; unset: ~/.cache/earlybert_ds",
                               only="pretrain", resume=True)
    num_workers: int | None = _f(None, "processes tokenising the corpus; unset: the CPUs (at most 8)", ge=1,
                                 only="pretrain", resume=True)


@dataclass
class TrainArgs(_Section):
    steps: int | None = _f(300, "total optimizer steps (search + efficient training); fine-tuning: unset = "
                                "finetune.epochs", ge=1, resume=True)
    global_batch_size: int | None = _f(None, "sequences per optimizer step over all ranks; set: each rank's share is "
                                             "split into micro-batches of at most train.micro_batch_size (the "
                                             "accumulation follows the number of ranks). Unset: micro_batch_size x "
                                             "grad_accum x ranks", ge=1)
    micro_batch_size: int = _f(8, "sequences per rank per forward pass; with a global batch: at most this many",
                               ge=1)
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step (derived with a global batch)", ge=1)
    optimizer: Literal["adamw", "lamb"] = _f("adamw", "optimizer (adamw: torch's fused AdamW, DeepSpeed's FusedAdam "
                                                      "where prebuilt, CPUAdam under ZeRO-Offload; lamb: a "
                                                      "per-parameter trust ratio at every ZeRO stage)")
    lr: float = _f(1e-3, "peak learning rate", gt=0)
    warmup_steps: int | None = _f(None, "linear warm-up steps; unset: train.warmup_ratio of the steps", ge=0)
    warmup_ratio: float = _f(0.1, "warm-up as a fraction of train.steps (when warmup_steps is unset)", ge=0, lt=1)
    schedule: Literal["linear", "cosine", "constant"] = _f("linear", "decay after warm-up")
    weight_decay: float = _f(0.01, "decoupled weight decay (not on biases, LayerNorm and gates)", ge=0)
    betas: tuple[float, float] = _f((0.9, 0.98), "Adam/LAMB betas")
    eps: float = _f(1e-6, "Adam/LAMB epsilon", gt=0)
    clip_grad: float = _f(1.0, "global gradient-norm clipping (0: off)", ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", "mixed precision; auto: as the DeepSpeed config says, and where it says auto too: bf16 on GPUs of "
                "compute capability >= 8.0 and on CPUs with bf16 units (AMX-BF16, AVX512-BF16); fp16 on older GPUs "
                "under ZeRO >= 1; else fp32")
    zero_stage: Literal[0, 1, 2, 3] | None = _f(None, "ZeRO stage; unset: as the DeepSpeed config says (0 if 'auto')")
    activation_checkpointing: bool = _f(False, "recompute each layer's activations in the backward pass")
    seed: int = _f(42, "random seed (model init, masking, data order)", ge=0)
    deterministic: bool = _f(False, "deterministic kernels (torch.use_deterministic_algorithms, "
                                    "CUBLAS_WORKSPACE_CONFIG): on CUDA, what bit-identical resume and reruns need; "
                                    "CPU runs are deterministic without it")
    log_every: int = _f(10, "log metrics every N steps", ge=1, resume=True)
    eval_every: int = _f(50, "validate every N steps (0: only at the end)", ge=0, resume=True)
    eval_batches: int = _f(20, "validation micro-batches per rank", ge=1, only="pretrain")
    save_every: int = _f(100, "checkpoint every N steps (0: only at stage ends)", ge=0, resume=True)
    keep_last: int = _f(2, "checkpoints kept (older ones are deleted)", ge=1, resume=True)
    max_nonfinite: int = _f(3, "stop after this many consecutive non-finite losses", ge=1, resume=True)


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
    draw: Literal["earlybird", "fixed", "random", "random_at", "given", "probe"] = _f(
        "earlybird", "earlybird: when masks converge; fixed: at fixed_step; random: a random ticket at step 0 (the "
                     "paper's baseline); random_at: the same search, then a random ticket at fixed_step (the control "
                     "that isolates which units are kept); given: no search, earlybert.ticket from step 0; probe "
                     "(fine-tuning a classifier): no search, the head alone trained on the frozen encoder, every "
                     "unit scored through it, the ticket drawn at step 0 (probe_* options)")
    ticket: str | None = _f(None, "draw=given: a ticket.json (or a run's ticket/ directory) drawn elsewhere, e.g. by "
                                  "another run or task; it keeps its own ratios and must fit the model")
    probe_examples: int = _f(512, "draw=probe: training examples whose pooled features the head is trained on "
                                  "(computed once; at most the training set)", ge=1, only="finetune")
    probe_epochs: int = _f(20, "draw=probe: epochs of the head over those features", ge=1, only="finetune")
    probe_lr: float = _f(1e-2, "draw=probe: the head's learning rate (AdamW, batches of train.micro_batch_size)",
                         gt=0, only="finetune")
    probe_batches: int = _f(8, "draw=probe: training batches every unit is scored on through the probed head (no "
                               "weight update)", ge=1, only="finetune")
    probe_score: Literal["taylor", "fisher"] = _f(
        "taylor", "draw=probe: taylor: sum over the batches of |g x dL/dg|; fisher: of (dL/dg)^2", only="finetune")
    probe_normalise: bool = _f(False, "draw=probe: divide each layer's scores by their L2 norm before drawing "
                                      "(global FFN pruning then compares layers by their relative importance)", only="finetune")
    probe_head: Literal["probed", "fresh"] = _f("probed", "draw=probe: the ticket's classifier head starts as probed "
                                                          "(LP-FT) or freshly initialised", only="finetune")
    detect_every: int | None = _f(None, "compute masks and their distance every N search steps; unset: from the "
                                        "search budget, so that window+1 checks fit in half of it", ge=1)
    window: int = _f(5, "early-bird window: the last N mask distances must all be <= epsilon", ge=1)
    epsilon: float = _f(0.1, "early-bird threshold on the normalised Hamming distance", gt=0)
    max_search_steps: int | None = _f(None, "the search budget: the search ends here even without convergence; "
                                            "unset: earlybert.search_fraction of the steps (fine-tuning: "
                                            "finetune.search_epochs)", ge=1)
    search_fraction: float = _f(1 / 3, "the search budget as a fraction of train.steps (when max_search_steps is "
                                       "unset)", gt=0, lt=1, only="pretrain")
    fixed_step: int | None = _f(None, "draw=fixed or random_at: draw at this step; unset: at the end of the search "
                                      "budget", ge=1)
    weights: Literal["rewind", "continue"] = _f("rewind", "rewind: kept weights restart from initial (or "
                                                          "pre-trained) values; continue: keep searched values")
    rewarmup_steps: int = _f(0, "after the ticket, warm the learning rate up again linearly over N steps (the "
                                "efficient stage starts with fresh optimizer moments at a mid-schedule rate)", ge=0)

    @property
    def search_limit(self) -> int | None:
        """The last step a search may draw at: ``fixed_step`` for the fixed draws, else ``max_search_steps``."""
        return self.fixed_step if self.draw in FIXED_DRAWS else self.max_search_steps


@dataclass
class FinetuneArgs(_Section):
    task: str | None = _f(None, "GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), squad, squad_v2, "
                                "or custom (a CSV/JSON-lines file with named columns); required", only="finetune")
    data: str | None = _f(None, "GLUE directory in the standard TSV layout (or 'hub' when online); for SQuAD a "
                                "directory holding train-v1.1.json/dev-v1.1.json (v2.0 for squad_v2); unset: give "
                                "train_file and dev_file", only="finetune")
    train_file: str | None = _f(None, "training file; unset: from finetune.data", only="finetune")
    dev_file: str | None = _f(None, "development file; unset: from finetune.data", only="finetune")
    test_file: str | None = _f(None, "GLUE-style tasks: an unlabelled file to write predictions for "
                                     "(OUTPUT/predictions/); unset: none", only="finetune")
    text_a: str = _f("sentence1", "custom task: column of the first text", only="finetune")
    text_b: str | None = _f(None, "custom task: column of the second text of a pair; unset: single texts",
                            only="finetune")
    label_column: str = _f("label", "custom task: column of the label", only="finetune")
    num_labels: int = _f(2, "custom task: number of classes (1: regression); with class names, their number", ge=1,
                         only="finetune")
    label_list: str | None = _f(None, "custom task: the class labels in id order, comma-separated (e.g. "
                                      "negative,positive); unset: from the training file, integers as they are, "
                                      "names in sorted order", only="finetune")
    max_len: int | None = _f(None, "maximum tokens per example; unset: 128, or 384 for SQuAD", ge=8, only="finetune")
    stride: int = _f(128, "SQuAD: overlap of the windows over long contexts", ge=0, only="finetune")
    epochs: float = _f(3.0, "training epochs (when train.steps is unset)", gt=0, only="finetune")
    search_epochs: float = _f(0.2, "the search budget in epochs (official code: 20% of the first), when "
                                   "earlybert.max_search_steps is unset", gt=0, only="finetune")


@dataclass
class LogArgs(_Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = _f("auto", "auto: online if wandb is logged in, "
                                                                         "else offline", resume=True)
    project: str = _f("earlybert_ds", "wandb project", resume=True)
    run_name: str | None = _f(None, "wandb run name; unset: the output directory's name", resume=True)
    progress: bool = _f(True, "live progress bar on rank 0", resume=True)


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
        #: The ``section.field`` keys set by a config file or the command line (not by a command's defaults): what a
        #: resumed run compares with its saved configuration. Not a field: it is not saved with the run.
        self.given: set[str] = set()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "RunConfig":
        """A checked config from sections as mappings (``{"train": {"lr": 3e-4}}``, a saved ``run_config.json``) or
        ``section.field`` keys (``{"train.lr": 3e-4}``, as the benchmarks write their settings), or both."""
        cfg, errors = cls(), []
        bad = _apply(cfg, flatten_config(data, source), source, errors)
        errors += cfg.problems(bad)
        if errors:
            raise ConfigError(errors)
        return cfg

    def validate(self) -> None:
        if errors := self.problems():
            raise ConfigError(errors)

    def problems(self, bad: set[str] = frozenset()) -> list[str]:
        """Every field's declared type choices and range, then what one field cannot say alone; a check that reads
        a field already found wrong (``bad``, or out of range here) is left out, so each message is about a value
        as given."""
        out, bad, fields = [], set(bad), all_fields()
        for key, hint in _hints().items():
            value = self._get(key)
            if key in bad:
                continue
            if (choices := _choices(hint)) is not None:
                if not _is_choice(value, choices):
                    out.append(f"{key}={value!r} must be one of {', '.join(map(str, choices))}")
                    bad.add(key)
            elif why := _out_of_range(value, fields[key].metadata["bounds"]):
                out.append(f"{key}={value} {why}")
                bad.add(key)
        t, e, m = self.train, self.earlybert, self.model

        def need(ok: Callable[[], bool], msg: Callable[[], str], *keys: str) -> None:
            """``ok()`` unless a field it reads (``keys``) is already wrong or unset."""
            if not any(k in bad or self._get(k) is None for k in keys) and not ok():
                out.append(msg())

        need(lambda: t.warmup_steps <= t.steps, lambda: f"train.warmup_steps={t.warmup_steps} exceeds "
             f"train.steps={t.steps}", "train.warmup_steps", "train.steps")
        need(lambda: m.hidden_size % m.num_heads == 0, lambda: f"model.hidden_size={m.hidden_size} is not a multiple "
             f"of model.num_heads={m.num_heads}", "model.hidden_size", "model.num_heads")
        need(lambda: self.data.seq_len <= 512 or m.init_from is None, lambda: f"data.seq_len={self.data.seq_len}: "
             "BERT checkpoints have 512 positions", "data.seq_len")
        need(lambda: e.draw == "given" or e.ticket is None,
             lambda: f"earlybert.ticket={e.ticket} needs earlybert.draw=given", "earlybert.draw")
        need(lambda: e.draw != "given" or bool(e.ticket),
             lambda: "earlybert.draw=given needs earlybert.ticket (a ticket.json)", "earlybert.draw")
        need(lambda: Path(e.ticket).exists(), lambda: f"earlybert.ticket={e.ticket}: no such ticket file",
             "earlybert.ticket")
        need(lambda: e.taylor_decay == 1.0 or e.score == "taylor", lambda: f"earlybert.taylor_decay="
             f"{e.taylor_decay:g} needs earlybert.score=taylor (it discounts the Taylor sums)", "earlybert.taylor_decay",
             "earlybert.score")
        if e.enabled and e.draw not in NO_SEARCH_DRAWS:  # a search, then at least one step of the ticket
            need(lambda: t.steps >= 2, lambda: f"train.steps={t.steps} leaves no step after the search (at least 2, "
                 "or earlybert.enabled=false)", "train.steps")
            budget = "earlybert.fixed_step" if e.draw in FIXED_DRAWS else "earlybert.max_search_steps"
            need(lambda: self._get(budget) < t.steps, lambda: f"{budget}={self._get(budget)} must be in [1, "
                 f"train.steps={t.steps})", budget, "train.steps")
        return out

    def settle_launch(self, world_size: int) -> None:
        """Settle what follows from the launch: the batch split over ``world_size`` ranks and the tokenizer of the
        model started from. With ``train.global_batch_size`` each rank's share is accumulated from the fewest
        micro-batches of at most ``train.micro_batch_size`` that divide it evenly (fine-tuning's batch of 32 on 8
        ranks: micro-batches of 4, no accumulation; BERT-base's 256 on one GPU with at most 32: 8 of 32)."""
        t, m = self.train, self.model
        if t.global_batch_size is not None:
            share, rest = divmod(t.global_batch_size, world_size)
            if rest or not share:
                raise ConfigError(f"train.global_batch_size={t.global_batch_size} does not divide among {world_size} "
                                  f"ranks: choose a multiple of {world_size}")
            accum = math.ceil(share / t.micro_batch_size)
            while share % accum:
                accum += 1
            t.micro_batch_size, t.grad_accum = share // accum, accum
        if m.init_from and not (Path(m.init_from) / "config.json").is_file():
            raise ConfigError(f"model.init_from={m.init_from}: not a model directory (no config.json)")
        if m.init_from and self.data.tokenizer is None:
            if not any((Path(m.init_from) / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
                raise ConfigError(f"model.init_from={m.init_from} holds no tokenizer (tokenizer.json or vocab.txt): "
                                  "pass the model's tokenizer with --data.tokenizer")
            self.data.tokenizer = m.init_from

    def global_batch(self, world_size: int) -> int:
        return self.train.micro_batch_size * self.train.grad_accum * world_size

    def resolve(self, epoch_examples: int | None = None, world_size: int = 1) -> "RunConfig":
        """The one step that settles the budget, then checks everything and freezes the config, so that every
        component reads the same final values: what is unset follows from a fraction (the warm-up, the search
        budget, a fixed draw's step) or, in fine-tuning (``epoch_examples`` training examples), from epochs; the
        early-bird schedule is fitted to the search budget. What is set stays: a resumed run keeps the values its
        first launch settled."""
        _settle_budget(self, epoch_examples, world_size)
        settle_detect_every(self.earlybert)
        self.validate()
        for part in (self, *(getattr(self, sec) for sec in _sections())):
            object.__setattr__(part, "_frozen", True)
        return self

    def _get(self, key: str) -> Any:
        *path, name = key.split(".")
        return getattr(getattr(self, path[0]) if path else self, name)

    def _set(self, key: str, value: Any) -> None:
        *path, name = key.split(".")
        setattr(getattr(self, path[0]) if path else self, name, value)


def _settle_budget(cfg: RunConfig, examples: int | None, world_size: int) -> None:
    """The counts left unset, from their fractions: ``train.steps`` from ``finetune.epochs`` (fine-tuning), the
    warm-up from ``train.warmup_ratio``, the search budget from ``earlybert.search_fraction`` (fine-tuning:
    ``finetune.search_epochs``), a fixed draw's step at the end of that budget."""
    t, e, f = cfg.train, cfg.earlybert, cfg.finetune
    per_epoch = None if examples is None else max(1, math.ceil(examples / cfg.global_batch(world_size)))
    if t.steps is None:
        if per_epoch is None:
            raise ConfigError("train.steps is unset: pre-training counts optimizer steps (--train.steps N)")
        t.steps = max(2, math.ceil(f.epochs * per_epoch))
    if t.warmup_steps is None:
        t.warmup_steps = int(t.warmup_ratio * t.steps)
    if e.enabled and e.draw not in NO_SEARCH_DRAWS and t.steps >= 2:
        if e.max_search_steps is None:
            budget = e.search_fraction * t.steps if per_epoch is None else f.search_epochs * per_epoch
            e.max_search_steps = min(t.steps - 1, max(1, round(budget)))
        if e.draw in FIXED_DRAWS and e.fixed_step is None:
            e.fixed_step = e.max_search_steps
    if per_epoch is not None:
        logger.info("fine-tuning on %d examples: %d steps per epoch", examples, per_epoch)


def settle_detect_every(e: EarlyBertArgs) -> None:
    """Fit the detection schedule to the search budget when ``detect_every`` is unset: ``window + 1`` checks must
    fit in half the budget, or the test could never fire before the limit (a fine-tuning search of 16 steps with
    checks every 10 steps and a window of 5 always drew at max_steps)."""
    if e.detect_every is not None or not e.enabled or e.draw in NO_SEARCH_DRAWS:
        return
    budget = e.search_limit
    e.detect_every = max(1, budget // (2 * (e.window + 1)))
    logger.info("early-bird checks every %d step(s): %d checks fit in the search budget of %d steps (window %d)",
                e.detect_every, budget // e.detect_every, budget, e.window)


# ---- fields, values and files --------------------------------------------------------------------------------

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


def fields_of(command: str) -> dict[str, dataclasses.Field]:
    """The fields that are options of ``command``."""
    return {k: f for k, f in all_fields().items() if f.metadata.get("only") in (None, command)}


def resumable_fields() -> set[str]:
    """The fields a resumed run may change (``--resume-override``): where and how it logs, checkpoints and
    prepares data, and ``train.steps`` (before the run has finished)."""
    return {k for k, f in all_fields().items() if f.metadata.get("resume")}


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


def flatten_config(data: dict, source: str) -> dict[str, Any]:
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


def _apply(cfg: RunConfig, flat: dict[str, Any], source: str, errors: list[str]) -> set[str]:
    """Set ``flat``'s fields on ``cfg``; a value that does not fit its field is left out and its message added to
    ``errors``. Returns the keys left out."""
    hints, bad = _hints(), set()
    for key, value in flat.items():
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            errors.append(f"{source}: unknown field '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            continue
        try:
            value = _coerce(key, value, hints[key], source)
        except ConfigError as e:
            errors.append(str(e))
            bad.add(key)
            continue
        if source != "defaults":
            cfg.given.add(key)
        cfg._set(key, value)
    return bad


def recipes(command: str) -> list[str]:
    """The names of the shipped run configs of ``command`` (``--config NAME``)."""
    return sorted(p.stem for p in (RECIPES / command).glob("*.yaml"))


def load_config_file(path: str | Path, command: str | None = None) -> dict:
    """A JSON or YAML run-config file as a dict, or with ``command`` also one of its recipes by name (errors name
    the file)."""
    path = Path(path)
    if not path.is_file() and command and (RECIPES / command / f"{path}.yaml").is_file():
        path = RECIPES / command / f"{path}.yaml"
    if not path.is_file():
        known = f" nor a {command} recipe ({', '.join(recipes(command))})" if command else ""
        raise ConfigError(f"{path}: config file not found,{known}" if known else f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse config ({e})") from e
    return data or {}


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2) + "\n")


# ---- the commands: defaults, other names, options a mode ignores -----------------------------------------------

#: Each command's defaults where they differ from the fields' own. Fine-tuning: BERT's recipe (a global batch of 32
#: over all ranks, 3 epochs, lr 2e-5); the paper's ``rewind`` (to the pre-trained weights) stays. Pre-training from
#: scratch: ``continue``, as measured by ``bench tickets --task pretrain`` (rewind ended 1.6% above the full model's
#: loss, continue within its interval: docs/).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"earlybert.weights": "continue"},
    "finetune": {"train.steps": None, "train.global_batch_size": 32, "train.micro_batch_size": 32,
                 "train.lr": 2e-5, "train.weight_decay": 0.01, "train.betas": (0.9, 0.999), "train.eval_every": 0,
                 "train.save_every": 0, "model.dropout": 0.1},
}

#: Each command's short names for its main options.
SHORTCUTS: dict[str, dict[str, str]] = {
    "pretrain": {"corpus": "data.corpus"},
    "finetune": {"task": "finetune.task", "model": "model.init_from", "data": "finetune.data"},
}
#: The names of Hugging Face's Trainer and example scripts (run_mlm.py, run_glue.py, run_qa.py) where they mean the
#: same here: in both commands, and in one.
HF_NAMES: dict[str, dict[str, str]] = {
    "both": {"output_dir": "output_dir", "learning_rate": "train.lr", "per_device_train_batch_size":
             "train.micro_batch_size", "gradient_accumulation_steps": "train.grad_accum", "max_steps": "train.steps",
             "warmup_steps": "train.warmup_steps", "warmup_ratio": "train.warmup_ratio", "weight_decay":
             "train.weight_decay", "adam_epsilon": "train.eps", "max_grad_norm": "train.clip_grad",
             "lr_scheduler_type": "train.schedule", "seed": "train.seed", "logging_steps": "train.log_every",
             "eval_steps": "train.eval_every", "save_steps": "train.save_every", "save_total_limit":
             "train.keep_last", "model_name_or_path": "model.init_from", "tokenizer_name": "data.tokenizer",
             "run_name": "log.run_name"},
    "pretrain": {"train_file": "data.corpus", "dataset_name": "data.corpus", "max_seq_length": "data.seq_len",
                 "mlm_probability": "data.mlm_probability", "preprocessing_num_workers": "data.num_workers"},
    "finetune": {"task_name": "finetune.task", "train_file": "finetune.train_file", "validation_file":
                 "finetune.dev_file", "test_file": "finetune.test_file", "max_seq_length": "finetune.max_len",
                 "doc_stride": "finetune.stride", "num_train_epochs": "finetune.epochs"},
}
#: Hugging Face's switches: ``--bf16`` means ``--train.precision bf16``.
SWITCHES: dict[str, tuple[str, Any]] = {"bf16": ("train.precision", "bf16"), "fp16": ("train.precision", "fp16"),
                                         "gradient_checkpointing": ("train.activation_checkpointing", True)}
#: Hugging Face names with no one-to-one meaning here: refused, saying what does it.
REFUSED = {
    "do_train": "every run trains and then validates: drop it",
    "do_eval": "every run validates (train.eval_every, and at the end): drop it",
    "do_predict": "predictions come with --finetune.test_file",
    "per_device_eval_batch_size": "validation runs in micro-batches of --train.micro_batch_size",
    "eval_strategy": "validation is every --train.eval_every steps (0: only at the end)",
    "evaluation_strategy": "validation is every --train.eval_every steps (0: only at the end)",
    "save_strategy": "checkpoints are every --train.save_every steps (0: only at stage ends)",
    "overwrite_output_dir": "a directory holding a run is never overwritten: --resume continues it; or choose "
                            "another --output-dir",
    "resume_from_checkpoint": "--resume continues the run in --output-dir; --resume-from DIR starts from a "
                              "checkpoint or ticket directory",
    "report_to": "--log.wandb {auto,online,offline,disabled}",
    "logging_dir": "logs go to --output-dir (metrics.jsonl, wandb/)",
    "adam_beta1": "--train.betas B1,B2",
    "adam_beta2": "--train.betas B1,B2",
    "optim": "--train.optimizer {adamw,lamb}",
    "config_name": "pre-training sets the shape with --model.hidden_size, --model.num_layers, ...; or "
                   "--model.init_from",
    "num_train_epochs": "pre-training counts optimizer steps: --train.steps",
}


def hf_names(command: str) -> dict[str, str]:
    return {**HF_NAMES["both"], **HF_NAMES[command]}


def ignored_options(cfg: RunConfig) -> dict[str, str]:
    """The options that ``cfg``'s mode ignores, each with why: given on the command line they are refused (a
    config file may hold them: one file can serve several modes, as a run's own run_config.json does). The search
    schedule (budget, checks, window, epsilon) is accepted whatever the draw, so that one set of options runs
    EarlyBERT and its controls alike."""
    m, d, t, e, f = cfg.model, cfg.data, cfg.train, cfg.earlybert, cfg.finetune
    schedule = {"earlybert.enabled", "earlybert.max_search_steps", "earlybert.search_fraction",
                "earlybert.detect_every", "earlybert.window", "earlybert.epsilon"}
    rules = [
        (not e.enabled, "earlybert.enabled=false trains the full model",
         [k for k in all_fields() if k.startswith("earlybert.") and k not in schedule]),
        (e.draw in NO_SEARCH_DRAWS, f"earlybert.draw={e.draw} draws its ticket without a search",
         ["earlybert.score", "earlybert.taylor_decay", "earlybert.l1_heads", "earlybert.l1_ffn", "earlybert.gate_lr",
          "earlybert.weights", "earlybert.rewarmup_steps"]),
        (e.draw not in FIXED_DRAWS, f"it is the step of earlybert.draw=fixed or random_at, and the draw is {e.draw}",
         ["earlybert.fixed_step"]),
        (e.draw != "probe", f"it configures earlybert.draw=probe, and the draw is {e.draw}",
         [k for k in all_fields() if k.startswith("earlybert.probe_")]),
        (bool(m.init_from), f"model.init_from={m.init_from} has its own shape",
         ["model.hidden_size", "model.num_layers", "model.num_heads", "model.intermediate_size"]),
        (bool(d.tokenizer or m.init_from), "there is a tokenizer (data.tokenizer or model.init_from's): no WordPiece "
                                           "vocabulary is trained", ["data.vocab_size"]),
        (t.steps is not None, f"train.steps={t.steps} is the budget", ["finetune.epochs"]),
        (t.warmup_steps is not None, f"train.warmup_steps={t.warmup_steps} is the warm-up", ["train.warmup_ratio"]),
        (e.max_search_steps is not None, f"earlybert.max_search_steps={e.max_search_steps} is the search budget",
         ["earlybert.search_fraction", "finetune.search_epochs"]),
        (t.global_batch_size is not None, f"it follows from train.global_batch_size={t.global_batch_size} and the "
                                          "number of ranks", ["train.grad_accum"]),
        (f.task != "custom", f"it describes a custom task, and the task is {f.task}",
         ["finetune.text_a", "finetune.text_b", "finetune.label_column", "finetune.num_labels",
          "finetune.label_list"]),
        (f.task not in ("squad", "squad_v2"), "it is SQuAD's window overlap", ["finetune.stride"]),
        (f.task in ("squad", "squad_v2"), "SQuAD writes its dev predictions; test files are for classification "
                                          "tasks", ["finetune.test_file"]),
        (cfg.log.wandb == "disabled", "log.wandb=disabled", ["log.project", "log.run_name"]),
    ]
    out: dict[str, str] = {}
    for when, why, keys in rules:
        if when:
            for key in keys:
                out.setdefault(key, why)
    return out


#: What each command cannot run without: field -> the option that gives it.
REQUIRED = {"finetune": {"finetune.task": "--task (a GLUE task name, squad, squad_v2 or custom)",
                         "model.init_from": "--model PATH (a Hugging Face BERT directory or an earlybert-ds output "
                                            "such as OUTPUT/final)"}}


# ---- the command line -----------------------------------------------------------------------------------------

def _flag(key: str) -> str:
    return "--" + key.replace("_", "-") if "." not in key else "--" + key


def add_config_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add ``--config`` and one ``--section.field`` option per field of ``command`` (values are parsed and checked
    later, all together), with its other names; the Hugging Face names that mean something else here are taken
    too, to be refused with a hint. Each option's help shows the command's own default once."""
    parser.add_argument("--config", metavar="FILE|RECIPE",
                        help=f"a JSON or YAML run-config file, or a shipped recipe: {', '.join(recipes(command))} "
                             "(options on the command line override it)")
    defaults, other_names = COMMAND_DEFAULTS[command], {}
    for name, key in {**SHORTCUTS[command], **hf_names(command)}.items():
        other_names.setdefault(key, []).append(f"--{name}")
    groups = {sec: parser.add_argument_group(f"{sec} options") for sec in _sections()}
    for key, f in fields_of(command).items():
        default = defaults.get(key, f.default)
        shown = "" if default is None else f" (default: {_show(default)})"
        group = groups[key.split(".")[0]] if "." in key else parser
        group.add_argument(_flag(key), *other_names.get(key, []), dest=f"cfg:{key}", default=None,
                           metavar=_metavar(key), help=(f.metadata["help"] + shown).replace("%", "%%"))
    for name, (key, value) in SWITCHES.items():
        parser.add_argument(f"--{name}", dest=f"cfg:{key}", action="store_const", const=value, help=argparse.SUPPRESS)
    for name in REFUSED:
        if f"--{name}" not in parser._option_string_actions:
            parser.add_argument(f"--{name}", dest=f"refused:{name}", nargs="?", const=True, help=argparse.SUPPRESS)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(_show, value))
    return str(value)


def _metavar(key: str) -> str:
    hint = _hints()[key]
    if hint is bool:
        return "{true,false}"
    if (choices := _choices(hint)) is not None:
        return "{" + ",".join(str(c) for c in choices if c is not None) + "}"
    return key.split(".")[-1].upper()


def config_from_args(args: argparse.Namespace, command: str, unknown: list[str] = (),
                     base: tuple[dict[str, Any], str] | None = None) -> RunConfig:
    """The run config of ``command``: its defaults, then ``base`` (fields and where they come from), then
    ``--config``, then the options on the command line. Every problem is reported at once: options that are unknown
    (``unknown``: their messages) or refused, values that do not fit their field, options the chosen mode would
    ignore, and what the fields cannot say together."""
    errors = list(unknown)
    cfg = RunConfig()
    _apply(cfg, COMMAND_DEFAULTS[command], "defaults", errors)
    bad: set[str] = set()
    if base is not None:
        bad |= _apply(cfg, *base, errors)
    if args.config:
        try:
            bad |= _apply(cfg, flatten_config(load_config_file(args.config, command), args.config), args.config, errors)
        except ConfigError as e:
            errors += e.problems
    errors += [f"--{k[8:]} is a Hugging Face option with no one-to-one meaning here: {REFUSED[k[8:]]}"
               for k, v in vars(args).items() if k.startswith("refused:") and v is not None]
    cli = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    bad |= _apply(cfg, cli, "command line", errors)
    if "train.global_batch_size" not in cfg.given and cfg.given & {"train.micro_batch_size", "train.grad_accum"}:
        cfg.train.global_batch_size = None  # a batch given per rank, as Hugging Face's per-device batch size
    ignored = ignored_options(cfg)
    errors += [f"{_flag(k)}={_show(cli[k])} is ignored: {ignored[k]}" for k in cli if k in ignored and k not in bad]
    errors += [f"{command} needs {what}" for k, what in REQUIRED.get(command, {}).items() if cfg._get(k) is None]
    errors += cfg.problems(bad)
    if errors:
        raise ConfigError(errors)
    return cfg


def unknown_options(words: list[str], known: list[str]) -> list[str]:
    """Messages for the command line's words that no option took, each with the closest of the ``known`` option
    strings (``--lrr``: ``--train.lr``)."""
    by_name = {**{"--" + k.rsplit(".", 1)[-1]: k for k in known}, **{k: k for k in known}}
    out = []
    for word in words:
        if not word.startswith("-"):
            if not out:  # a value of an unknown option is not reported again
                out.append(f"unexpected argument {word!r}")
            continue
        option = word.split("=")[0]
        close = difflib.get_close_matches(option, by_name, n=1, cutoff=0.75)
        out.append(f"unknown option {option}" + (f" (did you mean {by_name[close[0]]}?)" if close else ""))
    return out
