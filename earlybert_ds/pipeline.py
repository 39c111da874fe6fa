"""EarlyBERT on DeepSpeed, stage by stage — the same three stages for pre-training and fine-tuning.

    1. search     the full model with slimming gates trains with an L1 penalty on them; every ``detect_every``
                  steps all ranks read the gates and the coordinator (rank 0) draws masks from the units' scores
                  and checks whether they have stopped changing (the early-bird test: ``search.SearchStage``);
    2. ticket     rank 0 broadcasts the decision and the ticket, so every rank switches at the same step, and
                  writes ``OUTPUT/ticket/`` (ticket.json, the shrunk model, the tokenizer, the data position);
    3. efficient  the search engine is torn down, every rank shrinks the model physically to the ticket, and a new
                  engine trains the small model to ``train.steps``.

What differs between pre-training and fine-tuning (data, model head, evaluation) is a :class:`Task`; see
``pretrain.py`` and ``finetune.py``. With ``earlybert.enabled = false`` the full model trains throughout (the
baseline). Every stage checkpoints and resumes exactly; ``--resume-from OUTPUT/ticket`` restarts the efficient
stage on any number of ranks.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import checkpoint
from . import distributed as dist
from . import faults
from .atomic import atomic_directory, atomic_write_text
from .config import ConfigError, RunConfig, save_config
from .data import DataError, ShardedBatches, load_tokenizer, tokenizer_digest
from .dsconfig import build_ds_config, describe_precision
from .engine import Engine
from .flops import count_parameters
from .hardware import peak_flops
from .modeling import EarlyBertConfig, EarlyBertPreTrainedModel, hf_bert_config, load_hf_bert
from .monitor import Monitor
from .search import SearchStage, settle_detect_every
from .shrink import shrink_state_dict, shrunk_config
from .ticket import TICKET_FILE, PruneSpec, Scores, Ticket, TicketError, draw_masks, random_masks

logger = logging.getLogger("earlybert_ds")

CHECKPOINTS, TICKET_DIR, FINAL_DIR, TOKENIZER_DIR = "checkpoints", "ticket", "final", "tokenizer"
RUN_CONFIG, SUMMARY, STATE, RNG_FILE = "run_config.json", "summary.json", "state.json", "rng.pt"


class NonFiniteLossError(ArithmeticError):
    """The loss stayed non-finite for ``train.max_nonfinite`` consecutive steps."""


class Task(Protocol):
    """What differs between pre-training and fine-tuning; the three stages around it are the same."""

    model_class: type[EarlyBertPreTrainedModel]
    model_overrides: dict[str, Any]  # config fields the task decides (e.g. num_labels)
    tokenizer: Any

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
        """Training FLOPs per token of a model of ``config`` on this task."""

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

    def step_metrics(self, outputs: list[Any], device: torch.device) -> dict[str, float]:
        return step_metrics(outputs, device, [float(o.task_loss) for o in outputs])

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    @property
    def epoch(self) -> int:
        return self.batches.epoch


# ---- the run's context ---------------------------------------------------------------------------------------

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


@contextlib.contextmanager
def _claim_output_dir(cfg: RunConfig, resuming: bool) -> Iterator[Path]:
    """Hold the output directory for this run: refuse one that holds another run (unless resuming) or that a live
    run is using (an flock on ``OUTPUT/.lock``, released when this run ends, however it ends)."""
    out = Path(cfg.output_dir)
    held: list[Any] = []  # rank 0's open lock file

    def claim() -> tuple[str, str]:
        token = f"{socket.gethostname()}:{os.getpid()}"
        out.mkdir(parents=True, exist_ok=True)
        held.append(lock := open(out / ".lock", "a+"))  # noqa: SIM115 - closed below
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.seek(0), lock.truncate(), lock.write(token), lock.flush()
            os.fsync(lock.fileno())  # other nodes read it next
        except BlockingIOError:
            lock.seek(0)
            return f"{out} is in use by a live run ({lock.read().strip() or '?'}); choose another --output-dir", token
        if (out / RUN_CONFIG).exists() and not resuming:
            return (f"{out} already holds a run; pass --resume to continue it, or choose another --output-dir "
                    "(nothing was changed)"), token
        return "", token

    try:
        problem, token = dist.on_rank0(claim)
        if problem:
            raise ConfigError(problem)
        _check_shared(out, token)
        yield out
    finally:
        for lock in held:
            lock.close()


def _check_shared(out: Path, token: str) -> None:
    """Every rank must see rank 0's output directory: checkpoints, the ticket and --resume depend on it."""
    try:
        sees = (out / ".lock").read_text() == token
    except OSError:
        sees = False
    blind = [r for r, ok in enumerate(dist.all_gather_object((sees, socket.gethostname()))) if not ok[0]]
    if blind:
        raise ConfigError(f"--output-dir {out} is not the same directory on every node: rank(s) {blind} do not see "
                          "rank 0's; checkpoints, the ticket and --resume need one shared directory at the same path")


