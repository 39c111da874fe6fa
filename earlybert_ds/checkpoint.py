"""Checkpoints and the run directory: training checkpoints (DeepSpeed's own shards plus our client state, complete or
ignored), the ticket checkpoint's format, the final export, and where a launch resumes.

Layout: ``CKPT/global_stepN/`` (DeepSpeed's model/optimizer shards, one RNG file per rank) and ``CKPT/latest``
naming the last *complete* checkpoint. ``latest`` is written atomically only after every rank has finished
writing, so a crash mid-save leaves it pointing at the previous checkpoint; older ones beyond ``keep_last`` are
deleted only after that. DeepSpeed checkpoints are pickles: load only checkpoints you trust (your own runs).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from . import distributed as dist
from .atomic import atomic_directory, atomic_write_text
from .config import ConfigError, RunConfig, all_fields, load_config_file, resumable_fields
from .data import DataError, load_tokenizer, tokenizer_digest
from .engine import Engine, lr_lambda
from .faults import fault_point
from .ticket import TICKET_FILE, Ticket

logger = logging.getLogger("earlybert_ds")

LATEST = "latest"
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint; the message says what was expected."""


def rng_state() -> dict[str, Any]:
    """This process's random number generators (dropout draws from them): what an exact resume restores."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int,
         rank_state: dict | None = None) -> Path:
    """Save on every rank (collective); returns the checkpoint's directory. ``rank_state`` is what this rank alone
    knows (beside its RNG state), written to ``rankR.pt``."""
    tag = f"global_step{step}"
    dist.on_rank0(_abandon_from, ckpt_dir, step)
    engine.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save({"rng": rng_state(), **(rank_state or {})}, ckpt_dir / tag / rank_file())
    fault_point(f"checkpoint:{tag}")  # every shard written, `latest` not yet moved
    dist.barrier()
    dist.on_rank0(_complete, ckpt_dir, tag, keep_last)
    return ckpt_dir / tag


def _complete(ckpt_dir: Path, tag: str, keep_last: int) -> None:
    """Rank 0, once every rank has written its part: ``latest`` names ``tag``, the oldest beyond ``keep_last`` go."""
    atomic_write_text(ckpt_dir / LATEST, tag)
    for old in sorted(_tags(ckpt_dir))[:-keep_last]:  # `tag` is the highest one now: never deleted
        shutil.rmtree(ckpt_dir / f"global_step{old}", ignore_errors=True)


def _abandon_from(ckpt_dir: Path, step: int) -> None:
    """Before saving ``step``: delete the checkpoints of steps >= ``step`` (rank 0).

    They are an unfinished save of this step or a branch this run has left (it resumed from an earlier checkpoint
    or from the ticket): kept, they would be overwritten in place (a crash then leaves ``latest`` on a torn
    checkpoint, or mixes shards of two world sizes) and outrank the new checkpoint when older ones are pruned.
    When ``latest`` names one of them it first moves back to the newest checkpoint before ``step`` (removed when
    there is none), so that it always names a complete checkpoint.
    """
    later = sorted(t for t in _tags(ckpt_dir) if t >= step) if ckpt_dir.is_dir() else []
    if not later:
        return
    latest = ckpt_dir / LATEST
    named = _TAG.match(latest.read_text().strip()) if latest.is_file() else None
    if named and int(named.group(1)) >= step:
        earlier = [t for t in _tags(ckpt_dir) if t < step]
        if earlier:
            atomic_write_text(latest, f"global_step{max(earlier)}")
        else:
            latest.unlink()
    names = [f"global_step{t}" for t in later]
    logger.warning("%s: deleting %s before saving step %d: left by an earlier attempt (an unfinished save, or "
                   "later steps of a branch this run has left by resuming from an earlier point)", ckpt_dir,
                   ", ".join(names), step)
    for name in names:
        shutil.rmtree(ckpt_dir / name)


def _tags(ckpt_dir: Path) -> list[int]:
    return [int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _TAG.match(p.name)) and p.is_dir()]


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoint root, tag) for a root holding ``latest`` or for one ``global_stepN`` directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / LATEST).is_file():
        tag = (path / LATEST).read_text().strip()
        if not (path / tag).is_dir():
            raise CheckpointError(f"{path}/latest names {tag!r}, which does not exist")
        return path, tag
    if _TAG.match(path.name) and list(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise CheckpointError(f"{path}: not a checkpoint (expected a directory with a 'latest' file or a "
                          "'global_stepN' directory written by earlybert_ds)")


def peek_client_state(path: str | Path) -> dict:
    """The client state of a checkpoint, read without an engine (to know which model to build before loading)."""
    root, tag = resolve(path)
    files = sorted((root / tag).glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{root / tag}: no model states file")
    try:  # DeepSpeed's checkpoint holds arbitrary pickles (trusted input only: your own runs)
        state = torch.load(files[0], map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file fails in many ways inside torch.load
        raise CheckpointError(f"{files[0]}: unreadable ({type(e).__name__}: {e}); resume from another checkpoint "
                              "or from the ticket") from e
    if not isinstance(state, dict) or "earlybert" not in state:
        raise CheckpointError(f"{root / tag}: not an earlybert_ds checkpoint (no 'earlybert' client state)")
    return state["earlybert"]


def rank_file(rank: int | None = None) -> str:
    return f"rank{dist.rank() if rank is None else rank}.pt"


def load(engine: Engine, path: str | Path) -> tuple[dict, dict]:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the client state and this rank's state
    (empty when the checkpoint was written by another number of ranks)."""
    root, tag = resolve(path)
    try:
        load_path, client = engine.engine.load_checkpoint(str(root), tag=tag)
    except (AssertionError, RuntimeError, ValueError) as e:
        if "world size" in str(e):
            raise CheckpointError(
                f"{root / tag}: saved with another number of ranks ({e}). Restart from the ticket checkpoint "
                "(--resume-from OUTPUT/ticket), or convert with `python -m deepspeed.checkpoint.ds_to_universal "
                "--inject_missing_state` and set \"checkpoint\": {\"load_universal\": true}") from e
        raise
    if load_path is None:
        raise CheckpointError(f"{root / tag}: DeepSpeed found nothing to load")
    rank_state = {}
    if (root / tag / rank_file()).is_file():
        rank_state = torch.load(root / tag / rank_file(), weights_only=True)
        set_rng_state(rank_state.pop("rng"))
    return client["earlybert"], rank_state


