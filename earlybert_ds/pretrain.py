"""EarlyBERT pre-training: the masked-LM task plugged into the three-stage pipeline.

The data are packed sequences of a corpus (the built-in one by default), masked deterministically per sample;
validation reports the held-out MLM loss, perplexity and accuracy on a fixed, fixed-masked set.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist
from .config import RunConfig
from .data import (
    MLMMasker,
    ShardedBatches,
    collate,
    load_packed,
    prepare_corpus,
    tokenizer_digest,
    tokenizer_for,
    val_batches,
)
from .engine import Engine
from .flops import train_flops_per_token
from .modeling import EarlyBertConfig, EarlyBertForMaskedLM
from .pipeline import run_earlybert
from .trainer import ShardedTask, step_metrics

logger = logging.getLogger("earlybert_ds")


class MLMTask(ShardedTask):
    """Masked-LM pre-training on a packed corpus (prepared once per node and cached)."""

    model_class = EarlyBertForMaskedLM
    model_overrides: dict = {}

    def __init__(self, cfg: RunConfig):
        d, t = cfg.data, cfg.train
        self.seed, self.seq_len, self.mlm_probability = t.seed, d.seq_len, d.mlm_probability
        self.tokenizer = dist.node_once(tokenizer_for, d)
        self.packed = load_packed(dist.node_once(prepare_corpus, d, self.tokenizer, t.seed))
        prepared = (tokenizer_digest(self.tokenizer), self.packed.train.shape, self.packed.val.shape)
        differ = [r for r, other in enumerate(dist.all_gather_object(prepared)) if other != prepared]
        if differ:  # each node prepares its own copy: different corpora or versions would mix token ids
            raise ValueError(f"rank(s) {differ} prepared other data than this rank (tokenizer, corpus or "
                             "library versions differ between nodes)")
        self.masker = MLMMasker.from_tokenizer(self.tokenizer, d.mlm_probability, d.whole_word_mask)
        world, rank = dist.world_size(), dist.rank()
        self.batches = ShardedBatches(len(self.packed.train), t.micro_batch_size, t.grad_accum, world, rank, t.seed)
        self.val = val_batches(self.packed.val, t.micro_batch_size, t.eval_batches, world, rank, self.masker)
        if rank == 0:
            logger.info("corpus: %d training and %d validation sequences of %d tokens; vocabulary %d",
                        len(self.packed.train), len(self.packed.val), d.seq_len, len(self.tokenizer))

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        return [collate(self.packed.train, idx, self.masker, self.seed, epochs)
                for idx, epochs in self.batches.next_step_epochs()]

    def step_metrics(self, outputs: list[Any], device: torch.device) -> dict[str, float]:
        hits = (sum(float(o.mlm_correct) for o in outputs), sum(float(o.mlm_count) for o in outputs))
        return step_metrics(outputs, device, [float(o.mlm_loss) for o in outputs], hits)

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Held-out MLM loss (token-weighted over ranks), perplexity and accuracy."""
        loss_sum = correct = count = 0.0
        for out in engine.infer(self.val):
            n = float(out.mlm_count)
            loss_sum += float(out.mlm_loss) * n
            correct += float(out.mlm_correct)
            count += n
        loss_sum, correct, count = dist.all_reduce_sum([loss_sum, correct, count], engine.device)
        loss = loss_sum / max(count, 1.0)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": correct / max(count, 1.0)}

    def flops_per_token(self, config: EarlyBertConfig) -> float:
        return train_flops_per_token(config, self.seq_len, self.mlm_probability)

    def finish(self, engine: Engine, out: Path) -> None:
        """Nothing beyond the exported model."""


def pretrain(cfg: RunConfig, resume: bool = False, resume_from: str | None = None) -> dict:
    """EarlyBERT pre-training (or the full-model baseline with ``earlybert.enabled = false``)."""
    return run_earlybert(cfg, MLMTask, resume, resume_from)
