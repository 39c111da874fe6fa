"""GLUE-style sentence(-pair) classification and regression data: task registry, loading, encoding, metrics.

Data comes from a local GLUE directory in the standard TSV layout, a local ``.csv``/``.jsonl`` file with named
columns, or (online only) the Hugging Face hub. Bad rows fail with a :class:`TaskDataError` naming the file and the
line, because a silently skipped or mislabelled row corrupts a fine-tuning result without any other sign. The one
exception: TSV rows with the wrong number of fields, which GLUE's own files hold (QQP), are skipped and counted in
the log while they are a small share of the file.
Metrics are plain numpy (scipy and scikit-learn are not dependencies of this package).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write_text


logger = logging.getLogger("earlybert_ds")

#: The share of a TSV file's rows that may be malformed (and are then skipped) before the file is refused.
MAX_MALFORMED_SHARE = 0.01


class TaskDataError(ValueError):
    """Task data that cannot be used; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class TaskSpec:
    """How to read one task and how to score it.

    ``label_list`` holds the labels as written in the data files; a label's id is its position (the same order as the
    hub's ``ClassLabel``, so ids agree across sources). Regression tasks (``num_labels == 1``) have no label list.
    ``headerless_columns`` names the columns of train/dev files that have no header line (CoLA); test files are
    always read by their header.
    """

    name: str
    num_labels: int
    label_list: tuple[str, ...]
    text_a: str
    text_b: str | None
    label_column: str
    metrics: tuple[str, ...]
    main_metric: str
    glue_dir: str = ""
    dev_splits: tuple[str, ...] = ("dev",)
    headerless_columns: tuple[str, ...] | None = None
    hub_text: tuple[str, str | None] | None = None

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_ACC_F1 = ("accuracy", "f1")
_CORR = ("pearson", "spearman")

# Main metrics follow the BERT paper's GLUE table: MCC for CoLA, F1 for MRPC/QQP, Spearman for STS-B, else accuracy.
GLUE_TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("cola", 2, ("0", "1"), "sentence", None, "label", ("mcc", "accuracy"), "mcc", "CoLA",
                 headerless_columns=("source", "label", "original_label", "sentence"), hub_text=("sentence", None)),
        TaskSpec("sst2", 2, ("0", "1"), "sentence", None, "label", ("accuracy",), "accuracy", "SST-2",
                 hub_text=("sentence", None)),
        TaskSpec("mrpc", 2, ("0", "1"), "#1 String", "#2 String", "Quality", _ACC_F1, "f1", "MRPC",
                 hub_text=("sentence1", "sentence2")),
        TaskSpec("stsb", 1, (), "sentence1", "sentence2", "score", _CORR, "spearman", "STS-B",
                 hub_text=("sentence1", "sentence2")),
        TaskSpec("qqp", 2, ("0", "1"), "question1", "question2", "is_duplicate", _ACC_F1, "f1", "QQP",
                 hub_text=("question1", "question2")),
        TaskSpec("mnli", 3, ("entailment", "neutral", "contradiction"), "sentence1", "sentence2", "gold_label",
                 ("accuracy",), "accuracy", "MNLI", dev_splits=("dev_matched", "dev_mismatched"),
                 hub_text=("premise", "hypothesis")),
        TaskSpec("qnli", 2, ("entailment", "not_entailment"), "question", "sentence", "label", ("accuracy",),
                 "accuracy", "QNLI", hub_text=("question", "sentence")),
        TaskSpec("rte", 2, ("entailment", "not_entailment"), "sentence1", "sentence2", "label", ("accuracy",),
                 "accuracy", "RTE", hub_text=("sentence1", "sentence2")),
        TaskSpec("wnli", 2, ("0", "1"), "sentence1", "sentence2", "label", ("accuracy",), "accuracy", "WNLI",
                 hub_text=("sentence1", "sentence2")),
    )
}


def custom_task(
    num_labels: int,
    text_a: str,
    text_b: str | None = None,
    label_column: str = "label",
    label_list: Sequence[str] | None = None,
) -> TaskSpec:
    """A task over a user's CSV/JSON-lines file. Labels are ``0..num_labels-1`` unless ``label_list`` names them
    (a label's id is its position); ``num_labels == 1`` is regression (Pearson/Spearman, main Spearman)."""
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    if num_labels == 1:
        if label_list:
            raise ValueError("a regression task (num_labels == 1) takes no label_list")
        return TaskSpec("custom", 1, (), text_a, text_b, label_column, _CORR, "spearman")
    labels = tuple(str(x) for x in label_list) if label_list is not None else tuple(str(i) for i in range(num_labels))
    if len(labels) != num_labels or len(set(labels)) != num_labels:
        raise ValueError(f"label_list must hold {num_labels} distinct labels, got {list(labels)}")
    metrics = _ACC_F1 if num_labels == 2 else ("accuracy",)
    return TaskSpec("custom", num_labels, labels, text_a, text_b, label_column, metrics, "accuracy")