_node_once_calls = itertools.count()  # every rank calls node_once in the same order: the calls' keys agree


def node_once(fn: Callable, *args: Any) -> Any:
    """Run ``fn`` on each node's local rank 0 first (it fills the node's cache), then on the other ranks; a failure
    anywhere fails every rank with the same message instead of leaving some waiting at a barrier.

    The other ranks wait in the job's key-value store, not in a collective: preparing a large corpus may take longer
    than ``EARLYBERT_DIST_TIMEOUT``, and they log that they are waiting (:func:`distributed.wait_for_keys`)."""
    if dist.world_size() == 1:
        return fn(*args)
    call = next(_node_once_calls)
    leaders = [r for r, local in enumerate(dist.all_gather_object(dist.local_rank())) if local == 0]
    result, error = None, ""
    if dist.local_rank() == 0:
        faults.slow("node_once")  # a corpus that takes longer than the collective timeout
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            logger.debug("failed on this rank", exc_info=True)
            error = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
        dist.set_key(f"earlybert/node_once/{call}/{dist.rank()}", error)
    errors = dist.wait_for_keys([f"earlybert/node_once/{call}/{r}" for r in leaders],
                                f"local rank 0 of every node (ranks {leaders}) to finish {fn.__name__}")
    if any(errors):
        raise ValueError(next(e for e in errors if e))
    return result if dist.local_rank() == 0 else fn(*args)


# ---- models ---------------------------------------------------------------------------------------------------

def _model_overrides(cfg: RunConfig, task: Task, gates: bool) -> dict[str, Any]:
    e = cfg.earlybert
    return dict(use_gates=gates, gate_l1_heads=e.l1_heads if gates else 0.0, gate_l1_ffn=e.l1_ffn if gates else 0.0,
                hidden_dropout_prob=cfg.model.dropout, attention_probs_dropout_prob=cfg.model.dropout,
                gradient_checkpointing_layers=cfg.train.activation_checkpointing, **task.model_overrides)


def initial_config(cfg: RunConfig, task: Task, gates: bool = True) -> EarlyBertConfig:
    """The unpruned model's configuration: ``model.init_from``'s, or the ``model.*`` shape."""
    m, extra = cfg.model, _model_overrides(cfg, task, gates)
    vocab = len(task.tokenizer)
    if not m.init_from:
        return EarlyBertConfig(vocab_size=vocab, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                               num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
                               max_position_embeddings=max(512, cfg.data.seq_len), **extra)
    config = hf_bert_config(m.init_from, **extra) if _is_hf_bert(m.init_from) else \
        EarlyBertConfig.from_pretrained(m.init_from, **extra)
    if config.vocab_size != vocab:
        raise ConfigError(f"model.init_from={m.init_from} has a vocabulary of {config.vocab_size}, the tokenizer "
                          f"{vocab}: pass the checkpoint's tokenizer with --data.tokenizer")
    if config.is_pruned and cfg.earlybert.enabled:
        raise ConfigError(f"model.init_from={m.init_from} is already shrunk to a ticket; train it with "
                          "--earlybert.enabled false")
    return config


