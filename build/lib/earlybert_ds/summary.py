"""What a run reports at its end: ``OUTPUT/summary.json`` (steps, the ticket, parameters and FLOPs of the full and
the final model, each stage's time, throughput and MFU, the realized speedup against the FLOP limit, the final
metrics and the mask distances of the search) and the table a person reads at the end of a job.
"""

from __future__ import annotations

import json
import logging

from . import checkpoint
from .atomic import atomic_write_text
from .flops import count_parameters
from .modeling import EarlyBertConfig
from .ticket import Ticket
from .trainer import Run

logger = logging.getLogger("earlybert_ds")


def run_summary(run: Run, ticket: Ticket | None, full_config: EarlyBertConfig, final_config: EarlyBertConfig,
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
        "paths": {"ticket": str(run.out / checkpoint.TICKET_DIR) if ticket else None, "final_model": str(run.out / checkpoint.FINAL_DIR),
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


def write_summary(run: Run, summary: dict) -> None:
    """``OUTPUT/summary.json`` (rank 0), the summary's numbers to the monitor, and the closing table to the log."""
    atomic_write_text(run.out / checkpoint.SUMMARY, json.dumps(summary, indent=1) + "\n")
    run.monitor.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    logger.info("done: ticket %s, summary %s, final model %s\n%s", summary["paths"]["ticket"], run.out / checkpoint.SUMMARY,
                summary["paths"]["final_model"], stage_table(summary))
