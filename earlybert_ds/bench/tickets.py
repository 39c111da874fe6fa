"""The tickets suite: ticket quality over K seeds of each method (full model, EarlyBERT as published, random
tickets at step 0 and at each method's own step, search variants) at the same budget, real runs of the fine-tuning
or the pre-training task, and each method's paired differences against the controls."""

from __future__ import annotations

import argparse
import heapq
import io
import json
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, redirect_stdout
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..checkpoint import FINAL_DIR
from ..config import EarlyBertArgs, RunConfig
from ..data import load_tokenizer
from ..modeling import EarlyBertForSequenceClassification, load_hf_bert
from ..plots import plot_intervals
from ..finetune import ClassificationTask
from ..pipeline import initial_model
from ..probe import in_order, normalise_layers, probe_head, score_batches, unit_scores
from ..search import TaylorImportance, is_gate, prune_spec, scores_of
from ..tasks import custom_task, encode, load_task_split
from ..ticket import Masks, PruneSpec, Scores, Ticket, draw_masks, mask_distance
from .common import (PYTHON_DOCS, SHAPES, BenchError, _machine, _prepare_data, _python_docs, _run, _run_args,
                     cli_options, interval, train_loss_tail)
from .finetune import TASKS, finetune_settings
from .pretrain import pretrain_settings

#: The paper-faithful EarlyBERT, spelt out so that it stays the paper's whatever the defaults become.
PAPER = ["--earlybert.score", "magnitude", "--earlybert.gate_lr", "none", "--earlybert.l1_heads", "1e-4",
         "--earlybert.l1_ffn", "1e-4", "--earlybert.weights", "rewind", "--earlybert.rewarmup_steps", "0"]
CONTROLS = ("full", "random@0")  # the references every variant is compared with (besides its matched control)
#: Diagnostic tickets, not methods: drawn after training, from the Taylor importance of the units of the trained full
#: model of the same seed over a labelled split, then trained from step 0 like random@0 (``--earlybert.draw given``).
#: They measure what the choice of units can be worth at these ratios; ``oracle@dev`` reads the very dev labels it is
#: scored on: a ceiling, not something a user could run. ``widths@train`` / ``widths@dev`` keep the oracle's width per
#: layer but random units within each layer: oracle − widths is what its choice of units is worth, widths − random@0
#: what its (unbalanced) widths are worth. ``widths@next`` takes its widths from the full run of the *next* seed (the
#: last seed: the first's), another data order and head: whether the widths belong to the model and the task, so that
#: one full fine-tuning could give them to every later run, or to the run. ``oracle@next`` takes that run's whole
#: ticket, units too: what ``earlybert-ds ticket --run`` gives a later run (a seed or learning-rate sweep).
ORACLES = {"oracle@train": "train", "oracle@dev": "dev", "widths@train": "train", "widths@dev": "dev",
           "widths@next": "train", "oracle@next": "train"}
NEXT = ("widths@next", "oracle@next")  # drawn from the full run of the next seed
#: ``widths@M`` (M a method with a ticket of its own, not an oracle): the ticket M's run of the same seed drew, its
#: width per layer kept, its units drawn at random within each layer: M − widths@M is what M's choice of units is
#: worth beyond its widths.
WIDTHS = "widths@"
#: ``ticket@M``: the ticket that method M's run of the same seed drew, trained from step 0 like random@0: what M's
#: choice of units is worth with no search cost and no mid-schedule restart (e.g. M a search that draws late).
DRAWN = "ticket@"


def ticket_methods(lr: float, rewarmup: int) -> dict[str, list[str]]:
    """The tickets suite's methods: name -> its own options. ``paper`` is EarlyBERT as published, ``default`` the
    command's defaults; each lever changes one setting of the paper's."""
    return {
        "full": ["--earlybert.enabled", "false"],
        "paper": PAPER,
        "random@0": ["--earlybert.draw", "random"],
        "default": [],
        "gate_lr100": PAPER + ["--earlybert.gate_lr", f"{100 * lr:g}"],
        "gate_lr1000": PAPER + ["--earlybert.gate_lr", f"{1000 * lr:g}"],
        "l1x10": PAPER + ["--earlybert.l1_heads", "1e-3", "--earlybert.l1_ffn", "1e-3"],
        "signed": PAPER + ["--earlybert.score", "signed"],
        "taylor": PAPER + ["--earlybert.score", "taylor"],
        "continue": PAPER + ["--earlybert.weights", "continue"],
        "rewarmup": PAPER + ["--earlybert.rewarmup_steps", str(rewarmup)],
        "taylor+continue": PAPER + ["--earlybert.score", "taylor", "--earlybert.weights", "continue"],
        "probe": ["--earlybert.draw", "probe"],
        **{name: ["--earlybert.draw", "given"] for name in ORACLES},
    }


def _split_data(run: Path, split_file: str, max_len: int, num_labels: int) -> Any:
    """A labelled split of the custom task, tokenised as ``run`` was."""
    task = custom_task(num_labels, "text")
    return encode(load_task_split(task, split_file, "dev"), load_tokenizer(run / FINAL_DIR), max_len)


def taylor_scores(model: EarlyBertForSequenceClassification, data: Any, batch: int) -> Scores:
    """Each unit's Taylor importance Σ_batches |dL/dg| in ``model`` (its gates at 1, dropout off) over all of
    ``data`` in order, summed as the search sums its scores over steps."""
    return unit_scores(model, data, in_order(len(data), batch), "taylor", torch.device("cpu"))


