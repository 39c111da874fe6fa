"""The ``earlybert-ds`` command (also ``python -m earlybert_ds``).

Runs as one process, or one process per rank under the ``deepspeed`` launcher, e.g.
``deepspeed --num_gpus 2 --module earlybert_ds pretrain --output-dir runs/x``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import COMMAND_DEFAULTS, add_config_arguments, config_from_args


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its latest checkpoint (or its ticket)")
    p.add_argument("--resume-from", metavar="DIR",
                   help="start from this checkpoint directory, or from a ticket directory (OUTPUT/ticket) on any "
                        "number of ranks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earlybert-ds", description="EarlyBERT on DeepSpeed.")
    # the deepspeed launcher puts --local_rank=N before the sub-command; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("pretrain", help="EarlyBERT pre-training: search -> ticket -> shrink -> efficient training",
                       description=__doc__, formatter_class=fmt)
    p.add_argument("--corpus", help="shortcut for --data.corpus")
    _common(p)
    add_config_arguments(p, skip=("finetune",), defaults=COMMAND_DEFAULTS["pretrain"])
    f = sub.add_parser("finetune", help="EarlyBERT fine-tuning on a GLUE-style or SQuAD-style task",
                       description=__doc__, formatter_class=fmt)
    f.add_argument("--task", help="shortcut for --finetune.task")
    f.add_argument("--model", help="shortcut for --model.init_from: the pre-trained model directory")
    f.add_argument("--data", help="shortcut for --finetune.data")
    _common(f)
    add_config_arguments(f, defaults=COMMAND_DEFAULTS["finetune"])
    t = sub.add_parser("ticket", help="draw a ticket.json (for --earlybert.draw given) without training: from a "
                                      "finished full fine-tuning run, or from a pre-trained model and a task by the "
                                      "probe", description=__doc__, formatter_class=fmt)
    t.add_argument("--out", required=True, metavar="FILE", help="the ticket.json to write")
    t.add_argument("--run", metavar="DIR", help="a finished fine-tuning run of the full model (--earlybert.enabled "
                                                "false): its final model and its run_config.json's task and data; "
                                                "unset: probe --model on --task")
    t.add_argument("--task", help="shortcut for --finetune.task")
    t.add_argument("--model", help="shortcut for --model.init_from: the pre-trained model directory")
    t.add_argument("--data", help="shortcut for --finetune.data")
    add_config_arguments(t, defaults=COMMAND_DEFAULTS["finetune"])
    b = sub.add_parser("bench", help="benchmarks (see python -m earlybert_ds.bench --help)", add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "datasets", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logging()
    if args.command == "bench":
        from .bench.__main__ import main as bench

        return bench(args.args)
    try:
        if args.command == "pretrain":
            from .pretrain import pretrain

            cfg = config_from_args(args, defaults=COMMAND_DEFAULTS["pretrain"], extra={"data.corpus": args.corpus})
            pretrain(cfg, args.resume, args.resume_from)
        elif args.command == "ticket":
            from .finetune import draw_ticket

            if args.run and not args.config:  # a finished run's own config is the base its options override
                args.config = os.path.join(args.run, "run_config.json")
            cfg = config_from_args(args, defaults=COMMAND_DEFAULTS["finetune"], extra={
                "finetune.task": args.task, "model.init_from": args.model, "finetune.data": args.data})
            draw_ticket(cfg, args.out, args.run)
        else:
            from .finetune import finetune

            cfg = config_from_args(args, defaults=COMMAND_DEFAULTS["finetune"], extra={
                "finetune.task": args.task, "model.init_from": args.model, "finetune.data": args.data})
            finetune(cfg, args.resume, args.resume_from)
        from .distributed import shutdown

        shutdown()
    except (ValueError, OSError, ArithmeticError) as e:  # bad input, a file system's refusal, a diverged run
        logging.getLogger("earlybert_ds").error("%s", e)
        print(f"earlybert-ds: error: {e}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    """Console-script entry: exit without running C++ static destructors, which make about one gloo job in ten
    end with 'terminate called without an active exception' after all work is done (../shared/NOTES.md).
    Everything is written and closed by then."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