def initial_model(cfg: RunConfig, task: Task, gates: bool) -> EarlyBertPreTrainedModel:
    """The model at step 0, identical on every rank and rebuildable at any time (rewinding needs it again): the
    ``model.init_from`` checkpoint (new heads initialised from ``train.seed``), or a random initialisation."""
    config = initial_config(cfg, task, gates)
    init_from = cfg.model.init_from
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        if not init_from:
            return task.model_class(config)
        if _is_hf_bert(init_from):
            return load_hf_bert(init_from, task.model_class, **_model_overrides(cfg, task, gates))
        return task.model_class.from_pretrained(init_from, config=config)


def _is_hf_bert(path: str) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "bert"
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.init_from={path}: not a model directory with a readable config.json ({e})") from e


def _peak_flops(ds_config: dict) -> float:
    """The job's matmul peak in its precision: every rank measures its own device at once (as they train: side by
    side, each with its threads), summed over ranks."""
    precision = next((k for k in ("bf16", "fp16") if ds_config[k]["enabled"]), "fp32")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.on_cuda() else torch.device("cpu")
    dist.barrier()
    return dist.all_reduce_sum([peak_flops(precision, device)], device)[0]


# ---- the training loop shared by all stages -------------------------------------------------------------------

def _train(run: Run, engine: Engine, phase: str, last_step: int, on_step=None, extra_state=None,
           before_step=None) -> bool:
    """Train from ``run.step`` to ``last_step``; ``on_step(step)`` returning True ends the stage early (the ticket
    was drawn); ``before_step()`` runs between each step's backward and its optimizer step. Logs, validates and
    checkpoints on the configured cadence. Returns whether it ended early."""
    t = run.cfg.train
    stage = run.stages.setdefault(phase, {"steps": 0, "train_s": 0.0, "wall_s": 0.0, "tokens": 0.0,
                                          "first_step": run.step + 1})
    flops = run.task.flops_per_token(engine.module.config)
    interval_s, interval_tokens, interval_samples, bad = 0.0, 0.0, 0, 0
    wall0 = time.perf_counter()
    ended_early = False
    while run.step < last_step:
        t0 = time.perf_counter()
        micro = run.task.next_step()
        step = engine.train_step(micro, before_step)
        m = {**step.readings, **run.task.step_metrics(step.outputs, engine.device)}
        dt = time.perf_counter() - t0
        tokens = dist.world_size() * sum(float(mb["attention_mask"].sum()) for mb in micro)  # this rank's x ranks
        run.step += 1
        stage["steps"] += 1
        stage["train_s"] += dt
        stage["tokens"] += tokens
        interval_s += dt
        interval_tokens += tokens
        interval_samples += dist.world_size() * sum(len(mb["input_ids"]) for mb in micro)
        bad = bad + 1 if not math.isfinite(m["loss"]) else 0
        if run.step % t.log_every == 0 or run.step == last_step or bad:  # a non-finite step is always logged
            tps = interval_tokens / interval_s
            m.update(tokens_per_s=tps, samples_per_s=interval_samples / interval_s, tflops=tps * flops / 1e12,
                     mfu=tps * flops / run.peak_flops, epoch=run.task.epoch)
            run.monitor.log(run.step, m)
            interval_s, interval_tokens, interval_samples = 0.0, 0.0, 0
        if bad >= t.max_nonfinite:
            raise NonFiniteLossError(f"the loss was non-finite for {bad} consecutive steps (up to step {run.step}); "
                                     f"stopping. {_last_good(run)}")
        if t.eval_every and run.step % t.eval_every == 0:
            run.evaluate(engine)
        if on_step is not None and on_step(run.step):
            ended_early = True
            break
        if t.save_every and run.step % t.save_every == 0 and bad == 0:
            _save(run, engine, phase, extra_state)
        faults.after_step(run.step, engine.module)
    stage["wall_s"] += time.perf_counter() - wall0
    stage["last_step"] = run.step
    run.nonfinite = bad
    return ended_early