def get_task(task: str | TaskSpec) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    spec = GLUE_TASKS.get(task.lower())
    if spec is None:
        raise TaskDataError(f"unknown task {task!r}; known tasks: {', '.join(GLUE_TASKS)} (or use custom_task())")
    return spec


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One row; ``label`` is a class id (classification), a float (regression) or None (unlabelled test data)."""

    guid: str
    text_a: str
    text_b: str | None
    label: int | float | None


def load_task_split(task: str | TaskSpec, source: str | Path, split: str) -> list[Example]:
    """Read ``split`` of ``task`` from ``source``: a GLUE directory (``SRC/split.tsv`` or ``SRC/<GLUE dir>/split.tsv``,
    e.g. ``MNLI/dev_matched.tsv``), a ``.csv``/``.jsonl`` file, or ``"hub"`` (Hugging Face ``nyu-mll/glue``; online).

    Splits whose name starts with ``test`` may lack the label column (predictions on a test file); elsewhere every
    row needs a valid label.
    """
    spec = get_task(task)
    if str(source) == "hub":
        return _load_hub(spec, split)
    path = Path(source)
    labelled = not split.startswith("test")
    if path.is_dir():
        path = _glue_file(spec, path, split)
    elif not path.is_file():
        raise TaskDataError(f"{path}: no such file or directory (nor 'hub')")
    return _parse_rows(spec, path, _rows(path, spec.headerless_columns if labelled else None), labelled)


def _rows(path: Path, headerless: tuple[str, ...] | None = None) -> "_Rows":
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return _tsv_rows(path, headerless)
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    raise TaskDataError(f"{path}: unsupported file type {suffix!r}; use .tsv, .csv or .jsonl")


def infer_label_list(path: str | Path, label_column: str) -> tuple[str, ...]:
    """The distinct class labels of a custom task's training file, sorted: numbered in this order, the same file
    always gives the same ids."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    names: set[str] = set()
    for lineno, row in _rows(path):
        if label_column not in row:
            raise TaskDataError(f"{path}:{lineno}: missing column {label_column!r}; found {list(row)}")
        value = row[label_column]
        if isinstance(value, (bool, float)) or value is None or not str(value).strip():
            raise TaskDataError(f"{path}:{lineno}: {label_column} {value!r} is not a class label (a name or an "
                                "integer; --finetune.num_labels 1 for regression)")
        names.add(str(value).strip())
    if not names:
        raise TaskDataError(f"{path}: no examples")
    return tuple(sorted(names))


def _glue_file(spec: TaskSpec, root: Path, split: str) -> Path:
    if not spec.glue_dir:
        raise TaskDataError(f"{root}: a directory source needs a GLUE task; give a custom task a .csv/.jsonl file")
    if split == "dev" and spec.dev_splits != ("dev",):
        raise TaskDataError(f"{spec.name} has no 'dev' split; use one of {list(spec.dev_splits)}")
    candidates = [root / f"{split}.tsv", root / spec.glue_dir / f"{split}.tsv"]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise TaskDataError(f"no {spec.name} split {split!r}: none of {[str(c) for c in candidates]} exists")
    return file


# A row source yields (line number, {column: value}).
_Rows = Iterator[tuple[int, dict[str, Any]]]


def _tsv_rows(path: Path, headerless: tuple[str, ...] | None) -> _Rows:
    """Rows of a TSV file. GLUE's files as distributed hold a few malformed rows (QQP's training file: questions
    broken over lines), which the official loaders skip: so are they here, counted in the log, as long as they are
    at most ``MAX_MALFORMED_SHARE`` of the rows; a file with more is refused, naming the first ones."""
    # GLUE TSVs contain unbalanced quotes (MNLI, QQP), so fields are split on tabs only, never csv-unquoted.
    bad: list[tuple[int, int]] = []  # (line, fields)
    rows = 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        columns = headerless
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t")
            if columns is None:
                columns = tuple(fields)
                continue
            rows += 1
            if len(fields) != len(columns):
                bad.append((lineno, len(fields)))
                continue
            yield lineno, dict(zip(columns, fields))
    if not bad:
        return
    where = ", ".join(f"line {n} ({k} fields)" for n, k in bad[:5]) + (", ..." if len(bad) > 5 else "")
    if len(bad) > MAX_MALFORMED_SHARE * rows:
        raise TaskDataError(f"{path}:{bad[0][0]}: expected {len(columns)} tab-separated fields ({', '.join(columns)}), "
                            f"got {bad[0][1]}; {len(bad)} of {rows} rows are malformed, more than the "
                            f"{MAX_MALFORMED_SHARE:.0%} that are skipped: {where}")
    logger.warning("%s: skipped %d malformed row(s) of %d (not %d tab-separated fields), as the official GLUE loaders "
                   "do: %s", path, len(bad), rows, len(columns), where)


