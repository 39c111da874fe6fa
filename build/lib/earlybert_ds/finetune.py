"""EarlyBERT fine-tuning: GLUE-style classification/regression and SQuAD-style extractive QA plugged into the same
three stages as pre-training (search with gates and L1 on the downstream loss -> ticket -> shrink -> efficient
fine-tuning). ``rewind`` (the official code's default) restarts the kept weights from the pre-trained ones.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .atomic import atomic_write_text
from .config import ConfigError, RunConfig
from .data import ShardedBatches, load_tokenizer
from .engine import Engine
from .flops import train_flops_per_token
from .modeling import EarlyBertConfig, EarlyBertForQuestionAnswering, EarlyBertForSequenceClassification
from .pipeline import run_earlybert
from .trainer import ShardedTask
from .squad import load_squad, postprocess, prepare_features, squad_metrics
from .tasks import (
    TaskSpec,
    compute_metrics,
    custom_task,
    encode,
    get_task,
    infer_label_list,
    load_task_split,
    write_predictions,
)

logger = logging.getLogger("earlybert_ds")

QA_TASKS = {"squad": ("train-v1.1.json", "dev-v1.1.json", False), "squad_v2": ("train-v2.0.json", "dev-v2.0.json", True)}
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _sharded_outputs(engine: Engine, n: int, batch_of, micro: int, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Run the model over items ``0..n-1`` split across ranks (every rank the same number of batches, as ZeRO-3
    needs) and gather the outputs ``keys`` of all items, in order, on every rank."""
    per_rank = math.ceil(n / dist.world_size())
    mine = np.arange(dist.rank() * per_rank, (dist.rank() + 1) * per_rank)
    valid = mine[mine < n]
    padded = np.concatenate([valid, np.zeros(len(mine) - len(valid), dtype=np.int64)])  # pad with item 0
    chunks = [padded[i:i + micro] for i in range(0, len(padded), micro)]
    outs = {k: [] for k in keys}
    for out in engine.infer(batch_of(idx) for idx in chunks):
        for k in keys:
            outs[k].append(getattr(out, k).float().cpu().numpy())
    local = {k: np.concatenate(v)[: len(valid)] if v else np.zeros((0,)) for k, v in outs.items()}
    if dist.world_size() > 1:
        everyone = dist.all_gather_object(local)
        local = {k: np.concatenate([r[k] for r in everyone if len(r[k])]) for k in keys}
    return local


def _custom_spec(cfg: RunConfig) -> TaskSpec:
    """A custom task's spec; its class labels given (``finetune.label_list``) or read from the training file."""
    f = cfg.finetune
    if f.label_list is not None:
        labels = tuple(x.strip() for x in f.label_list.split(","))
    elif f.num_labels > 1 and f.train_file:
        labels = infer_label_list(f.train_file, f.label_column)
    else:
        labels = ()
    if f.num_labels == 1 or not labels or (f.label_list is None and all(x.isdigit() for x in labels)):
        return custom_task(f.num_labels, f.text_a, f.text_b, f.label_column)  # ids 0 .. num_labels-1 as written
    if "finetune.num_labels" in cfg.given and f.num_labels != len(labels):
        raise ConfigError(f"finetune.num_labels={f.num_labels}, but the labels are {list(labels)} "
                          f"({'finetune.label_list' if f.label_list is not None else f.train_file})")
    try:
        return custom_task(len(labels), f.text_a, f.text_b, f.label_column, labels)
    except ValueError as e:
        raise ConfigError(f"finetune.label_list={f.label_list!r}: {e}") from e


