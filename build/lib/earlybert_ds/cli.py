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