def _last_good(run: Run) -> str:
    latest = Path(run.out, CHECKPOINTS, checkpoint.LATEST)
    where = latest.read_text().strip() if latest.is_file() else "none yet"
    return f"Last good checkpoint: {where}. Lower train.lr or use bf16."


def _save(run: Run, engine: Engine, phase: str, extra_state=None) -> None:
    extra = extra_state() if extra_state else {}
    rank_state = {"ticket": run.ticket.digest()} if run.ticket else {}
    checkpoint.save(engine, run.out / CHECKPOINTS, run.step, run.client_state(phase, **extra), run.cfg.train.keep_last,
                    rank_state)
    run.saved_step = run.step


def _load(run: Run, engine: Engine, path: Path) -> dict:
    state, rank_state = checkpoint.load(engine, path)
    if run.ticket is not None and rank_state.get("ticket", run.ticket.digest()) != run.ticket.digest():
        raise checkpoint.CheckpointError(f"{path}: written for another ticket than {run.out / TICKET_DIR}")
    run.restore(state)
    if checkpoint.resolve(path)[0].resolve() == (run.out / CHECKPOINTS).resolve():  # not one of another run's
        run.saved_step = run.step
    return state


# ---- stage 1 + 2: search and ticket drawing ----------------------------------------------------------------------

def _spec(cfg: RunConfig) -> PruneSpec:
    e = cfg.earlybert
    return PruneSpec(head_ratio=e.head_ratio, ffn_ratio=e.ffn_ratio, head_method=e.head_method,
                     ffn_method=e.ffn_method, ffn_multiple=e.ffn_multiple)


def _check_prunable(cfg: RunConfig, config: EarlyBertConfig) -> None:
    """Fail before training when the ratios cannot be applied to this model (e.g. a layer would be emptied)."""
    ones = Scores([np.ones(config.num_attention_heads)] * config.num_hidden_layers,
                  [np.ones(config.intermediate_size)] * config.num_hidden_layers)
    try:
        draw_masks(ones, _spec(cfg))
    except TicketError as e:
        raise ConfigError(f"earlybert ratios do not fit the model: {e}") from e


def search(run: Run, engine: Engine, stage: SearchStage) -> Ticket:
    """Train the gated model until the coordinator draws the ticket; every rank returns the same ticket."""
    drawn: list[Ticket] = []

    def check(step: int) -> bool:
        ticket = stage.check(step, engine)  # a collective on check steps
        drawn.extend([ticket] if ticket else [])
        return ticket is not None

    _train(run, engine, "search", run.cfg.train.steps, on_step=check, before_step=lambda: stage.before_step(engine),
           extra_state=lambda: {"search": stage.state_dict()})
    if not drawn:
        raise RuntimeError("the search reached train.steps without drawing a ticket (max_search_steps too large)")
    return drawn[0]


def _shrunk_model(run: Run, ticket: Ticket, searched: dict[str, torch.Tensor] | None) -> EarlyBertPreTrainedModel:
    """The physically smaller model the efficient stage starts from: the kept weights at initialisation or as
    pre-trained (``rewind``, the paper) or as searched (``continue``, gates folded in)."""
    full = initial_model(run.cfg, run.task, gates=True)
    if run.cfg.earlybert.weights == "continue" and searched is not None:
        full.load_state_dict(searched, strict=False)
        state = shrink_state_dict(full.state_dict(), full.config, ticket, fold_gates=True)
    else:
        state = shrink_state_dict(full.state_dict(), full.config, ticket, fold_gates=False)
    small = run.task.model_class(shrunk_config(full.config, ticket))
    small.load_state_dict(state)
    small.tie_weights()
    return small


