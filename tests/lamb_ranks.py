"""LAMB through the project's Engine at a given ZeRO stage: a few steps of a tiny gated BERT on fixed per-rank
batches, returning every parameter in full. Imported by the tests (one rank) and run as a script by a real
2-rank ``deepspeed`` launch (``python -m tests.lamb_ranks OUT``), where parameters straddle the ranks' partitions."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from earlybert_ds import distributed as dist
from earlybert_ds.config import RunConfig
from earlybert_ds.engine import Engine
from earlybert_ds.modeling import EarlyBertConfig, EarlyBertForPreTraining

STEPS = 4


def lamb_run(stage: int, layerwise: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """The full fp32 weights after ``STEPS`` LAMB steps under ZeRO ``stage``, and how many flat partitions LAMB was
    told about. ``layerwise=False`` drops the partition layout: the trust ratio is then per flat group partition,
    as DeepSpeed's FusedLamb computes it under ZeRO."""
    run = RunConfig()
    t = run.train
    t.optimizer, t.zero_stage, t.precision, t.micro_batch_size = "lamb", stage, "fp32", 4
    t.lr, t.warmup_steps, t.steps, t.schedule, t.weight_decay = 2e-2, 0, STEPS, "constant", 0.01
    torch.manual_seed(0)
    config = EarlyBertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, use_gates=True, gate_l1_heads=1e-2,
                             gate_l1_ffn=1e-2)
    engine = Engine(EarlyBertForPreTraining(config), run)
    try:
        lamb = engine.engine.basic_optimizer
        if not layerwise:
            lamb.partitions = {}
        g = torch.Generator().manual_seed(100 + dist.rank())
        for step in range(STEPS):
            ids = torch.randint(5, 120, (4, 16), generator=g)
            labels = torch.where(torch.rand(4, 16, generator=g) < 0.3, ids, -100)
            engine.train_step([{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                "token_type_ids": torch.zeros_like(ids), "labels": labels}], step)
        return engine.full_state_dict(), len(lamb.partitions)
    finally:
        engine.destroy()


def main(out: Path) -> None:
    dist.init()
    for stage, layerwise in ((0, True), (1, True), (2, True), (3, True), (2, False)):
        weights, partitions = lamb_run(stage, layerwise)
        if dist.rank() == 0:
            torch.save({"weights": weights, "partitions": partitions},
                       out / f"stage{stage}{'' if layerwise else '-per-group'}.pt")
    dist.shutdown()


if __name__ == "__main__":
    main(Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))))  # the launcher adds --local_rank