# ---- the run directory and the ticket checkpoint ------------------------------------------------------------------
#
# OUTPUT/run_config.json   the run's config (its presence: the directory holds a run)
# OUTPUT/checkpoints/      training checkpoints (above)
# OUTPUT/ticket/           ticket.json, the shrunk model with its tokenizer, code and card (a Hugging Face model
#                          directory, as final/), state.json (the run's position and the unpruned model's config),
#                          rng.pt (every rank's random state)
# OUTPUT/final/            the trained model with its tokenizer, code and card
# OUTPUT/summary.json      the run's summary;  OUTPUT/metrics.jsonl, OUTPUT/train.log  its metrics and log (monitor.py)

CHECKPOINTS, TICKET_DIR, FINAL_DIR = "checkpoints", "ticket", "final"
RUN_CONFIG, SUMMARY, STATE, RNG_FILE = "run_config.json", "summary.json", "state.json", "rng.pt"
CARD_FILE = "README.md"  # a saved model's card, as on the Hugging Face Hub

#: The run-config fields that decide the unpruned model's shape and dropout, by their name in its configuration.
_MODEL_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "intermediate_size": "intermediate_size", "dropout": "hidden_dropout_prob"}


def save_model_dir(tmp: Path, model: PreTrainedModel, tokenizer: Any, card: str) -> None:
    """A Hugging Face model directory in ``tmp``: the weights (safetensors), config, code, tokenizer and card."""
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CARD_FILE).write_text(card)


def write_ticket_dir(path: Path, ticket: Ticket, model: PreTrainedModel, tokenizer: Any, state: dict,
                     card: str) -> None:
    """``path`` (``OUTPUT/ticket/``), written atomically by rank 0 (a collective): the ticket, the model the
    efficient stage starts from with its tokenizer and card (``pipeline(..., model=OUTPUT/ticket)`` works, as on
    ``final/``), ``state`` (the run's position, the unpruned model's config) and every rank's random state — all a
    fresh launch on any world size needs (and, on the same number of ranks, to continue exactly)."""
    rng = dist.all_gather_object(rng_state())

    def write() -> None:
        with atomic_directory(path) as tmp:
            ticket.save(tmp / TICKET_FILE)
            torch.save(rng, tmp / RNG_FILE)
            save_model_dir(tmp, model, tokenizer, card)
            atomic_write_text(tmp / STATE, json.dumps(state, indent=1))

    dist.on_rank0(write)