def write_ticket(run: Run, ticket: Ticket, model: EarlyBertPreTrainedModel, full_config: EarlyBertConfig) -> Path:
    """``OUTPUT/ticket/``, written atomically by rank 0: the ticket, the model the efficient stage starts from
    (Hugging Face format), the tokenizer, the run's position and every rank's random state — all a fresh launch on
    any world size needs (and, on the same number of ranks, to continue exactly)."""
    path = run.out / TICKET_DIR
    rng = dist.all_gather_object(checkpoint.rng_state())

    def write() -> None:
        with atomic_directory(path) as tmp:
            ticket.save(tmp / TICKET_FILE)
            torch.save(rng, tmp / RNG_FILE)
            model.save_pretrained(tmp)  # at the top, as in final/: AutoModel*.from_pretrained(OUTPUT/ticket)
            run.task.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            state = {**run.client_state("efficient")["earlybert"], "full_config": full_config.to_dict()}
            atomic_write_text(tmp / STATE, json.dumps(state, indent=1))

    dist.on_rank0(write)
    return path


def _copy_ticket(src: Path, dst: Path) -> None:
    with atomic_directory(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _restore_ticket_rng(ticket_dir: Path) -> None:
    """Every rank's random state as the ticket was written, so that a resume through the ticket on the same number
    of ranks draws the same dropout masks as the uninterrupted run (on another number it cannot)."""
    path = ticket_dir / RNG_FILE
    states = torch.load(path, weights_only=True) if path.is_file() else []
    if len(states) == dist.world_size():
        checkpoint.set_rng_state(states[dist.rank()])
    elif dist.rank() == 0:
        logger.info("%s: random states of %d rank(s), this run has %d: dropout draws differ from the run that drew "
                    "the ticket", ticket_dir, len(states), dist.world_size())


def _load_ticket_dir(path: Path, task: Task) -> tuple[Ticket, EarlyBertPreTrainedModel, dict]:
    ticket, state = Ticket.load(path / TICKET_FILE), _ticket_state(path)
    # the model sits beside ticket.json (in model/ in tickets written before 2026-12)
    model_dir = next((d for d in (path, path / "model") if (d / "config.json").is_file()), None)
    if model_dir is None:
        raise checkpoint.CheckpointError(f"{path}: not a ticket checkpoint (no model config.json written by "
                                         "earlybert_ds)")
    model = task.model_class.from_pretrained(model_dir)
    if model.config.heads_per_layer != ticket.heads_per_layer or \
            model.config.intermediate_sizes != ticket.intermediate_sizes:
        raise checkpoint.CheckpointError(f"{path}: the model in model/ does not have the ticket's shape")
    return ticket, model, state


def _ticket_state(path: Path) -> dict:
    if not (path / STATE).is_file():
        raise checkpoint.CheckpointError(f"{path}: not a ticket checkpoint (no {STATE} written by earlybert_ds)")
    try:
        state = json.loads((path / STATE).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise checkpoint.CheckpointError(f"{path / STATE}: not valid JSON ({e})") from e
    missing = [k for k in ("step", "data", "full_config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise checkpoint.CheckpointError(f"{path / STATE}: no field {missing[0]!r} (not written by earlybert_ds?)")
    return state


# ---- the whole pipeline -----------------------------------------------------------------------------------------

@dataclass
class Start:
    """Where a launch begins: a fresh stage, a training checkpoint, or a ticket checkpoint."""

    phase: str  # "search" | "efficient" | "full"
    step: int = 0
    checkpoint: Path | None = None
    ticket_dir: Path | None = None


def _where_to_start(cfg: RunConfig, out: Path, resume: bool, resume_from: str | None) -> Start:
    fresh = Start("full" if not cfg.earlybert.enabled else "search")
    if resume_from:
        p = Path(resume_from)
        if (p / TICKET_FILE).is_file():
            return Start("efficient", _ticket_state(p)["step"], ticket_dir=p)
        state = checkpoint.peek_client_state(p)
        return Start(state["phase"], state["step"], checkpoint=p)
    if not resume:
        return fresh
    ckpts, ticket = out / CHECKPOINTS, out / TICKET_DIR
    state = checkpoint.peek_client_state(ckpts) if (ckpts / checkpoint.LATEST).is_file() else None
    if (ticket / TICKET_FILE).is_file() and (state is None or state["phase"] == "search"):
        return Start("efficient", _ticket_state(ticket)["step"], ticket_dir=ticket)  # newer than any search ckpt
    if state is None:
        logger.info("--resume: nothing to resume in %s, starting from the beginning", out)
        return fresh
    return Start(state["phase"], state["step"], checkpoint=ckpts)


def run_earlybert(cfg: RunConfig, make_task: Callable[[RunConfig], Task], resume: bool = False,
                  resume_from: str | None = None) -> dict:
    """Run the three stages (or the full-model baseline) on the task that ``make_task`` builds; returns the summary
    that is also written to ``OUTPUT/summary.json``."""
    rank, _ = dist.init()
    random.seed(cfg.train.seed + rank)  # dropout and anything else random: reproducible, different per rank
    torch.manual_seed(cfg.train.seed + rank)
    ds_config = build_ds_config(cfg, dist.world_size(), dist.on_cuda())  # a bad config fails before any work
    logger.info(describe_precision(cfg, dist.on_cuda()))
    with _claim_output_dir(cfg, resume or bool(resume_from)) as out:
        # decided once, so that no file-system view can split the ranks across stages
        start = dist.on_rank0(_where_to_start, cfg, out, resume, resume_from)
        task = make_task(cfg)  # may settle derived fields of cfg (e.g. steps from epochs)
        settle_detect_every(cfg.earlybert)  # from the search budget, now settled
        cfg.validate()
        if start.phase == "efficient":
            dist.on_rank0(_check_ticket_fits, cfg, task, _ticket_dir_of(start))
        full_config = initial_config(cfg, task, gates=cfg.earlybert.enabled)
        if start.phase == "search":
            _check_prunable(cfg, full_config)
        dist.on_rank0(save_config, cfg, out / RUN_CONFIG)  # from here on the directory holds this run
        run = Run(cfg, out, task, peak_flops=_peak_flops(ds_config))
        run.monitor = Monitor(cfg.log, out, cfg.to_dict(), rank, cfg.train.steps, resume_step=start.step)
        try:
            return _run_stages(run, start, full_config)
        finally:
            run.monitor.close()


def _ticket_dir_of(start: Start) -> Path:
    """The ticket an efficient-stage start trains: the one given, or the one beside the checkpoints."""
    return start.ticket_dir or checkpoint.resolve(start.checkpoint)[0].parent / TICKET_DIR


#: The run-config fields that decide the unpruned model's shape and dropout, by their name in its configuration.
_MODEL_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "intermediate_size": "intermediate_size", "dropout": "hidden_dropout_prob"}


def _check_ticket_fits(cfg: RunConfig, task: Task, ticket_dir: Path) -> None:
    """Refuse a ticket whose model this run could not train faithfully: a vocabulary other than the run's tokenizer
    (same size, other words: every embedding row would mean another word) or ``--model.*`` options that differ
    from the model the ticket was drawn from (the ticket's shape wins; they would be ignored)."""
    full = _ticket_state(ticket_dir)["full_config"]
    for name, key in _MODEL_FIELDS.items():
        if f"model.{name}" in cfg.given and getattr(cfg.model, name) != full.get(key):
            raise ConfigError(f"model.{name}={getattr(cfg.model, name)} differs from the model of the ticket "
                              f"{ticket_dir} ({key}={full.get(key)}); a ticket trains the model it was drawn from: "
                              f"drop --model.{name}, or start a new run")
    if (ticket_dir / TOKENIZER_DIR).is_dir():
        try:
            theirs = load_tokenizer(ticket_dir / TOKENIZER_DIR)
        except DataError as e:
            raise checkpoint.CheckpointError(f"{ticket_dir}: unreadable ticket tokenizer ({e})") from e
        if tokenizer_digest(theirs) != tokenizer_digest(task.tokenizer):
            ours = f"data.tokenizer={cfg.data.tokenizer}" if cfg.data.tokenizer else "this run's tokenizer"
            raise ConfigError(f"the ticket {ticket_dir} was drawn with the tokenizer in {ticket_dir / TOKENIZER_DIR} "
                              f"({len(theirs)} tokens); {ours} ({len(task.tokenizer)} tokens) gives other token "
                              f"ids: pass --data.tokenizer {ticket_dir / TOKENIZER_DIR}")
    elif full.get("vocab_size") != len(task.tokenizer):
        raise ConfigError(f"the ticket {ticket_dir} has a vocabulary of {full.get('vocab_size')}, this run's "
                          f"tokenizer {len(task.tokenizer)}")


def _run_stages(run: Run, start: Start, full_config: EarlyBertConfig) -> dict:
    cfg, out = run.cfg, run.out
    if start.phase == "search":
        ticket, model = _search_and_draw(run, start, full_config)
    elif start.phase == "efficient":
        ticket_dir = _ticket_dir_of(start)
        if ticket_dir.resolve() != (out / TICKET_DIR).resolve():  # the run directory stays self-contained
            dist.on_rank0(_copy_ticket, ticket_dir, out / TICKET_DIR)
        ticket, model, state = _load_ticket_dir(ticket_dir, run.task)
        if start.checkpoint is None:
            run.restore(state)
            _restore_ticket_rng(ticket_dir)
        full_config = EarlyBertConfig.from_dict(state["full_config"])
    else:  # the full-model baseline
        ticket, model = None, initial_model(cfg, run.task, gates=False)

    phase = "full" if ticket is None else "efficient"
    run.ticket = ticket
    rewarmup = cfg.earlybert.rewarmup_steps if ticket and ticket.step else 0
    engine = Engine(model, cfg, start_step=ticket.step if ticket else 0, rewarmup_steps=rewarmup)
    if start.checkpoint is not None and start.phase != "search":
        _load(run, engine, start.checkpoint)
    _train(run, engine, phase, cfg.train.steps)
    if run.nonfinite:  # fewer than train.max_nonfinite, but nothing may be saved or exported from them
        raise NonFiniteLossError(f"the last {run.nonfinite} step(s), up to step {run.step}, had a non-finite loss: "
                                 f"no checkpoint or model was written from them. {_last_good(run)}")
    if run.saved_step != run.step:  # a resumed finished run has its checkpoint: never rewrite it in place
        _save(run, engine, phase)
    final_eval = run.evaluate(engine)
    _export(run, engine)
    run.task.finish(engine, out)
    summary = _summary(run, ticket, full_config, engine.module.config, final_eval)
    engine.destroy()
    dist.on_rank0(_write_summary, run, summary)
    return summary


def _write_summary(run: Run, summary: dict) -> None:
    atomic_write_text(run.out / SUMMARY, json.dumps(summary, indent=1) + "\n")
    run.monitor.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    logger.info("done: ticket %s, summary %s, final model %s\n%s", summary["paths"]["ticket"], run.out / SUMMARY,
                summary["paths"]["final_model"], stage_table(summary))


def _search_and_draw(run: Run, start: Start, full_config: EarlyBertConfig) -> tuple[Ticket, EarlyBertPreTrainedModel]:
    """Stages 1 and 2: search (or resume the search), draw the ticket, shrink, write the ticket checkpoint."""
    cfg = run.cfg
    spec, searched = _spec(cfg), None
    if cfg.earlybert.draw == "random":  # the paper's baseline: no search, a random ticket at the same ratios
        layers = full_config.num_hidden_layers
        masks = random_masks([full_config.num_attention_heads] * layers, [full_config.intermediate_size] * layers,
                             spec, cfg.train.seed)
        ticket = Ticket.from_masks(masks, 0, "random", spec, full_config)
    else:
        stage = SearchStage(cfg.earlybert, spec, cfg.train.seed, run.monitor, run.search_log, run.out / "plots")
        engine = Engine(initial_model(cfg, run.task, gates=True), cfg, start_step=0)
        if start.checkpoint:
            stage.load_state_dict(_load(run, engine, start.checkpoint)["search"])
        ticket = search(run, engine, stage)
        if cfg.earlybert.weights == "continue":
            searched = engine.full_state_dict()  # collective
        engine.destroy()
        del engine
    small = _shrunk_model(run, ticket, searched)
    write_ticket(run, ticket, small, full_config)
    run.monitor.event(ticket.step, "ticket", {"reason": ticket.reason, "heads_per_layer": ticket.heads_per_layer,
                                              "intermediate_sizes": ticket.intermediate_sizes})
    if dist.rank() == 0:
        logger.info("ticket drawn at step %d (%s): heads per layer %s, FFN widths %s", ticket.step, ticket.reason,
                    ticket.heads_per_layer, ticket.intermediate_sizes)
    return ticket, small


def _export(run: Run, engine: Engine) -> None:
    """``OUTPUT/final/``: the trained model in Hugging Face format (safetensors) with its tokenizer."""
    state = engine.full_state_dict()  # collective

    def write() -> None:
        model = run.task.model_class(engine.module.config)
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        with atomic_directory(run.out / FINAL_DIR) as tmp:
            model.save_pretrained(tmp)
            run.task.tokenizer.save_pretrained(tmp)

    dist.on_rank0(write)


def _summary(run: Run, ticket: Ticket | None, full_config: EarlyBertConfig, final_config: EarlyBertConfig,
             final_eval: dict) -> dict:
    full_flops, final_flops = run.task.flops_per_token(full_config), run.task.flops_per_token(final_config)
    stages = {}
    for name, s in run.stages.items():
        tps = s["tokens"] / s["train_s"] if s["train_s"] else 0.0
        flops = final_flops if name == "efficient" else full_flops
        stages[name] = {**s, "tokens_per_s": tps, "train_flops_per_token": flops, "mfu": tps * flops / run.peak_flops}
    speed = {}
    if stages.get("search", {}).get("tokens_per_s") and stages.get("efficient", {}).get("tokens_per_s"):
        realized = stages["efficient"]["tokens_per_s"] / stages["search"]["tokens_per_s"]
        speed = {"speedup_efficient_vs_search": realized, "speedup_flop_limit": full_flops / final_flops,
                 "speedup_realized_over_limit": realized * final_flops / full_flops}
    return {
        "steps": run.step,
        "ticket": None if ticket is None else {
            "step": ticket.step, "reason": ticket.reason, "heads_per_layer": ticket.heads_per_layer,
            "intermediate_sizes": ticket.intermediate_sizes, "heads": ticket.heads, "ffn": ticket.ffn},
        "params_full": count_parameters(full_config, run.task.model_class),
        "params_final": count_parameters(final_config, run.task.model_class),
        "train_flops_per_token_full": full_flops, "train_flops_per_token_final": final_flops,
        "flop_ratio": final_flops / full_flops,
        "peak_flops": run.peak_flops,
        "stages": stages,
        **speed,
        "wall_s": sum(s["wall_s"] for s in run.stages.values()),
        **{f"final_{k}": v for k, v in final_eval.items()},
        "mask_distances": run.search_log,
        "paths": {"ticket": str(run.out / TICKET_DIR) if ticket else None, "final_model": str(run.out / FINAL_DIR),
                  "metrics": str(run.out / "metrics.jsonl"), "wandb": str(run.monitor.wandb_file or "")},
    }


def stage_table(summary: dict) -> str:
    """The summary's time and speed per stage, as a person reads it at the end of a job."""
    rows = [f"{'stage':<10}{'steps':>7}{'wall s':>9}{'tokens/s':>10}{'GFLOP/token':>13}{'MFU':>7}"]
    for name, s in summary["stages"].items():
        rows.append(f"{name:<10}{s['steps']:>7}{s['wall_s']:>9.1f}{s['tokens_per_s']:>10.0f}"
                    f"{s['train_flops_per_token'] / 1e9:>13.4g}{s['mfu']:>7.1%}")
    if "speedup_efficient_vs_search" in summary:
        rows.append(f"efficient vs search: {summary['speedup_efficient_vs_search']:.2f}x tokens/s against a FLOP "
                    f"limit of {summary['speedup_flop_limit']:.2f}x (realized/limit "
                    f"{summary['speedup_realized_over_limit']:.2f}); MFU against the measured peak of "
                    f"{summary['peak_flops'] / 1e9:.0f} GFLOP/s")
    return "\n".join(rows)