def _csv_rows(path: Path) -> _Rows:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        columns = next(reader, None)
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(columns):
                raise TaskDataError(f"{path}:{reader.line_num}: expected {len(columns)} comma-separated fields "
                                    f"({', '.join(columns)}), got {len(fields)}")
            yield reader.line_num, dict(zip(columns, fields))


def _jsonl_rows(path: Path) -> _Rows:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TaskDataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _parse_rows(spec: TaskSpec, path: Path, rows: _Rows, labelled: bool) -> list[Example]:
    needed = [c for c in (spec.text_a, spec.text_b) if c is not None]
    examples = []
    for lineno, row in rows:
        missing = [c for c in needed + ([spec.label_column] if labelled else []) if c not in row]
        if missing:
            raise TaskDataError(f"{path}:{lineno}: missing column(s) {missing}; found {list(row)}")
        bad = [c for c in needed if not isinstance(row[c], str)]
        if bad:
            raise TaskDataError(f"{path}:{lineno}: column(s) {bad} must hold text, got {[row[c] for c in bad]}")
        label = None
        if spec.label_column in row:
            label = _parse_label(spec, row[spec.label_column], f"{path}:{lineno}")
        guid = str(row.get("index", row.get("idx", row.get("id", lineno))))
        text_b = row[spec.text_b] if spec.text_b is not None else None
        examples.append(Example(guid, row[spec.text_a], text_b, label))
    if not examples:
        raise TaskDataError(f"{path}: no examples")
    return examples


def _parse_label(spec: TaskSpec, value: Any, where: str) -> int | float:
    if spec.is_regression:
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if isinstance(value, bool) or not math.isfinite(score):
            raise TaskDataError(f"{where}: {spec.label_column} {value!r} is not a finite number")
        return score
    name = str(value).strip() if not isinstance(value, bool) else repr(value)
    try:
        return spec.label_list.index(name)
    except ValueError:
        raise TaskDataError(f"{where}: unknown {spec.name} label {value!r}; expected one of "
                            f"{list(spec.label_list)}") from None


_HUB_SPLITS = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}


def _load_hub(spec: TaskSpec, split: str) -> list[Example]:
    if spec.hub_text is None:
        raise TaskDataError(f"task {spec.name!r} is not on the hub; load it from a local file")
    hub_split = _HUB_SPLITS.get(split, split)
    try:
        import datasets

        rows = list(datasets.load_dataset("nyu-mll/glue", spec.name, split=hub_split))
    except Exception as e:  # noqa: BLE001 - network, cache and name errors all mean the same thing here
        raise TaskDataError(f"could not load glue/{spec.name} split {hub_split!r} from the Hugging Face hub "
                            f"(needs internet, or a local copy): {type(e).__name__}: {e}") from e
    a, b = spec.hub_text
    # The hub's test splits carry label -1; its ClassLabel order equals label_list, so ids pass through.
    return [
        Example(str(r.get("idx", i)), r[a], r[b] if b else None,
                None if r["label"] == -1 else (float(r["label"]) if spec.is_regression else int(r["label"])))
        for i, r in enumerate(rows)
    ]


# --------------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------------