def ticket_tokenizer_dir(ticket_dir: Path) -> Path | None:
    """Where a ticket checkpoint keeps its tokenizer: beside the model, or in ``tokenizer/`` in older tickets
    (``None``: in neither)."""
    return next((d for d in (ticket_dir, ticket_dir / "tokenizer") if (d / "tokenizer_config.json").is_file()), None)


def copy_ticket_dir(src: Path, dst: Path) -> None:
    with atomic_directory(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def restore_ticket_rng(ticket_dir: Path) -> None:
    """Every rank's random state as the ticket was written, so that a resume through the ticket on the same number
    of ranks draws the same dropout masks as the uninterrupted run (on another number it cannot)."""
    path = ticket_dir / RNG_FILE
    states = torch.load(path, weights_only=True) if path.is_file() else []
    if len(states) == dist.world_size():
        set_rng_state(states[dist.rank()])
    elif dist.rank() == 0:
        logger.info("%s: random states of %d rank(s), this run has %d: dropout draws differ from the run that drew "
                    "the ticket", ticket_dir, len(states), dist.world_size())


def load_ticket_dir(path: Path, model_class: type[PreTrainedModel]) -> tuple[Ticket, PreTrainedModel, dict]:
    """The ticket, the shrunk model (as ``model_class``) and the state of a ticket checkpoint."""
    ticket, state = Ticket.load(path / TICKET_FILE), ticket_state(path)
    # the model sits beside ticket.json (in model/ in tickets written before 2026-12)
    model_dir = next((d for d in (path, path / "model") if (d / "config.json").is_file()), None)
    if model_dir is None:
        raise CheckpointError(f"{path}: not a ticket checkpoint (no model config.json written by earlybert_ds)")
    model = model_class.from_pretrained(model_dir)
    if model.config.heads_per_layer != ticket.heads_per_layer or \
            model.config.intermediate_sizes != ticket.intermediate_sizes:
        raise CheckpointError(f"{path}: the model in model/ does not have the ticket's shape")
    return ticket, model, state


def ticket_state(path: Path) -> dict:
    """A ticket checkpoint's ``state.json``: the step, the data position and the unpruned model's config."""
    if not (path / STATE).is_file():
        raise CheckpointError(f"{path}: not a ticket checkpoint (no {STATE} written by earlybert_ds)")
    try:
        state = json.loads((path / STATE).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / STATE}: not valid JSON ({e})") from e
    missing = [k for k in ("step", "data", "full_config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path / STATE}: no field {missing[0]!r} (not written by earlybert_ds?)")
    return state


def check_ticket_fits(cfg: RunConfig, tokenizer: Any, ticket_dir: Path) -> None:
    """Refuse a ticket whose model this run could not train faithfully: a vocabulary other than the run's tokenizer
    (same size, other words: every embedding row would mean another word) or ``--model.*`` options that differ
    from the model the ticket was drawn from (the ticket's shape wins; they would be ignored)."""
    full = ticket_state(ticket_dir)["full_config"]
    for name, key in _MODEL_FIELDS.items():
        if f"model.{name}" in cfg.given and getattr(cfg.model, name) != full.get(key):
            raise ConfigError(f"model.{name}={getattr(cfg.model, name)} differs from the model of the ticket "
                              f"{ticket_dir} ({key}={full.get(key)}); a ticket trains the model it was drawn from: "
                              f"drop --model.{name}, or start a new run")
    if (where := ticket_tokenizer_dir(ticket_dir)) is not None:
        try:
            theirs = load_tokenizer(where)
        except DataError as e:
            raise CheckpointError(f"{ticket_dir}: unreadable ticket tokenizer ({e})") from e
        if tokenizer_digest(theirs) != tokenizer_digest(tokenizer):
            ours = f"data.tokenizer={cfg.data.tokenizer}" if cfg.data.tokenizer else "this run's tokenizer"
            raise ConfigError(f"the ticket {ticket_dir} was drawn with the tokenizer in {where} ({len(theirs)} "
                              f"tokens); {ours} ({len(tokenizer)} tokens) gives other token ids: pass "
                              f"--data.tokenizer {where}")
    elif full.get("vocab_size") != len(tokenizer):
        raise ConfigError(f"the ticket {ticket_dir} has a vocabulary of {full.get('vocab_size')}, this run's "
                          f"tokenizer {len(tokenizer)}")


def export_final(path: Path, model_class: type[PreTrainedModel], config: Any, state: dict[str, torch.Tensor],
                 tokenizer: Any, card: str) -> None:
    """``OUTPUT/final/`` (rank 0): a ``model_class`` of ``config`` with the trained weights ``state``, a Hugging
    Face model directory (:func:`save_model_dir`)."""
    model = model_class(config)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    with atomic_directory(path) as tmp:
        save_model_dir(tmp, model, tokenizer, card)


# ---- where a launch begins ------------------------------------------------------------------------------------------

@dataclass
class Start:
    """Where a launch begins: a fresh stage, a training checkpoint, or a ticket checkpoint."""

    phase: str  # "search" | "efficient" | "full"
    step: int = 0
    checkpoint: Path | None = None
    ticket_dir: Path | None = None

    @property
    def fresh(self) -> bool:
        """Nothing saved to start from: the run begins at its first stage."""
        return self.checkpoint is None and self.ticket_dir is None

    @property
    def ticket(self) -> Path:
        """The ticket an efficient-stage start trains: the one given, or the one beside the checkpoints."""
        return self.ticket_dir or resolve(self.checkpoint)[0].parent / TICKET_DIR


def begin(cfg: RunConfig, out: Path, resume: bool, resume_from: str | None, overrides: set[str],
          world_size: int) -> tuple[RunConfig, Start]:
    """Decide (on rank 0) where and with which configuration this launch begins, and log it.

    Resuming into a directory that holds a run (``OUTPUT/run_config.json``), the saved configuration is the base:
    an option of this command that differs from it is refused, listing every difference, unless ``overrides``
    names it and a run may change it midway (:func:`~earlybert_ds.config.resumable_fields`); ``train.steps`` may
    change only before the run has ended (a finished run's learning rate has decayed to its end). Until the run has
    saved a checkpoint or its ticket there is nothing to lose: the command's options apply, with a warning."""
    saved = None
    if (resume or resume_from) and (out / RUN_CONFIG).is_file():
        saved = RunConfig.from_dict(load_config_file(out / RUN_CONFIG), str(out / RUN_CONFIG))
    elif resume and not resume_from:
        logger.warning("--resume: %s holds no run (no %s): starting a new run there", out, RUN_CONFIG)
    start = _where(saved or cfg, out, resume, resume_from)
    if saved is not None:
        cfg = _resumed_config(saved, cfg, start, overrides, out)
        if start.fresh:
            start = _fresh(cfg)  # its options may have changed the first stage
    cfg.settle_launch(world_size)
    _log_start(cfg, out, start)
    return cfg, start


def _where(cfg: RunConfig, out: Path, resume: bool, resume_from: str | None) -> Start:
    """``resume_from`` (a ticket or a checkpoint), the newest of ``out``'s checkpoints and ticket with ``resume``,
    else the first stage."""
    fresh = _fresh(cfg)
    if resume_from:
        p = Path(resume_from)
        if (p / TICKET_FILE).is_file():
            return Start("efficient", ticket_state(p)["step"], ticket_dir=p)
        state = peek_client_state(p)
        return Start(state["phase"], state["step"], checkpoint=p)
    if not resume:
        return fresh
    ckpts, ticket = out / CHECKPOINTS, out / TICKET_DIR
    state = peek_client_state(ckpts) if (ckpts / LATEST).is_file() else None
    if (ticket / TICKET_FILE).is_file() and (state is None or state["phase"] == "search"):
        return Start("efficient", ticket_state(ticket)["step"], ticket_dir=ticket)  # newer than any search ckpt
    if state is None:
        return fresh
    return Start(state["phase"], state["step"], checkpoint=ckpts)


def _fresh(cfg: RunConfig) -> Start:
    return Start("full" if not cfg.earlybert.enabled else "search")


def _resumed_config(saved: RunConfig, cfg: RunConfig, start: Start, overrides: set[str], out: Path) -> RunConfig:
    """The saved configuration with the changes this command may make (see :func:`begin`)."""
    split = {"train.micro_batch_size", "train.grad_accum"} if saved.train.global_batch_size is not None else set()
    if "train.micro_batch_size" in split & cfg.given:  # with a global batch, a memory setting like the world size
        saved.train.micro_batch_size = cfg.train.micro_batch_size
    changes = {k: (saved._get(k), cfg._get(k)) for k in sorted(cfg.given - split)
               if k != "output_dir" and saved._get(k) != cfg._get(k)}  # the run is where it is now
    listed = "\n".join(f"    {k}: {_as_given(old)} -> {_as_given(new)}" for k, (old, new) in changes.items())
    saved.output_dir, saved.given = cfg.output_dir, set(cfg.given)
    if start.fresh:
        if changes:
            logger.warning("--resume: %s has saved no checkpoint or ticket yet; it starts again with this command's "
                           "options where they differ from its %s:\n%s", out, RUN_CONFIG, listed)
        for k, (_, new) in changes.items():
            saved._set(k, new)
        return saved
    problems, allowed = [], resumable_fields()
    if unasked := [k for k in changes if k not in overrides]:
        may = [k for k in unasked if k in allowed]
        problems.append(f"--resume: this command differs from the run in {out} (its {RUN_CONFIG} is the base of a "
                        f"resumed run):\n{listed}\n  drop these options to continue the run as it was"
                        + (f"; --resume-override {','.join(may)} accepts {'that change' if len(may) == 1 else 'those'}"
                           if may else "")
                        + (f"; {', '.join(k for k in unasked if k not in allowed)} cannot change in the middle of a "
                           "run: start a new one (another --output-dir)" if len(may) < len(unasked) else ""))
    for k in sorted(overrides - allowed):
        problems.append(f"--resume-override {k}: " + ("not a field" if k not in all_fields() else
                        "cannot change in the middle of a run: start a new one (another --output-dir)"))
    if "train.steps" in changes and "train.steps" in overrides:
        ends, steps = changes["train.steps"]
        if start.step >= ends:
            problems.append(f"--resume-override train.steps: the run in {out} has ended (step {start.step} of {ends}; "
                            f"its learning rate has decayed to the end of its schedule): to train on, start a new run "
                            f"from its model: --model.init_from {out / FINAL_DIR}"
                            + (" --earlybert.enabled false (it is shrunk to its ticket)" if saved.earlybert.enabled
                               else ""))
        elif steps is None or steps <= start.step:
            problems.append(f"--resume-override train.steps={steps}: the run resumes at step {start.step}")
    if problems:
        raise ConfigError(problems)
    lr_before = lr_lambda(saved)(start.step) * saved.train.lr
    for k in sorted(overrides & changes.keys()):
        old, new = changes[k]
        saved._set(k, new)
        logger.warning("--resume-override %s: %s -> %s", k, _as_given(old), _as_given(new))
    saved.validate()
    if "train.steps" in overrides & changes.keys():
        logger.warning("the schedule now ends at step %d: the learning rate at step %d goes from %.3g to %.3g",
                       saved.train.steps, start.step, lr_before, lr_lambda(saved)(start.step) * saved.train.lr)
    return saved


def _as_given(value: Any) -> str:
    return "unset" if value is None else json.dumps(list(value) if isinstance(value, tuple) else value)


def _log_start(cfg: RunConfig, out: Path, start: Start) -> None:
    """Where this launch begins, exactly: a new run, a training checkpoint, or a ticket."""
    of = "" if cfg.train.steps is None else f" of {cfg.train.steps}"
    if start.checkpoint is not None:
        root, tag = resolve(start.checkpoint)
        ended = cfg.train.steps is not None and start.step >= cfg.train.steps
        logger.info("resuming %s at step %d%s (stage %s) from the checkpoint %s%s", out, start.step, of,
                    start.phase, root / tag, ": the run has ended; validating and exporting its model again"
                    if ended else "")
    elif start.ticket_dir is not None:
        logger.info("resuming %s at step %d%s (stage efficient, from its start) from the ticket %s", out,
                    start.step, of, start.ticket_dir)
    else:
        logger.info("starting %s at step 0 (stage %s)", out, start.phase)