def oracle_ticket(full_run: Path, split_file: str, max_len: int, batch: int, path: Path,
                  spec: PruneSpec = prune_spec(EarlyBertArgs())) -> Path:
    """Write to ``path`` the ticket (of the default ratios) that keeps the units of the trained model in
    ``full_run/final`` with the largest Taylor importance over ``split_file``."""
    model = EarlyBertForSequenceClassification.from_pretrained(full_run / FINAL_DIR, use_gates=True)
    scores = taylor_scores(model, _split_data(full_run, split_file, max_len, model.config.num_labels), batch)
    return Ticket.from_masks(draw_masks(scores, spec), 0, "given", spec, model.config).save(path)


def width_profile(full_run: Path, split_file: str, max_len: int, batch: int, steps: list[int], examples: int,
                  seed: int, spec: PruneSpec = prune_spec(EarlyBertArgs())) -> list[dict[str, Any]]:
    """When the trained model's ranking of units appears: at each of ``steps`` (0: the pre-trained encoder with a
    fresh head drawn with ``seed``, not the run's own draw; else the run's checkpoint there; the last: its final
    model), the FFN widths per layer of the ticket that Taylor importance over ``examples`` training examples (a
    fixed random subset) would draw, and the share of the final ticket's FFN neurons and heads it keeps."""
    model = EarlyBertForSequenceClassification.from_pretrained(full_run / FINAL_DIR, use_gates=True)
    data = _split_data(full_run, split_file, max_len, model.config.num_labels)
    subset = torch.utils.data.Subset(data, np.random.default_rng(0).permutation(len(data))[:examples].tolist())
    subset.collate = data.collate
    final = {k: v.clone() for k, v in model.state_dict().items()}

    def masks_at(step: int) -> Masks:
        if step == 0:
            torch.manual_seed(seed)
            init = json.loads((full_run / "run_config.json").read_text())["model"]["init_from"]
            state = load_hf_bert(init, EarlyBertForSequenceClassification, use_gates=True,
                                 num_labels=model.config.num_labels).state_dict()
        elif step == steps[-1]:
            state = final
        else:  # a single-process ZeRO-0 run's checkpoint: the module's full state
            state = torch.load(full_run / "checkpoints" / f"global_step{step}" / "mp_rank_00_model_states.pt",
                               map_location="cpu", weights_only=False)["module"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or not all(is_gate(k) for k in missing):
            raise BenchError(f"{full_run}: the state at step {step} does not fit the model")
        return draw_masks(taylor_scores(model, subset, batch), spec)

    ref = masks_at(steps[-1])
    rows = []
    for step in steps:
        m = ref if step == steps[-1] else masks_at(step)
        rows.append({"step": step, "ffn_widths": [int(f.sum()) for f in m.ffn], "ffn_kept_of_final":
                     _share(m.ffn, ref.ffn), "heads_kept_of_final": _share(m.heads, ref.heads)})
    return rows


def checkpoint_gates(ckpt: Path) -> tuple[Scores, TaylorImportance | None]:
    """The gates in a search checkpoint (``global_stepN``, any ZeRO stage and world size), and its Taylor sums where
    the search kept them. Under bf16/fp16 the values are the optimizer's fp32 master copies, in whichever layout
    DeepSpeed wrote them (:func:`_master_gates`): the module's half-precision copies round gates within 2^-7 of 1 to
    1.0, and with them every ranking; a layout not read here is refused, never replaced by the module's copies."""
    zero3_states = ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3 has no mp_rank_00_model_states.pt
    states = zero3_states if zero3_states.is_file() else ckpt / "mp_rank_00_model_states.pt"
    state = torch.load(states, map_location="cpu", weights_only=False)
    gates = _master_gates(ckpt, state)
    scores = Scores(heads=[v for k, v in gates.items() if k.endswith("head_gates")],
                    ffn=[v for k, v in gates.items() if k.endswith("ffn_gates")])
    taylor_state = state.get("earlybert", {}).get("search", {}).get("taylor")
    if taylor_state is None:
        return scores, None
    taylor = TaylorImportance(0.0, 0.0)
    taylor.load_state_dict(taylor_state)
    return scores, taylor


def _master_gates(ckpt: Path, state: dict) -> dict[str, np.ndarray]:
    """Each gate's fp32 value in the checkpoint ``ckpt`` whose model states are ``state``, in module order.

    ZeRO 1-3 partition the fp32 masters over the ranks' ``[bf16_]zero_pp_rank_*_optim_states.pt``: DeepSpeed's own
    ``zero_to_fp32`` reassembles them. At ZeRO-0 the model states hold the optimizer: FP16_UnfusedOptimizer (torch's
    AdamW, our Lamb) keeps one fp32 tensor per parameter (``fp32_groups``), FP16_Optimizer (FusedAdam) one flat fp32
    tensor per group (``fp32_groups_flat``); the gates' group is the last (``engine.param_groups``). Plain fp32
    training keeps no separate masters: the module's gates are exact."""
    partitions = sorted(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))
    if partitions:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        first = torch.load(partitions[0], map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
        if "zero_stage" not in first:  # what zero_to_fp32 reads; BF16_Optimizer records none
            raise BenchError(f"{ckpt}: written by DeepSpeed's BF16_Optimizer (bf16 with fp32 gradient accumulation, "
                             "data_types.grad_accum_dtype), whose fp32 masters are not read here")

        with redirect_stdout(io.StringIO()):  # it prints what it detects
            full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        return {k: v.detach().float().numpy() for k, v in full.items() if is_gate(k)}
    module, optimizer = state["module"], state.get("optimizer") or {}
    names = [k for k in module if is_gate(k)]
    if "fp32_groups" in optimizer:
        values = list(optimizer["fp32_groups"][-1])
    elif "fp32_groups_flat" in optimizer:
        flat, sizes = optimizer["fp32_groups_flat"][-1], [module[k].numel() for k in names]
        values = list(flat.split(sizes)) if flat.numel() == sum(sizes) else []
    elif all(module[k].dtype == torch.float32 for k in names):
        values = [module[k] for k in names]
    else:
        raise BenchError(f"{ckpt}: {module[names[0]].dtype} gates and no fp32 master copy in a layout read here "
                         f"(optimizer state keys: {sorted(optimizer)})")
    if not names or len(values) != len(names) or any(v.numel() != module[k].numel() for k, v in zip(names, values)):
        raise BenchError(f"{ckpt}: not a search checkpoint with one fp32 master copy per gate ({len(names)} gates)")
    return {k: v.detach().float().reshape(module[k].shape).numpy() for k, v in zip(names, values)}


def gate_profile(search_run: Path, steps: list[int]) -> list[dict[str, Any]]:
    """When a search's ticket settles: at each of ``steps`` (checkpoints of a search run that draws late, at
    ``earlybert.fixed_step``), the ticket its scores (the run's ``earlybert.score``) would draw, compared with the
    ticket it drew at the end: FFN widths per layer, the share of the final ticket's FFN neurons and heads kept, and
    the normalised Hamming distance to it."""
    earlybert = EarlyBertArgs(**json.loads((search_run / "run_config.json").read_text())["earlybert"])
    spec, final = prune_spec(earlybert), Ticket.load(search_run / "ticket")
    ref = final.masks()
    rows = []
    for step in steps:
        gates, taylor = checkpoint_gates(search_run / "checkpoints" / f"global_step{step}")
        m = draw_masks(scores_of(earlybert.score, gates, taylor), spec)
        rows.append({"step": step, "ffn_widths": [int(f.sum()) for f in m.ffn],
                     "ffn_kept_of_final": _share(m.ffn, ref.ffn), "heads_kept_of_final": _share(m.heads, ref.heads),
                     "distance_to_final": mask_distance(m, ref)})
    return rows + [{"step": final.step, "ffn_widths": final.intermediate_sizes, "ffn_kept_of_final": 1.0,
                    "heads_kept_of_final": 1.0, "distance_to_final": {"heads": 0.0, "ffn": 0.0}}]


def _share(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The share of the units kept by masks ``b`` that masks ``a`` keep too."""
    return sum(int((x & y).sum()) for x, y in zip(a, b)) / sum(int(y.sum()) for y in b)


def same_widths(ticket: Ticket, seed: int) -> Ticket:
    """A random ticket with ``ticket``'s number of heads and FFN neurons in every layer."""
    rng = np.random.default_rng(seed)

    def pick(kept: list[list[int]], n: int) -> list[list[int]]:
        return [sorted(rng.choice(n, len(k), replace=False).tolist()) for k in kept]

    return replace(ticket, heads=pick(ticket.heads, ticket.num_attention_heads),
                   ffn=pick(ticket.ffn, ticket.intermediate_size))


def matched_control(options: list[str], step: int) -> list[str]:
    """The same-step random control of a method: its very options (weights rule, search settings, data order),
    but a random ticket drawn at ``step``, the step the method drew its own ticket at."""
    return options + ["--earlybert.draw", "random_at", "--earlybert.fixed_step", str(step)]


def _tickets_jobs(args: argparse.Namespace, methods: dict[str, list[str]]) -> list[tuple[str, int, str | None]]:
    """(method, seed, method it is the matched control of) in run order: interleaved by seed, every matched
    control right after the rest of its seed, so that load on a shared machine falls on all methods alike;
    widths@next and oracle@next last, after every full run they can be drawn from (a run waits only for runs submitted
    before it)."""
    jobs, last = [], []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        jobs += [(m, seed, None) for m in methods if m not in NEXT]
        jobs += [(f"random@{m}", seed, m) for m in args.matched]
        last += [(m, seed, None) for m in NEXT if m in methods]
    return jobs + last


def _methods(args: argparse.Namespace) -> dict[str, list[str]]:
    """The methods to run (name -> its own options), once ``args`` has --quick's and the task's defaults."""
    if args.quick:
        args.seeds, args.train_per_class, args.dev_per_class, args.epochs, args.max_len = 2, 8, 4, 1.0, 32
        args.model_size, args.steps, args.eval_batches = "tiny", 24, 2
    args.batch = args.batch or (32 if args.task == "finetune" else 16)
    args.lr = args.lr or (5e-5 if args.task == "finetune" else 1e-3)
    args.matched = [m for m in args.matched.split(",") if m]
    methods = ticket_methods(args.lr, args.rewarmup)
    for spec in args.variant:
        name, _, opts = spec.partition("=")
        methods[name] = opts.split()
    names = args.methods.split(",")
    for i, name in enumerate(names):
        if name.startswith((DRAWN, WIDTHS)) and name not in ORACLES:
            source = name.partition("@")[2]
            if source not in names[:i] or source in CONTROLS or source in ORACLES:
                raise BenchError(f"--methods: {name} trains the ticket (or the widths) of {source!r}, which must be "
                                 "a method with a ticket of its own listed before it")
            methods[name] = ["--earlybert.draw", "given"]
    if unknown := (set(names) | set(args.matched)) - set(methods):
        raise BenchError(f"--methods/--matched: unknown {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(methods)} (or add one with --variant NAME=OPTIONS)")
    if set(args.matched) & {"full", "random@0"}:
        raise BenchError("--matched: the controls have no ticket of their own to match")
    if oracles := [m for m in names if m in ORACLES]:
        if args.task != "finetune" or "full" not in names or names.index("full") > names.index(oracles[0]):
            raise BenchError(f"--methods: {', '.join(oracles)} are drawn from the full model's fine-tuning run: "
                             "they need --task finetune and 'full' listed before them")
    if any(m in ORACLES or m.startswith((DRAWN, WIDTHS)) for m in args.matched):
        raise BenchError("--matched: an oracle, ticket@ or widths@ is trained from step 0; random@0 is its control")
    if set(NEXT) & set(names) and args.seeds < 2:
        raise BenchError("--methods: widths@next and oracle@next are drawn from another seed's full run: they need "
                         "--seeds >= 2")
    if args.profile_steps and args.profile_of not in names:
        raise BenchError(f"--profile-steps: the profile is read from the runs of --profile-of {args.profile_of}, "
                         "which --methods does not list")
    if args.profile_steps and (args.profile_of == "full") != (args.task == "finetune"):
        raise BenchError("--profile-of: fine-tuning profiles the full runs (the Taylor importance of the model as it "
                         "trains); pre-training profiles a search that draws late (its gates as they train)")
    return {m: methods[m] for m in names}


def _task(args: argparse.Namespace) -> tuple[dict[str, Any], str, str, dict[str, Any] | None]:
    """The task's settings shared by every run (the seed left out: each run has its own), its command, the key of
    its metric, and its data (fine-tuning: the section task, made here)."""
    root = _python_docs(args.corpus)
    if args.task == "finetune":
        data = TASKS[args.finetune_task](root, Path(args.out_dir) / "data", args.train_per_class, args.dev_per_class,
                                         args.seed)
        settings, command, key = finetune_settings(args, data, detect_every=False), "finetune", "dev_accuracy"
    else:
        args.corpus, data = str(root), None
        settings, command, key = pretrain_settings(args, detect_every=False), "pretrain", "val_loss"
    settings.pop("train.seed", None)
    if args.precision:
        settings["train.precision"] = args.precision
    return settings, command, key, data


class _Slots:
    """``n`` slots for runs, each freed slot given to the waiting job that comes first in the suite's order (a
    matched control that had to wait for its method does not queue behind every later seed)."""

    def __init__(self, n: int) -> None:
        self._free, self._waiting, self._cond = n, [], threading.Condition()

    @contextmanager
    def take(self, order: int) -> Iterator[None]:
        with self._cond:
            heapq.heappush(self._waiting, order)
            self._cond.wait_for(lambda: self._free > 0 and self._waiting[0] == order)
            heapq.heappop(self._waiting)
            self._free -= 1
            self._cond.notify_all()  # the next in order may take a slot that is still free
        try:
            yield
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()


def _run_jobs(args: argparse.Namespace, jobs: list[tuple[str, int, str | None]], methods: dict[str, list[str]],
              common: list[str], command: str, key: str, data: dict[str, Any] | None) -> list[dict]:
    """The runs of ``jobs``, ``args.parallel`` at a time; a run made before with the same options is reused. An
    oracle waits for the full run it is drawn from, a ticket@M for M's run, as a matched control for its method;
    a job that waits holds no slot (one thread per job, ``args.parallel`` slots for the runs themselves), so the
    next seeds' runs go on meanwhile, and takes the next free one once it can run."""
    done: dict[tuple[str, int], Future] = {}
    slots = _Slots(args.parallel)
    order = {job[:2]: i for i, job in enumerate(jobs)}  # a free slot goes to the earliest job: seeds stay in order

    def run(job: tuple[str, int, str | None]) -> dict | None:
        name, seed, of = job
        out = Path(args.out_dir) / f"{name}-s{seed}"
        source = args.first_seed + (seed - args.first_seed + 1) % args.seeds if name in NEXT else seed
        if name in ORACLES:  # drawn from the trained full model of this seed (widths@next, oracle@next: the next's)
            if done[("full", source)].result() is None:
                return None
            ticket = out.with_name(out.name + (f".from-s{source}" if source != seed else "") + ".ticket.json")
            opts = methods[name] + ["--earlybert.ticket", str(ticket)]
        elif name.startswith((DRAWN, WIDTHS)):  # the ticket its source method's run of this seed drew, or its widths
            source_run = Path(args.out_dir) / f"{name.partition('@')[2]}-s{seed}" / "ticket"
            if done[(name.partition("@")[2], seed)].result() is None:
                return None
            ticket = source_run if name.startswith(DRAWN) else out.with_name(out.name + ".ticket.json")
            opts = methods[name] + ["--earlybert.ticket", str(ticket)]
        elif of is None:
            opts = methods[name]
        else:
            method = done[(of, seed)].result()
            if method is None:
                return None
            opts = matched_control(methods[of], method["ticket_step"])
        record, options = out.with_name(out.name + ".json"), common + ["--train.seed", str(seed)] + opts
        if record.is_file() and not args.overwrite:  # the same run, already made: reused (more seeds, more methods)
            r = json.loads(record.read_text())
            if r["command"][4:-2] == options:
                if "train_loss" not in r:  # a record from before the suite kept it
                    r["train_loss"] = train_loss_tail(out)
                if "heads" not in r and (out / "summary.json").is_file():  # the same: the kept heads
                    r["heads"] = (json.loads((out / "summary.json").read_text())["ticket"] or {}).get("heads")
                return r
        if args.summarise_only:
            return None
        with slots.take(order[(name, seed)]):
            if name in ORACLES:
                oracle_ticket(Path(args.out_dir) / f"full-s{source}", data[ORACLES[name]], args.max_len, args.batch,
                              ticket)
                if name.startswith(WIDTHS):
                    same_widths(Ticket.load(ticket), seed).save(ticket)
            elif name.startswith(WIDTHS):
                same_widths(Ticket.load(source_run), seed).save(ticket)
            r = _run(command, options, out, args.threads, key)
        r.update(method=name, seed=seed, options=opts, metric=r[f"final_{key}"])
        record.write_text(json.dumps(r) + "\n")
        print(f"[tickets {args.task}] {name} seed {seed}: {key} {r['metric']:.4f}, CPU {r['process_cpu_s']:.0f} s, "
              f"ticket {r['ticket_step']} ({r['ticket_reason']})", file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max_workers=max(len(jobs), 1)) as pool:
        for job in jobs:  # in order: a matched control waits for its method, which was submitted before it
            done[job[:2]] = pool.submit(run, job)
        return [r for r in (f.result() for f in done.values()) if r is not None]


def tickets(args: argparse.Namespace) -> dict:
    """K seeds of each method at the same total budget (real runs), per-method means with intervals, and each
    variant's paired differences against the random controls and the full model."""
    methods = _methods(args)
    if args.probe_variants and args.task != "finetune":
        raise BenchError("--probe-variants: the probe draws fine-tuning tickets (--task finetune)")
    settings, command, key, data = _task(args)
    jobs = _tickets_jobs(args, methods)
    if args.task == "pretrain":
        for seed in sorted({s for _, s, _ in jobs}):  # the corpus' split depends on the seed: prepare each up front
            _prepare_data({**settings, "train.seed": seed})
    common = cli_options(settings)
    result: dict[str, Any] = {"suite": "tickets", "task": args.task, "machine": _machine(), "args": _run_args(args),
                              "options": common, "methods": {**methods}, "data": data}
    result["runs"] = _run_jobs(args, jobs, methods, common, command, key, data)
    result["summary"] = summarise_tickets(result["runs"], key, higher_is_better=args.task == "finetune")
    if args.profile_steps:
        result["profiles"] = _profiles(args, [r for r in result["runs"] if r["method"] == args.profile_of], data)
    if args.probe_variants:
        result["probe_variants"] = _probe_variants(args, settings, sorted({s for _, s, _ in jobs}))
    if args.plot:
        s = result["summary"]["methods"]
        plot_intervals({m: (v["cpu_vs_full"]["mean"], v["cpu_vs_full"]["ci95"], v["metric"]["mean"],
                            v["metric"]["ci95"]) for m, v in s.items() if "cpu_vs_full" in v},
                       "CPU time relative to the full model (paired by seed)", key, args.plot,
                       title=f"bench tickets ({args.task}): mean and 95% interval over seeds")
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def probe_variants(cfg: RunConfig, oracle: Ticket | None) -> list[dict[str, Any]]:
    """What the probe's settings would draw, without training: through the fresh head and the probed one, Taylor
    and Fisher scores, raw and normalised per layer (``cfg.earlybert``'s probe otherwise): the FFN widths per layer
    and, against ``oracle`` (the oracle@train ticket of the same seed), the share of its FFN neurons and heads each
    keeps (a random ticket: about the kept fractions, 0.6 and 0.67)."""
    cfg.settle_launch(1)  # one process: the batch and the model's tokenizer, settled as a run settles them
    task, e, t, cpu = ClassificationTask(cfg), cfg.earlybert, cfg.train, torch.device("cpu")
    model, spec = initial_model(cfg, task, gates=True), prune_spec(e)
    batches = score_batches(len(task.train), t.micro_batch_size, e.probe_batches, t.seed)
    rows = []
    for head in ("fresh", "probed"):
        if head == "probed":
            model.load_state_dict(probe_head(model, task.train, e, t.micro_batch_size, t.seed, cpu)[0], strict=False)
        for kind in ("taylor", "fisher"):
            raw = unit_scores(model, task.train, batches, kind, cpu)
            for norm in (False, True):
                m = draw_masks(normalise_layers(raw) if norm else raw, spec)
                row = {"head": head, "score": kind, "normalise": norm, "ffn_widths": [int(f.sum()) for f in m.ffn]}
                if oracle is not None:
                    row.update(ffn_kept_of_oracle=_share(m.ffn, oracle.masks().ffn),
                               heads_kept_of_oracle=_share(m.heads, oracle.masks().heads))
                rows.append(row)
    return rows


def _probe_variants(args: argparse.Namespace, settings: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Each seed's :func:`probe_variants` (kept in --out-dir), against its oracle@train ticket where there is one."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {}
    for seed in seeds:
        cache, oracle = (Path(args.out_dir) / f"{name}-s{seed}" for name in ("probe-variants", "oracle@train"))
        cache, oracle = cache.with_suffix(".json"), oracle.with_name(oracle.name + ".ticket.json")
        cfg = RunConfig.from_dict({**settings, "train.seed": seed})
        key = {"settings": cli_options(settings), "oracle": oracle.is_file()}
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if cached.get("key") != key:
            cached = {"key": key, "rows": probe_variants(cfg, Ticket.load(oracle) if oracle.is_file() else None)}
            atomic_write_text(cache, json.dumps(cached) + "\n")
        out[str(seed)] = cached["rows"]
    return out


def _profiles(args: argparse.Namespace, runs: list[dict], data: dict[str, Any] | None) -> dict[str, Any]:
    """Each profiled run's profile at ``--profile-steps`` (kept beside the run): fine-tuning, the full runs'
    :func:`width_profile` from step 0 to their last; pre-training, the :func:`gate_profile` of ``--profile-of``'s
    searches."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        run = Path(args.out_dir) / f"{args.profile_of}-s{r['seed']}"
        if missing := [st for st in args.profile_steps if not (run / "checkpoints" / f"global_step{st}").is_dir()]:
            how = "--earlybert.enabled false" if args.task == "finetune" else \
                "--earlybert.draw fixed --earlybert.fixed_step LATE"
            raise BenchError(f"--profile-steps: {run} has no checkpoint at step(s) {missing}: give the profiled runs "
                             f"a cadence that saves them all, e.g. --variant '{args.profile_of}={how} "
                             "--train.save_every 6 --train.keep_last 30'")
        cache, steps = run.with_name(run.name + ".profile.json"), [0, *args.profile_steps, r["steps"]]
        key = {"steps": steps, "examples": args.profile_examples} if args.task == "finetune" else \
            {"steps": args.profile_steps, "gates": r["ticket_step"]}
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if cached.get("key") == key:
            rows = cached["rows"]
        elif args.task == "finetune":
            rows = width_profile(run, data["train"], args.max_len, args.batch, steps, args.profile_examples, r["seed"])
        else:
            rows = gate_profile(run, args.profile_steps)
        atomic_write_text(cache, json.dumps({"key": key, "rows": rows}) + "\n")
        out[str(r["seed"])] = rows
    return out


def summarise_tickets(runs: list[dict], key: str, higher_is_better: bool) -> dict[str, Any]:
    """Per method: the metric's mean and 95% interval over seeds, CPU time relative to the full model of the same
    seed, ticket steps and reasons, FLOP ratio, the search share s and the time-saved bound 1 - (s + (1 - s) r)
    (a probe: s its CPU seconds over the full run's, spent on top of the whole budget, and the bound 1 - (s + r)).
    Per method with a ticket: the paired (same-seed) differences against the full model, the random ticket at
    step 0 and its own same-step random control (an oracle: its same-widths random ticket; ``gain`` is the
    difference signed so that > 0 is better), and where both sides have it the paired difference in training loss:
    a worse fit, or a worse generalisation?"""
    by: dict[str, dict[int, dict]] = {}
    for r in runs:
        by.setdefault(r["method"], {})[r["seed"]] = r
    sign = 1.0 if higher_is_better else -1.0
    out: dict[str, Any] = {"metric": key, "higher_is_better": higher_is_better, "methods": {}, "paired": {}}
    for m, seeds in by.items():
        rs = list(seeds.values())
        s: dict[str, Any] = {"metric": interval([r["metric"] for r in rs]), "values": [r["metric"] for r in rs],
                             "seeds": list(seeds), "flop_ratio": float(np.mean([r["flop_ratio"] for r in rs])),
                             "cpu_s": interval([r["process_cpu_s"] for r in rs]),
                             "wall_s": interval([r["process_s"] for r in rs]),
                             "ticket_steps": [r["ticket_step"] for r in rs],
                             "reasons": [r["ticket_reason"] for r in rs]}
        full = by.get("full", {})
        if full and m != "full":
            common = [sd for sd in seeds if sd in full]
            s["cpu_vs_full"] = interval([seeds[sd]["process_cpu_s"] / full[sd]["process_cpu_s"] for sd in common])
        elif m == "full":
            s["cpu_vs_full"] = {"mean": 1.0, "ci95": 0.0, "n": len(rs)}
        if "probe" in (rs[0].get("stages") or {}):  # the probe comes on top of the whole budget: s + r
            common = [sd for sd in seeds if sd in full]
            shares = [seeds[sd]["stages"]["probe"]["cpu_s"] / full[sd]["process_cpu_s"] for sd in common]
            if shares:
                s["search_share"] = float(np.mean(shares))
                s["time_saved_bound"] = float(np.mean([1 - (sh + seeds[sd]["flop_ratio"])
                                                       for sh, sd in zip(shares, common)]))
        elif rs[0]["ticket_step"] is not None:
            shares = [r["ticket_step"] / r["steps"] for r in rs]
            s["search_share"] = float(np.mean(shares))
            s["time_saved_bound"] = float(np.mean([1 - (sh + (1 - sh) * r["flop_ratio"]) for sh, r in zip(shares, rs)]))
        if rs[0].get("heads"):
            s.update(_heads(seeds, by.get("oracle@train", {})))
        out["methods"][m] = s
    for m, seeds in by.items():
        if m in CONTROLS or m.startswith("random@"):
            continue
        pairs = {}
        # the worth of the units beyond their widths: an oracle's, another run's widths', a method's own
        widths = ["widths@train"] if m == "widths@next" else ["oracle@train"] if m == "oracle@next" else \
            [f"widths@{m.removeprefix('oracle@')}"] if m.startswith("oracle@") else [f"{WIDTHS}{m}"]
        for ref in ("full", "random@0", f"random@{m}", *widths):
            common = [sd for sd in seeds if sd in by.get(ref, {})]
            if common:
                diffs = [seeds[sd]["metric"] - by[ref][sd]["metric"] for sd in common]
                pairs[ref] = {**interval(diffs), "gain": interval([sign * d for d in diffs]), "diffs": diffs}
                fits = [(seeds[sd].get("train_loss"), by[ref][sd].get("train_loss")) for sd in common]
                if all(a is not None and b is not None for a, b in fits):
                    pairs[ref]["train_loss"] = interval([a - b for a, b in fits])
        out["paired"][m] = pairs
    return out


def _heads(seeds: dict[int, dict], oracle: dict[int, dict]) -> dict[str, Any]:
    """Which heads a method's tickets keep: per layer and head, the share of seeds that keep it; and per layer, the
    share of the heads the oracle ticket of the same seed keeps that it keeps too (chance: the kept fraction)."""
    rs = [r for r in seeds.values() if r.get("heads")]
    n = max(max(h) for r in rs for h in r["heads"]) + 1
    out: dict[str, Any] = {"head_keep_rate": np.mean([[np.isin(np.arange(n), h) for h in r["heads"]] for r in rs],
                                                     axis=0).round(3).tolist()}
    common = [sd for sd, r in seeds.items() if r.get("heads") and (oracle.get(sd) or {}).get("heads")]
    if common:
        out["heads_kept_of_oracle"] = np.mean([[len(set(a) & set(b)) / len(b) for a, b in
                                                zip(seeds[sd]["heads"], oracle[sd]["heads"])] for sd in common],
                                              axis=0).round(3).tolist()
    return out


def _print_tickets(result: dict) -> None:
    s, key = result["summary"], result["summary"]["metric"]
    print(f"\nbench tickets ({result['task']}): {key} over seeds, mean ± 95% t-interval; CPU time paired by seed")
    print(f"{'method':<18}{'n':>3}{key:>20}{'CPU vs full':>18}{'FLOP ratio':>11}{'bound':>7}  ticket steps (reason)")
    for m, v in s["methods"].items():
        cpu = f"{v['cpu_vs_full']['mean']:.3f} ± {v['cpu_vs_full']['ci95']:.3f}" if "cpu_vs_full" in v else "-"
        steps = ", ".join(f"{st}" for st in v["ticket_steps"]) if v["ticket_steps"][0] is not None else "-"
        reasons = ",".join(sorted(set(filter(None, v["reasons"])))) or "-"
        bound = f"{v['time_saved_bound']:.2f}" if "time_saved_bound" in v else "-"
        print(f"{m:<18}{v['metric']['n']:>3}{v['metric']['mean']:>12.4f} ± {v['metric']['ci95']:.4f}"
              f"{cpu:>18}"
              f"{v['flop_ratio']:>11.3f}{bound:>7}  {steps} ({reasons})")
    if variants := result.get("probe_variants"):
        print(f"\nthe probe's tickets without training (mean of {len(variants)} seeds): FFN neurons kept per layer, "
              "share of the oracle@train ticket's FFN neurons / heads kept")
        for i, row in enumerate(next(iter(variants.values()))):
            rows = [v[i] for v in variants.values()]
            widths = np.mean([r["ffn_widths"] for r in rows], axis=0).round().astype(int).tolist()
            shares = " / ".join(f"{np.mean([r[k] for r in rows]):.2f}" for k in ("ffn_kept_of_oracle",
                                                                               "heads_kept_of_oracle") if k in row)
            print(f"{row['head']:>7} head {row['score']:>6} {'normalised' if row['normalise'] else 'raw':>10}  "
                  f"{widths}  {shares}")
    if profiles := result.get("profiles"):
        what = "Taylor width profile of the full runs" if result["task"] == "finetune" else \
            f"gate profile of the {result['args'].get('profile_of')} searches"
        print(f"\n{what} (mean of {len(profiles)} seeds): FFN neurons kept per layer, share of the final ticket's "
              "FFN neurons / heads kept")
        for i, row in enumerate(next(iter(profiles.values()))):
            rows = [p[i] for p in profiles.values()]
            widths = np.mean([r["ffn_widths"] for r in rows], axis=0).round().astype(int).tolist()
            print(f"step {row['step']:>4}  {widths}  {np.mean([r['ffn_kept_of_final'] for r in rows]):.2f} / "
                  f"{np.mean([r['heads_kept_of_final'] for r in rows]):.2f}")
    print(f"\npaired differences in {key} (method − reference, same seed), mean ± 95% t-interval")
    for m, refs in s["paired"].items():
        print(f"{m:<18}" + "   ".join(f"vs {ref}: {d['mean']:+.4f} ± {d['ci95']:.4f} (n={d['n']})" + _fit(d)
                                      for ref, d in refs.items()))


def _fit(d: dict) -> str:
    t = d.get("train_loss")
    return f" [train loss {t['mean']:+.3f} ± {t['ci95']:.3f}]" if t else ""


def add_parser(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("tickets", help="ticket quality: K seeds x methods (full, EarlyBERT as published, random "
                                       "tickets at step 0 and at the method's own step, search variants)")
    k.add_argument("--task", choices=("finetune", "pretrain"), default="finetune")
    k.add_argument("--methods", default="full,paper,random@0,default",
                   help="comma-separated, of " + ", ".join(ticket_methods(1.0, 1)) + " and any --variant; "
                        "ticket@M: the ticket method M drew (same seed), trained from step 0")
    k.add_argument("--matched", default="paper,default",
                   help="methods that get a same-step random control (random@METHOD: the method's options, a random "
                        "ticket drawn at the step it drew its own)")
    k.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                   help="another method: a name and its earlybert-ds options, e.g. "
                        "'tc=--earlybert.score taylor --earlybert.weights continue' (repeatable)")
    k.add_argument("--seeds", type=int, default=5, help="seeds per method (--train.seed)")
    k.add_argument("--first-seed", type=int, default=0)
    k.add_argument("--parallel", type=int, default=1, help="runs at a time (with --threads 1: one per core)")
    k.add_argument("--rewarmup", type=int, default=10, help="re-warm-up steps of the 'rewarmup' lever")
    k.add_argument("--corpus", help=f"the Python docs' _sources directory (default: {PYTHON_DOCS})")
    k.add_argument("--batch", type=int, help="sequences per step (default: 32 fine-tuning, 16 pre-training)")
    k.add_argument("--lr", type=float, help="peak learning rate (default: 5e-5 fine-tuning, 1e-3 pre-training)")
    k.add_argument("--evals", type=int, default=1, help="validations per run (the last one counts)")
    _task_arguments(k)
    k.add_argument("--profile-steps", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                   help="comma-separated steps at which to read each profiled run's checkpoint and draw the ticket "
                        "it would give (fine-tuning: Taylor scores of the full model as it trains, when the trained "
                        "model's widths per layer appear; pre-training: a long search's own scores, when its ticket "
                        "settles); the runs must save there (see --variant)")
    k.add_argument("--profile-of", default="full", metavar="METHOD",
                   help="the method whose runs are profiled: fine-tuning, full; pre-training, a search that draws "
                        "late (--earlybert.draw fixed) and saves a checkpoint at each profile step")
    k.add_argument("--profile-examples", type=int, default=640, help="training examples each profile step is "
                                                                      "scored on")
    k.add_argument("--probe-variants", action="store_true",
                   help="fine-tuning: also draw, without training, the tickets of the probe's settings (fresh or "
                        "probed head, Taylor or Fisher, raw or normalised per layer) for every seed, against the "
                        "oracle@train ticket where it was drawn")
    k.add_argument("--plot", default="", help="PNG of each method's metric against its CPU time (with intervals)")
    k.add_argument("--quick", action="store_true", help="tiny inputs, 2 seeds (smoke test)")
    k.add_argument("--out-dir", default="runs/bench-tickets", help="the runs' output directories (and data)")
    k.add_argument("--overwrite", action="store_true",
                   help="rerun runs already in --out-dir (default: a run made before with the same command is reused)")
    k.add_argument("--summarise-only", action="store_true",
                   help="run nothing: summarise the runs of these methods and seeds already in --out-dir")
    k.add_argument("--threads", type=int, help="CPU threads per run (default: torch's choice)")
    k.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="every run's train.precision (default: the runs' auto: bf16 on CUDA and on CPUs with bf16 "
                        "units, else fp32)")
    k.add_argument("--out", help="write the raw numbers as JSON here")
    k.set_defaults(func=tickets, report=_print_tickets)


def _task_arguments(k: argparse.ArgumentParser) -> None:
    """The options of one task only (the finetune and pretrain suites' own, other defaults)."""
    k.add_argument("--model", help="fine-tuning: pretrained BERT directory (default: MiniLM)")
    k.add_argument("--finetune-task", choices=list(TASKS), default="sections",
                   help="fine-tuning: the labelled task made from the Python docs: sections (which section a "
                        "paragraph comes from, 7 classes) or word-order (a sentence as written or with two adjacent "
                        "words swapped, 2 classes)")
    k.add_argument("--train-per-class", type=int, default=300, help="fine-tuning: training examples per class")
    k.add_argument("--dev-per-class", type=int, default=160,
                   help="fine-tuning: dev examples per class (sections, 160: ~1,100 dev paragraphs, standard error "
                        "of one accuracy <= 1.5 points)")
    k.add_argument("--max-len", type=int, default=64, help="fine-tuning: tokens per paragraph")
    k.add_argument("--epochs", type=float, default=2.0, help="fine-tuning: epochs")
    k.add_argument("--search-epochs", type=float, default=0.2, help="fine-tuning: EarlyBERT's search budget")
    k.add_argument("--seed", type=int, default=0, help="fine-tuning: seed of the data split")
    k.add_argument("--model-size", choices=list(SHAPES), default="small", help="pre-training: the model")
    k.add_argument("--steps", type=int, default=400, help="pre-training: steps of every run (search included)")
    k.add_argument("--eval-batches", type=int, default=10, help="pre-training: micro-batches per validation")
    k.add_argument("--cache-dir", help="pre-training: tokenised-corpus cache (default: ~/.cache/earlybert_ds)")