class TaskDataset(torch.utils.data.Dataset):
    """Unpadded encodings; ``collate`` pads each batch to its longest row (cheaper than padding all to max_len)."""

    def __init__(self, features: list[dict[str, list[int]]], labels: list[int | float] | None, pad_token_id: int,
                 regression: bool):
        self.features, self.labels, self.pad_token_id, self.regression = features, labels, pad_token_id, regression

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = dict(self.features[i])
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item

    def collate(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        out = {k: torch.tensor([b[k] + [p] * (width - len(b[k])) for b in batch]) for k, p in pads.items()}
        if "labels" in batch[0]:
            out["labels"] = torch.tensor([b["labels"] for b in batch],
                                         dtype=torch.float32 if self.regression else torch.long)
        return out


def encode(examples: Sequence[Example], tokenizer: Any, max_len: int = 128) -> TaskDataset:
    """Tokenize single sentences or pairs (``token_type_ids`` 0/1), truncating the longer side first.

    Use ``DataLoader(ds, collate_fn=ds.collate)``. Labels are included only when every example has one.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token")
    pairs = [e.text_b is not None for e in examples]
    if any(pairs) and not all(pairs):
        raise TaskDataError("examples mix single sentences and sentence pairs")
    enc = tokenizer(
        [e.text_a for e in examples],
        [e.text_b for e in examples] if any(pairs) else None,
        truncation="longest_first", max_length=max_len, padding=False,
        return_token_type_ids=True, return_attention_mask=True,
    )
    keys = ("input_ids", "attention_mask", "token_type_ids")
    features = [{k: list(enc[k][i]) for k in keys} for i in range(len(examples))]
    labels = [e.label for e in examples]
    has_labels = bool(examples) and all(x is not None for x in labels)
    regression = has_labels and isinstance(labels[0], float)
    return TaskDataset(features, labels if has_labels else None, tokenizer.pad_token_id, regression)


# --------------------------------------------------------------------------------------------------------------
# Metrics and predictions
# --------------------------------------------------------------------------------------------------------------


def as_numpy(x: Any) -> np.ndarray:
    """A tensor (floats as fp32) or anything array-like as a numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
        return x.numpy()
    return np.asarray(x)


def _class_ids(predictions: Any) -> np.ndarray:
    """Accept class ids (n,) or logits (n, num_labels)."""
    p = as_numpy(predictions)
    return p.argmax(-1) if p.ndim == 2 else p.astype(np.int64)


def _scores(predictions: Any) -> np.ndarray:
    """Accept scores (n,) or a regression head's output (n, 1)."""
    p = as_numpy(predictions).astype(np.float64)
    return p[:, 0] if p.ndim == 2 else p


def binary_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """F1 of the positive class 1; 0 when there is no true positive (as scikit-learn's default)."""
    tp = float(np.sum((pred == 1) & (gold == 1)))
    fp = float(np.sum((pred == 1) & (gold != 1)))
    fn = float(np.sum((pred != 1) & (gold == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corr(pred: np.ndarray, gold: np.ndarray) -> float:
    """Binary Matthews correlation; 0 when a row or column of the confusion matrix is empty (as scikit-learn)."""
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred != 1) & (gold != 1)))
    fp = float(np.sum((pred == 1) & (gold != 1)))
    fn = float(np.sum((pred != 1) & (gold == 1)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN when either side is constant (as SciPy)."""
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.sum(xc * xc)) * float(np.sum(yc * yc)))
    return float(np.sum(xc * yc)) / denom if denom else math.nan


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of their ranks (SciPy's ``rankdata(method='average')``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(x)]  # group [start, end) holds ranks start+1 .. end
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def compute_metrics(task: str | TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """The task's metrics (``spec.metrics``); predictions are class ids or logits, scores for regression.

    MNLI: call once per dev split and prefix the keys yourself (e.g. ``accuracy_mm`` for mismatched).
    """
    spec = get_task(task)
    if spec.is_regression:
        pred, gold = _scores(predictions), as_numpy(labels).astype(np.float64)
    else:
        pred, gold = _class_ids(predictions), as_numpy(labels).astype(np.int64)
    if pred.shape != gold.shape or pred.ndim != 1 or not len(gold):
        raise ValueError(f"need equally many predictions and labels (> 0), got {pred.shape} and {gold.shape}")
    fns = {
        "accuracy": lambda: float(np.mean(pred == gold)),
        "f1": lambda: binary_f1(pred, gold),
        "mcc": lambda: matthews_corr(pred, gold),
        "pearson": lambda: pearson(pred, gold),
        "spearman": lambda: spearman(pred, gold),
    }
    return {m: fns[m]() for m in spec.metrics}


def write_predictions(path: str | Path, task: str | TaskSpec, predictions: Any) -> None:
    """GLUE submission file: a header ``index\\tprediction``, then one row per test example in file order, with
    label names (``entailment``, ``1``, ...) for classification and 3-decimal scores for regression."""
    spec = get_task(task)
    if spec.is_regression:
        values = [f"{v:.3f}" for v in _scores(predictions)]
    else:
        ids = _class_ids(predictions)
        if len(ids) and (ids.min() < 0 or ids.max() >= spec.num_labels):
            raise ValueError(f"class ids must lie in [0, {spec.num_labels}) for {spec.name}")
        values = [spec.label_list[i] for i in ids]
    atomic_write_text(path, "index\tprediction\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))

