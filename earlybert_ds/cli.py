"""The ``earlybert-ds`` command (also ``python -m earlybert_ds``): a sub-command per run in :data:`RUN_COMMANDS`, each
with the run-config options of its own fields, and ``bench``.

Runs as one process, or one process per rank under the ``deepspeed`` launcher, e.g.
``deepspeed --num_gpus 2 --module earlybert_ds pretrain --output-dir runs/x``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from .config import (ConfigError, RunConfig, add_config_arguments, config_from_args, flatten_config, hf_names,
                     load_config_file, unknown_options)

TICKET_HELP = """\
Draws a ticket without training: a ticket.json that --earlybert.draw given trains from step 0 in any later run of
the same model and task (another seed, another learning rate). From a finished full fine-tuning run (--run: its
trained head scores every unit on the task's training data), or from a pre-trained model by the probe (the head
alone trained on the frozen encoder, then every unit scored through it: the --earlybert.probe_* options)."""

RUN_HELP = """\
Runs the three EarlyBERT stages: a search with slimming gates, an early-bird ticket, and efficient training of
the model physically shrunk to that ticket; every stage checkpoints and resumes. Options come from the command's
defaults, then --config (a file, or a shipped recipe), then the command line; every problem with them is reported
at once, before anything is written."""


def _pretrain(cfg: RunConfig, resume: bool, resume_from: str | None, overrides: set[str]) -> None:
    from .pretrain import pretrain

    pretrain(cfg, resume, resume_from, overrides)


def _finetune(cfg: RunConfig, resume: bool, resume_from: str | None, overrides: set[str]) -> None:
    from .finetune import finetune

    finetune(cfg, resume, resume_from, overrides)


#: The commands that run EarlyBERT: name -> (one-line help, what it runs with the run config and the resume options).
RUN_COMMANDS: dict[str, tuple[str, Callable]] = {
    "pretrain": ("EarlyBERT pre-training (masked LM): search -> ticket -> shrink -> efficient training", _pretrain),
    "finetune": ("EarlyBERT fine-tuning on a GLUE-style or SQuAD-style task from a pre-trained model", _finetune),
}


def _ticket_parser(sub: argparse._SubParsersAction, parser: argparse.ArgumentParser) -> None:
    """``earlybert-ds ticket``: a fine-tuning run's options, a ticket drawn instead of a run."""
    t = sub.add_parser("ticket", help=TICKET_HELP.split(".")[0], description=TICKET_HELP, allow_abbrev=False,
                       usage="earlybert-ds ticket --out FILE (--run DIR | --model DIR --task TASK ...) [OPTION VALUE]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--out", required=True, metavar="FILE", help="the ticket.json to write")
    t.add_argument("--run", metavar="DIR", help="a finished fine-tuning run of the full model (--earlybert.enabled "
                                                "false): its final model scores the units, its run_config.json gives "
                                                "the task and data; unset: the probe of --model on --task")
    add_config_arguments(t, "finetune")
    parser.commands["ticket"] = t


def _ticket_base(run: str | None) -> tuple[dict, str]:
    """The ticket command's fields before its options: the probe route's, and a finished run's own (task, data,
    model, batch) without its EarlyBERT section, whose ratios and scores are the command's."""
    from .checkpoint import RUN_CONFIG

    base = {"earlybert.draw": "probe"}
    if run is None:
        return base, "defaults"
    path = Path(run) / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"--run {run}: no run_config.json there (a finished earlybert-ds finetune run)")
    saved = flatten_config(load_config_file(path), str(path))
    return {**{k: v for k, v in saved.items() if not k.startswith("earlybert.") and k != "output_dir"}, **base}, \
        str(path)


def _resume_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resuming")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its latest checkpoint or its ticket, with its saved "
                        "run_config.json (options that differ from it are refused); a directory without a run "
                        "starts a new one, with a warning")
    g.add_argument("--resume-override", metavar="FIELD[,FIELD]", action="append", default=[],
                   help="with --resume: accept these options' new values (train.steps before the run has ended, "
                        "the log.*, checkpoint and data-preparation fields)")
    g.add_argument("--resume-from", metavar="DIR",
                   help="start from this checkpoint directory, or from a ticket directory (OUTPUT/ticket) on any "
                        "number of ranks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earlybert-ds", description="EarlyBERT on DeepSpeed.")
    # the deepspeed launcher puts --local_rank=N before the sub-command; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = {}  # name -> its parser
    for name, (summary, _) in RUN_COMMANDS.items():
        hf = ", ".join(f"--{a}" for a in hf_names(name))
        p = sub.add_parser(name, help=summary, description=f"{summary}.\n\n{RUN_HELP}", allow_abbrev=False,
                           usage=f"earlybert-ds {name} [--config FILE|RECIPE] [--resume] [OPTION VALUE ...]",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=textwrap.fill(f"Hugging Face Trainer names are accepted where they mean the same "
                                                f"({hf}, --bf16, --fp16, --gradient_checkpointing); each is listed "
                                                "beside its option.", 116))
        _resume_arguments(p)
        add_config_arguments(p, name)
        parser.commands[name] = p
    sub.add_parser("bench", help="benchmarks: earlybert-ds bench --help", add_help=False)
    _ticket_parser(sub, parser)
    return parser


def _logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "datasets", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()


def _overrides(args: argparse.Namespace) -> set[str]:
    names = {n.strip() for item in args.resume_override for n in item.split(",") if n.strip()}
    if names and not args.resume:
        raise ConfigError("--resume-override needs --resume")
    return names


def parse(argv: list[str]) -> tuple[argparse.Namespace, RunConfig]:
    """A run command's arguments and its run config; every problem with them at once, as one ConfigError (argparse
    itself exits on a malformed command line, e.g. an option without its value)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    known = [o for o, a in parser.commands[args.command]._option_string_actions.items()
             if o.startswith("--") and a.help is not argparse.SUPPRESS]
    if args.command == "ticket":
        return args, config_from_args(args, "finetune", unknown_options(unknown, known), _ticket_base(args.run))
    return args, config_from_args(args, args.command, unknown_options(unknown, known))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    words = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if words[:1] == ["bench"]:  # the benchmarks have their own parser and --help
        from .bench.__main__ import main as bench

        return bench(words[1:])
    _logging()
    try:
        args, cfg = parse(argv)
        if args.command == "ticket":
            from .finetune import draw_ticket

            draw_ticket(cfg, args.out, args.run)
        else:
            RUN_COMMANDS[args.command][1](cfg, args.resume, args.resume_from, _overrides(args))
        from .distributed import shutdown

        shutdown()
    except (ValueError, OSError, ArithmeticError) as e:  # bad input, a file system's refusal, a diverged run
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"earlybert-ds: error: {rank}{e}", file=sys.stderr)  # once, whatever the logging set-up
        return 2
    return 0


def entry() -> None:
    """Console-script entry: exit without running C++ static destructors, which make about one gloo job in ten
    (DeepSpeed 0.19, torch 2.13) end with 'terminate called without an active exception' after all work is done.
    Everything is written and closed by then."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
