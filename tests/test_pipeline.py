"""The whole EarlyBERT pipeline in real 2-rank `deepspeed` launches on a tiny BERT (CPU, gloo).

Search -> early-bird ticket on the coordinator -> broadcast -> restart on the physically smaller model ->
efficient training; checkpoints, resume from the ticket on another world size, wandb files (exact resume
after crashes: test_faults.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

from wandb_offline import read_history, read_summary

from conftest import MACHINE_PRECISION, ZERO2, launch, losses, run_single, tiny_run_args

pytestmark = pytest.mark.slow

STEPS, MAX_SEARCH = 30, 20


def _ok(proc) -> None:
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def _expected_params(cfg: dict) -> int:
    """Parameters of a ticket-shaped pre-training BERT, counted by hand from its shape."""
    h, v, p, t, d = (cfg[k] for k in ("hidden_size", "vocab_size", "max_position_embeddings", "type_vocab_size",
                                      "num_attention_heads"))
    head = h // d
    n = (v + p + t) * h + 2 * h  # embeddings + LayerNorm
    for heads, ffn in zip(cfg["heads_per_layer"], cfg["intermediate_sizes"]):
        inner = heads * head
        n += 3 * inner * h + 3 * inner + inner * h + h + 2 * h  # q/k/v, output projection, LayerNorm
        n += h * ffn + ffn + ffn * h + h + 2 * h  # FFN, LayerNorm
    return n + h * h + h + 2 * h + v  # MLM transform + LayerNorm + decoder bias (decoder tied to embeddings)


def _check_pipeline(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    ticket = json.loads((out / "ticket" / "ticket.json").read_text())
    # the early-bird ticket emerged before the search limit
    assert ticket["reason"] == "converged" and ticket["step"] < MAX_SEARCH
    assert summary["ticket"]["step"] == ticket["step"] and summary["steps"] == STEPS
    assert ticket["heads_per_layer"] == [3, 3]  # 1/3 of 4 heads pruned per layer (rounded: 1)
    assert sum(ticket["intermediate_sizes"]) == round(0.6 * 2 * 64)  # 40% of all FFN neurons pruned, globally
    # every rank switched with the same ticket: each rank's own record in the efficient-stage checkpoint
    latest = (out / "checkpoints" / "latest").read_text()
    digests = {torch.load(out / "checkpoints" / latest / f"rank{r}.pt", weights_only=True)["ticket"] for r in (0, 1)}
    from earlybert_ds.ticket import Ticket

    assert digests == {Ticket.load(out / "ticket").digest()}
    # the model really is smaller: the final export has the ticket's shape and the hand-counted parameters
    final = AutoModelForMaskedLM.from_pretrained(out / "final")
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["heads_per_layer"] == ticket["heads_per_layer"] and not cfg["use_gates"]
    assert final.num_parameters() == _expected_params(cfg) == summary["params_final"] < summary["params_full"]
    assert final.bert.encoder.layer[0].attention.qkv.weight.shape == (3 * 3 * 8, 32)
    # training went on after the switch, every step logged, the loss finite and falling
    loss = losses(out)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert all(map(torch.isfinite, map(torch.tensor, loss.values())))
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - 0.2, (first, last)  # ln(600) = 6.4 at the start
    assert summary["final_val_loss"] < loss[1]
    assert summary["flop_ratio"] < 0.9
    # speed against the FLOP limit and against the machine's measured peak (MFU)
    assert summary["speedup_flop_limit"] == pytest.approx(1 / summary["flop_ratio"])
    eff, search = summary["stages"]["efficient"], summary["stages"]["search"]
    assert summary["speedup_efficient_vs_search"] == pytest.approx(eff["tokens_per_s"] / search["tokens_per_s"])
    for s in (eff, search):
        assert 0 < s["mfu"] < 1 and s["mfu"] == pytest.approx(s["tokens_per_s"] * s["train_flops_per_token"]
                                                              / summary["peak_flops"])
    return summary


def test_zero2_pipeline_two_ranks(zero2_run):
    summary = _check_pipeline(zero2_run)
    ckpt = zero2_run / "checkpoints" / (zero2_run / "checkpoints" / "latest").read_text()
    assert ckpt.name == f"global_step{STEPS}"
    assert {p.name for p in ckpt.glob("*optim_states.pt")} == {
        f"{'bf16_' if MACHINE_PRECISION == 'bf16' else ''}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        for r in (0, 1)}  # each rank its own ZeRO shard
    assert len(list((zero2_run / "checkpoints").glob("global_step*"))) == 2  # keep_last
    # the ticket checkpoint: loadable model of the ticket's shape, tokenizer, position
    state = json.loads((zero2_run / "ticket" / "state.json").read_text())
    assert state["step"] == summary["ticket"]["step"] and state["data"]["consumed"] == state["step"] * 8
    assert (zero2_run / "ticket" / "tokenizer.json").is_file()
    assert (zero2_run / "plots" / "mask_distance.png").stat().st_size > 10_000
    # wandb's offline run holds the same numbers as metrics.jsonl
    history = read_history(summary["paths"]["wandb"])
    logged = {row["_step"]: row["loss"] for row in history if "loss" in row}
    assert logged == losses(zero2_run)
    assert any("mask_distance/ffn" in row for row in history)
    assert [row["_step"] for row in history if row.get("ticket/reason") == "converged"] == [summary["ticket"]["step"]]
    assert read_summary(summary["paths"]["wandb"])["ticket/step"] == summary["ticket"]["step"]


def test_zero3_bf16_pipeline_two_ranks(corpus, tmp_path):
    out = tmp_path / "run"
    _ok(launch(tiny_run_args(*corpus, out, **{"train.zero_stage": 3, "train.precision": "bf16"})))
    _check_pipeline(out)


def test_resume_from_ticket_on_one_rank(corpus, tmp_path, zero2_run):
    out = tmp_path / "one"
    ticket_step = json.loads((zero2_run / "ticket" / "ticket.json").read_text())["step"]
    _ok(run_single(tiny_run_args(*corpus, out, **ZERO2) + ["--resume-from", str(zero2_run / "ticket")]))
    loss = losses(out)
    assert min(loss) == ticket_step + 1 and max(loss) == STEPS
    assert all(map(lambda x: x == x and abs(x) < 100, loss.values()))
    assert (out / "ticket" / "ticket.json").read_text() == (zero2_run / "ticket" / "ticket.json").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ticket"]["step"] == ticket_step and summary["stages"]["efficient"]["steps"] == STEPS - ticket_step
