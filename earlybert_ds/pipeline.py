"""EarlyBERT on DeepSpeed, stage by stage — the same stages for pre-training and fine-tuning.

    1. search   the full model with slimming gates trains with an L1 penalty on them; every ``detect_every`` steps
                all ranks read the gates and the coordinator (rank 0) draws masks from the units' scores and checks
                whether they have stopped changing (the early-bird test, :class:`~earlybert_ds.search.SearchStage`);
    2. draw     rank 0 broadcasts the decision and the ticket, so every rank switches at the same step;
    3. shrink   the search engine is torn down and every rank shrinks the model physically to the ticket, which
                rank 0 writes to ``OUTPUT/ticket/`` (ticket.json, the shrunk model, the tokenizer, the data position);
    4. train    a new engine trains the small model to ``train.steps`` (efficient training); the model is exported.

What differs between pre-training and fine-tuning (data, model head, evaluation) is a :class:`~earlybert_ds.trainer.
Task`; see ``pretrain.py`` and ``finetune.py``. With ``earlybert.enabled = false`` the full model trains throughout
(the baseline). Every stage checkpoints and resumes exactly; ``--resume-from OUTPUT/ticket`` restarts the efficient
stage on any number of ranks.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from . import distributed as dist
from . import trainer
from .checkpoint import Start
from .config import FIXED_DRAWS, NO_SEARCH_DRAWS, ConfigError, RunConfig, save_config
from .dsconfig import plan_ds
from .engine import Engine
from .flops import count_parameters
from .hardware import job_peak_flops, this_machine, use_deterministic_kernels
from .model_card import model_card
from .modeling import EarlyBertConfig, EarlyBertPreTrainedModel, hf_bert_config, load_hf_bert
from .monitor import Monitor, text_log
from .probe import check_probe, probe_and_draw
from .search import SearchStage, check_prunable, given_ticket, random_ticket
from .shrink import shrink
from .summary import run_summary, write_summary
from .ticket import Ticket
from .trainer import NonFiniteLossError, Run, Task

logger = logging.getLogger("earlybert_ds")
Model = EarlyBertPreTrainedModel


def run_earlybert(cfg: RunConfig, make_task: Callable[[RunConfig], Task], resume: bool = False,
                  resume_from: str | None = None, overrides: set[str] = frozenset()) -> dict:
    """Run the stages (or the full-model baseline) on the task that ``make_task`` builds; returns the summary that
    is also written to ``OUTPUT/summary.json``."""
    rank, world = dist.init()
    resuming = resume or bool(resume_from)
    with dist.claim_output_dir(cfg.output_dir, resuming, checkpoint.RUN_CONFIG) as out, \
            text_log(out, rank, append=resuming):
        # decided once, so that no file-system view can split the ranks across stages or configurations; only the
        # data cache is each node's own (a node-local disk)
        cache_dir = cfg.data.cache_dir
        cfg, start = dist.on_rank0(checkpoint.begin, cfg, out, resume, resume_from, overrides, world)
        if "data.cache_dir" in cfg.given:
            cfg.data.cache_dir = cache_dir
        random.seed(cfg.train.seed + rank)  # dropout and anything else random: reproducible, different per rank
        torch.manual_seed(cfg.train.seed + rank)
        if cfg.train.deterministic:
            use_deterministic_kernels()
        plan = plan_ds(cfg, world, this_machine())  # a bad config fails before any work
        logger.info(plan.describe_precision())
        task = make_task(cfg)
        cfg.resolve(task.epoch_examples, world)  # derived fields settled, then frozen
        if start.phase == "efficient":
            dist.on_rank0(checkpoint.check_ticket_fits, cfg, task.tokenizer, start.ticket)
        full_config = initial_config(cfg, task, gates=cfg.earlybert.enabled)
        if start.phase == "search":
            check_prunable(cfg.earlybert, full_config)
            check_probe(cfg.earlybert, task.model_class)
        dist.on_rank0(save_config, cfg, out / checkpoint.RUN_CONFIG)  # from here on the directory holds this run
        if rank == 0:
            _log_budget(cfg, world, count_parameters(full_config, task.model_class))
        run = Run(cfg, out, task, peak_flops=job_peak_flops(plan.config))
        run.monitor = Monitor(cfg.log, out, cfg.to_dict(), rank, cfg.train.steps, resume_step=start.step)
        try:
            return _run_stages(run, start, full_config)
        finally:
            run.monitor.close()


def _log_budget(cfg: RunConfig, world: int, params: int) -> None:
    """What the run will do, in the numbers a BERT recipe is written in."""
    t, e = cfg.train, cfg.earlybert
    search = ("no search (the full model)" if not e.enabled else f"no search (draw={e.draw})"
              if e.draw in NO_SEARCH_DRAWS else f"ticket at step {e.fixed_step} (draw={e.draw})"
              if e.draw in FIXED_DRAWS else f"search for at most {e.max_search_steps} steps")
    logger.info("world size %d: global batch %d = micro batch %d x grad accum %d x %d rank(s); %d steps, %s; "
                "warm-up %d steps, lr %g (%s, %s decay); %s parameters", world, cfg.global_batch(world),
                t.micro_batch_size, t.grad_accum, world, t.steps, search, t.warmup_steps, t.lr, t.optimizer,
                t.schedule, f"{params:,}")


def _run_stages(run: Run, start: Start, full_config: EarlyBertConfig) -> dict:
    """Search, draw, shrink, train — from wherever this launch starts."""
    ticket, model = None, None
    if start.phase == "search":
        ticket, searched = search_and_draw(run, start, full_config)
        model = shrink_to_ticket(run, ticket, searched)
        write_ticket(run, ticket, model, full_config)
    elif start.phase == "efficient":  # resumed after the ticket was drawn
        ticket, model, full_config = load_ticket(run, start)
    if model is None:  # the full-model baseline
        model = initial_model(run.cfg, run.task, gates=False)
    return train_efficient(run, start, ticket, model, full_config)


def search_and_draw(run: Run, start: Start, full_config: EarlyBertConfig) -> tuple[Ticket, dict | None]:
    """Stages 1 and 2: train the gated model until the coordinator draws the ticket, which every rank receives;
    with it the searched weights when the efficient stage continues from them (``earlybert.weights=continue``), or
    the probed head (``earlybert.draw=probe``)."""
    cfg = run.cfg
    if cfg.earlybert.draw == "random":  # the paper's baseline: no search, a random ticket at the same ratios
        return random_ticket(cfg.earlybert, full_config, cfg.train.seed), None
    if cfg.earlybert.draw == "given":  # no search either: a ticket drawn elsewhere
        return given_ticket(cfg.earlybert, full_config), None
    if cfg.earlybert.draw == "probe":  # no search: the units scored through a probed head, at step 0
        return probe(run)
    stage = SearchStage(cfg.earlybert, cfg.train.seed, run.monitor, run.search_log, run.out / "plots")
    engine = Engine(initial_model(cfg, run.task, gates=True), cfg, start_step=0)
    if start.checkpoint:
        stage.load_state_dict(trainer.load(run, engine, start.checkpoint)["search"])
    trainer.train(run, engine, "search", cfg.train.steps, stage)
    if stage.ticket is None:
        raise RuntimeError("the search reached train.steps without drawing a ticket (max_search_steps too large)")
    searched = engine.full_state_dict() if cfg.earlybert.weights == "continue" else None  # collective
    engine.destroy()
    return stage.ticket, searched


def probe(run: Run) -> tuple[Ticket, dict | None]:
    """The probe route's draw at step 0 (``earlybert.draw=probe``), its time a stage of its own (``probe``); with it the
    probed head when the ticket starts from it (``earlybert.probe_head=probed``)."""
    cfg = run.cfg
    ticket, head, metrics = probe_and_draw(initial_model(cfg, run.task, gates=True), run.task.train, cfg.earlybert,
                                           cfg.train.micro_batch_size, cfg.train.seed)
    run.stages["probe"] = {"steps": 0, "train_s": metrics["probe/seconds"], "wall_s": metrics["probe/seconds"],
                           "cpu_s": metrics["probe/cpu_seconds"], "tokens": 0.0, "first_step": 0, "last_step": 0}
    run.monitor.log(0, metrics)
    return ticket, head if cfg.earlybert.probe_head == "probed" else None


def shrink_to_ticket(run: Run, ticket: Ticket, searched: dict | None) -> Model:
    """Stage 3: the physically smaller model the efficient stage starts from: the kept weights at initialisation or
    as pre-trained (``rewind``, the paper) or as searched (``continue``, gates folded in); a probed head replaces
    the fresh one."""
    full = initial_model(run.cfg, run.task, gates=True)
    if searched is not None:
        full.load_state_dict(searched, strict=False)
    return shrink(full, ticket, fold_gates=searched is not None)


def write_ticket(run: Run, ticket: Ticket, model: Model, full_config: EarlyBertConfig) -> None:
    """``OUTPUT/ticket/``: everything a fresh launch on any number of ranks needs to train the ticket."""
    state = {**run.client_state("efficient")["earlybert"], "full_config": full_config.to_dict()}
    where = run.out / checkpoint.TICKET_DIR
    checkpoint.write_ticket_dir(where, ticket, model, run.task.tokenizer, state,
                                model_card(run, where, model.config, full_config, ticket))
    run.monitor.event(ticket.step, "ticket", {"reason": ticket.reason, "heads_per_layer": ticket.heads_per_layer,
                                              "intermediate_sizes": ticket.intermediate_sizes})
    if dist.rank() == 0:
        logger.info("ticket drawn at step %d (%s): heads per layer %s, FFN widths %s", ticket.step, ticket.reason,
                    ticket.heads_per_layer, ticket.intermediate_sizes)


def load_ticket(run: Run, start: Start) -> tuple[Ticket, Model, EarlyBertConfig]:
    """The ticket, shrunk model and unpruned config of a ticket checkpoint (copied into this run's directory, which
    stays self-contained); a start from the ticket itself also takes its position and random state."""
    ticket_dir, own = start.ticket, run.out / checkpoint.TICKET_DIR
    if ticket_dir.resolve() != own.resolve():
        dist.on_rank0(checkpoint.copy_ticket_dir, ticket_dir, own)
    ticket, model, state = checkpoint.load_ticket_dir(ticket_dir, run.task.model_class)
    if start.checkpoint is None:
        run.restore(state)
        checkpoint.restore_ticket_rng(ticket_dir)
    return ticket, model, EarlyBertConfig.from_dict(state["full_config"])


def train_efficient(run: Run, start: Start, ticket: Ticket | None, model: Model, full_config: EarlyBertConfig) -> dict:
    """Stage 4: train the shrunk model (the full one without a ticket) to ``train.steps``, validate, export, and
    report."""
    cfg, phase = run.cfg, "full" if ticket is None else "efficient"
    run.ticket = ticket
    rewarmup = cfg.earlybert.rewarmup_steps if ticket and ticket.step else 0
    engine = Engine(model, cfg, start_step=ticket.step if ticket else 0, rewarmup_steps=rewarmup)
    if start.checkpoint is not None and start.phase != "search":
        trainer.load(run, engine, start.checkpoint)
    trainer.train(run, engine, phase, cfg.train.steps)
    if run.nonfinite:  # fewer than train.max_nonfinite, but nothing may be saved or exported from them
        raise NonFiniteLossError(f"the last {run.nonfinite} step(s), up to step {run.step}, had a non-finite loss: "
                                 f"no checkpoint or model was written from them. {trainer.last_good(run)}")
    if run.saved_step != run.step:  # a resumed finished run has its checkpoint: never rewrite it in place
        trainer.save(run, engine, phase)
    final_eval = run.evaluate(engine)
    state = engine.full_state_dict()  # collective
    where, config = run.out / checkpoint.FINAL_DIR, engine.module.config
    dist.on_rank0(checkpoint.export_final, where, run.task.model_class, config, state, run.task.tokenizer,
                  model_card(run, where, config, full_config, ticket, final_eval))
    run.task.finish(engine, run.out)
    summary = run_summary(run, ticket, full_config, engine.module.config, final_eval)
    engine.destroy()
    dist.on_rank0(write_summary, run, summary)
    return summary


# ---- the run's initial model --------------------------------------------------------------------------------------

def _model_overrides(cfg: RunConfig, task: Any, gates: bool) -> dict[str, Any]:
    e = cfg.earlybert
    return dict(use_gates=gates, gate_l1_heads=e.l1_heads if gates else 0.0, gate_l1_ffn=e.l1_ffn if gates else 0.0,
                hidden_dropout_prob=cfg.model.dropout, attention_probs_dropout_prob=cfg.model.dropout,
                gradient_checkpointing_layers=cfg.train.activation_checkpointing, **task.model_overrides)


def initial_config(cfg: RunConfig, task: Any, gates: bool = True) -> EarlyBertConfig:
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


def initial_model(cfg: RunConfig, task: Any, gates: bool) -> EarlyBertPreTrainedModel:
    """The model at step 0 of ``task`` (its ``model_class``, ``model_overrides`` and ``tokenizer``), identical on
    every rank and rebuildable at any time (rewinding needs it again): the ``model.init_from`` checkpoint (new heads
    initialised from ``train.seed``), or a random initialisation."""
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