class ClassificationTask(ShardedTask):
    """A GLUE task or a user's CSV/JSON-lines task: sequence classification, or regression with one label."""

    model_class = EarlyBertForSequenceClassification

    def __init__(self, cfg: RunConfig):
        f, t = cfg.finetune, cfg.train
        self.cfg = cfg
        self.spec = _custom_spec(cfg) if f.task == "custom" else get_task(f.task)
        self.model_overrides = {"num_labels": self.spec.num_labels}
        if not self.spec.is_regression:  # the label names travel with the model, as run_glue's do
            self.model_overrides.update(id2label=dict(enumerate(self.spec.label_list)),
                                        label2id={name: i for i, name in enumerate(self.spec.label_list)})
        self.tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.init_from)
        self.max_len = f.max_len or 128
        train_src, dev_src = f.train_file or f.data, f.dev_file or f.data
        if not train_src or not dev_src:
            raise ConfigError(f"finetune.task={f.task} needs --finetune.data (or --finetune.train_file and "
                              "--finetune.dev_file)")
        self.train = encode(load_task_split(self.spec, train_src, "train"), self.tokenizer, self.max_len)
        splits = self.spec.dev_splits if not f.dev_file else ("dev",)
        self.dev = {s: encode(load_task_split(self.spec, dev_src, s), self.tokenizer, self.max_len) for s in splits}
        self.epoch_examples = len(self.train)
        self.batches = ShardedBatches(len(self.train), t.micro_batch_size, t.grad_accum, dist.world_size(),
                                      dist.rank(), t.seed)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        return [self.train.collate([self.train[i] for i in idx]) for idx in self.batches.next_step()]

    def _logits(self, engine: Engine, ds) -> np.ndarray:
        batch_of = lambda idx: {k: v for k, v in ds.collate([ds[int(i)] for i in idx]).items() if k != "labels"}
        return _sharded_outputs(engine, len(ds), batch_of, self.cfg.train.micro_batch_size, ("logits",))["logits"]

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """The benchmark's metrics on each dev split (MNLI: matched and mismatched), prefixed by the split."""
        out = {}
        for split, ds in self.dev.items():
            logits = self._logits(engine, ds)
            out.update({f"{split}_{k}": v for k, v in compute_metrics(self.spec, logits, ds.labels).items()})
        return out

    def flops_per_token(self, config: EarlyBertConfig) -> float:
        return train_flops_per_token(config, self.max_len, mlm_fraction=0.0)

    def finish(self, engine: Engine, out: Path) -> None:
        """Predictions on ``finetune.test_file`` in the GLUE submission format."""
        if not self.cfg.finetune.test_file:
            return
        test = encode(load_task_split(self.spec, self.cfg.finetune.test_file, "test"), self.tokenizer, self.max_len)
        logits = self._logits(engine, test)
        if dist.rank() == 0:
            write_predictions(out / "predictions" / f"{self.spec.name}.tsv", self.spec, logits)


class QATask(ShardedTask):
    """SQuAD v1.1 / v2.0 extractive question answering with windows over long contexts."""

    model_class = EarlyBertForQuestionAnswering
    model_overrides: dict = {}

    def __init__(self, cfg: RunConfig):
        f, t = cfg.finetune, cfg.train
        self.cfg = cfg
        train_name, dev_name, self.version_2 = QA_TASKS[f.task]
        if not (f.train_file or f.data) or not (f.dev_file or f.data):
            raise ConfigError(f"finetune.task={f.task} needs --finetune.data (a directory with {train_name} and "
                              f"{dev_name}) or --finetune.train_file and --finetune.dev_file")
        self.tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.init_from)
        self.max_len = f.max_len or 384
        train_examples = load_squad(f.train_file or Path(f.data) / train_name)
        self.train = prepare_features(train_examples, self.tokenizer, self.max_len, f.stride, training=True)
        self.dev_examples = load_squad(f.dev_file or Path(f.data) / dev_name)
        self.dev = prepare_features(self.dev_examples, self.tokenizer, self.max_len, f.stride, training=False)
        n = len(self.train["input_ids"])
        self.epoch_examples = n
        self.batches = ShardedBatches(n, t.micro_batch_size, t.grad_accum, dist.world_size(), dist.rank(), t.seed)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        keys = (*_INPUTS, "start_positions", "end_positions")
        return [{k: self.train[k][torch.from_numpy(idx)] for k in keys} for idx in self.batches.next_step()]

    def predictions(self, engine: Engine) -> dict[str, str]:
        batch_of = lambda idx: {k: self.dev[k][torch.from_numpy(idx)] for k in _INPUTS}
        logits = _sharded_outputs(engine, len(self.dev["input_ids"]), batch_of, self.cfg.train.micro_batch_size,
                                  ("start_logits", "end_logits"))
        return postprocess(self.dev_examples, self.dev, logits["start_logits"], logits["end_logits"],
                           version_2=self.version_2)

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """The official exact match and F1 (with HasAns/NoAns for v2.0)."""
        return {f"dev_{k}": v for k, v in squad_metrics(self.predictions(engine), self.dev_examples,
                                                        self.version_2).items() if k != "total"}

    def flops_per_token(self, config: EarlyBertConfig) -> float:
        return train_flops_per_token(config, self.max_len, mlm_fraction=0.0)

    def finish(self, engine: Engine, out: Path) -> None:
        """The dev predictions, as the official evaluation script reads them."""
        import json

        predictions = self.predictions(engine)
        if dist.rank() == 0:
            atomic_write_text(out / "predictions" / "dev_predictions.json", json.dumps(predictions, indent=1))


def finetune(cfg: RunConfig, resume: bool = False, resume_from: str | None = None) -> dict:
    """EarlyBERT fine-tuning of ``model.init_from`` on ``finetune.task``."""
    if not cfg.model.init_from:
        raise ConfigError("fine-tuning needs a pre-trained model: --model PATH (a Hugging Face BERT directory or an "
                          "earlybert-ds output such as OUTPUT/final)")
    if not cfg.finetune.task:
        raise ConfigError("fine-tuning needs --task (a GLUE task name, squad, squad_v2 or custom)")
    make = QATask if cfg.finetune.task in QA_TASKS else ClassificationTask
    return run_earlybert(cfg, make, resume, resume_from)
