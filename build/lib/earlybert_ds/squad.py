"""SQuAD v1.1 / v2.0 extractive QA: loading, windowed features, span post-processing and the official metrics.

Features follow the Hugging Face recipe (question first, context second, overflowing context windows that overlap
by ``stride`` tokens, character offsets from a fast tokenizer); the metrics reproduce the official ``evaluate-v1.1.py``
and ``evaluate-v2.0.py`` scripts so numbers are comparable with published ones.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .tasks import TaskDataError, as_numpy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset into the context


@dataclass(frozen=True)
class QAExample:
    """One question. ``is_impossible`` is None for SQuAD v1.1 files (the field does not exist there); impossible
    questions have no answers."""

    id: str
    question: str
    context: str
    answers: tuple[Answer, ...]
    is_impossible: bool | None = None
    title: str = ""


def load_squad(path: str | Path, strict: bool = True) -> list[QAExample]:
    """Read an official-format SQuAD v1.1 or v2.0 JSON file.

    Every answer must sit at its ``answer_start`` (training positions come from it). ``strict=False`` drops such an
    answer with a warning instead of raising, and drops an answerable question left with no answer.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except OSError as e:
        raise TaskDataError(f"{path}: cannot read: {e}") from None
    examples: list[QAExample] = []
    seen: set[str] = set()
    for i, article in enumerate(_field(doc, "data", "the top level", list, path)):
        title = article.get("title", "") if isinstance(article, dict) else ""
        for j, para in enumerate(_field(article, "paragraphs", f"data[{i}]", list, path)):
            where = f"data[{i}].paragraphs[{j}]"
            context = _field(para, "context", where, str, path)
            for k, qa in enumerate(_field(para, "qas", where, list, path)):
                qid = _field(qa, "id", f"{where}.qas[{k}]", str, path)
                qwhere = f"question {qid!r} ({where}.qas[{k}])"
                if qid in seen:
                    raise TaskDataError(f"{path}: {qwhere}: duplicate question id")
                seen.add(qid)
                question = _field(qa, "question", qwhere, str, path)
                impossible = _field(qa, "is_impossible", qwhere, bool, path) if "is_impossible" in qa else None
                answers = [] if impossible else _answers(qa, context, qwhere, path, strict)
                if not impossible and not answers:
                    if strict:
                        raise TaskDataError(f"{path}: {qwhere}: an answerable question needs at least one answer")
                    logger.warning("%s: %s has no usable answer; question dropped", path, qwhere)
                    continue
                examples.append(QAExample(qid, question, context, tuple(answers), impossible, title))
    return examples


def _field(obj: Any, key: str, where: str, kind: type, path: Path) -> Any:
    """``obj[key]``, which must exist and be a ``kind``; the error names the file and where in it."""
    if not isinstance(obj, dict) or key not in obj:
        raise TaskDataError(f"{path}: {where} has no field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TaskDataError(f"{path}: {where}: field {key!r} must be a {kind.__name__}, got {value!r:.80}")
    return value


def _answers(qa: dict, context: str, qwhere: str, path: Path, strict: bool) -> list[Answer]:
    """A question's answers, each checked to sit at its ``answer_start`` in ``context``."""
    answers = []
    for n, a in enumerate(_field(qa, "answers", qwhere, list, path)):
        text = _field(a, "text", f"{qwhere} answers[{n}]", str, path)
        start = _field(a, "answer_start", f"{qwhere} answers[{n}]", int, path)
        found = context[start:start + len(text)]
        if found != text:
            msg = (f"{path}: {qwhere}: answer {text!r} is not at answer_start {start} "
                   f"(the context there reads {found!r})")
            if strict:
                raise TaskDataError(msg)
            logger.warning("%s; answer dropped", msg)
            continue
        answers.append(Answer(text, start))
    return answers


def prepare_features(
    examples: Sequence[QAExample], tokenizer: Any, max_len: int = 384, stride: int = 128, training: bool = False,
) -> dict[str, Any]:
    """Tokenize (question, context) pairs into ``max_len`` windows over the context that overlap by ``stride``
    tokens; one example may give several features.

    Always: ``input_ids``, ``attention_mask``, ``token_type_ids`` (long tensors ``[features, max_len]``).
    Training: ``start_positions``/``end_positions`` (long ``[features]``), the first answer's tokens, or 0 ([CLS])
    for an impossible question or a window that does not hold the whole answer.
    Evaluation: ``example_id`` (one per feature) and ``offset_mapping`` (per token a ``(start, end)`` character
    span of the context, None for question/special/padding tokens), as :func:`postprocess` needs.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("prepare_features needs a fast tokenizer (it uses offset mappings)")
    if tokenizer.padding_side != "right":
        raise ValueError("prepare_features expects right padding (question first, context second)")
    enc = tokenizer(
        [e.question.lstrip() for e in examples], [e.context for e in examples],
        truncation="only_second", max_length=max_len, stride=stride, padding="max_length",
        return_overflowing_tokens=True, return_offsets_mapping=True, return_token_type_ids=True,
    )
    out: dict[str, Any] = {k: torch.tensor(enc[k], dtype=torch.long)
                           for k in ("input_ids", "attention_mask", "token_type_ids")}
    starts, ends, ids, offsets = [], [], [], []
    for f, offs in enumerate(enc["offset_mapping"]):
        ex = examples[enc["overflow_to_sample_mapping"][f]]
        seq = enc.sequence_ids(f)
        if training:
            s, e = _answer_tokens(ex, offs, [t for t, sid in enumerate(seq) if sid == 1])
            starts.append(s)
            ends.append(e)
        else:
            ids.append(ex.id)
            offsets.append([tuple(o) if sid == 1 else None for o, sid in zip(offs, seq)])
    if training:
        out["start_positions"] = torch.tensor(starts, dtype=torch.long)
        out["end_positions"] = torch.tensor(ends, dtype=torch.long)
    else:
        out["example_id"], out["offset_mapping"] = ids, offsets
    return out


def _answer_tokens(ex: QAExample, offs: Sequence[Sequence[int]], ctx: list[int]) -> tuple[int, int]:
    """(start, end) token of the first answer within this window's context tokens ``ctx``, else (0, 0)."""
    if ex.is_impossible or not ex.answers or not ctx:
        return 0, 0
    a = ex.answers[0]
    # Surrounding whitespace in the answer text would otherwise pull in the neighbouring token.
    a0 = a.start + len(a.text) - len(a.text.lstrip())
    a1 = a.start + len(a.text.rstrip())
    if offs[ctx[0]][0] > a0 or offs[ctx[-1]][1] < a1:
        return 0, 0
    start = max(t for t in ctx if offs[t][0] <= a0)
    end = min(t for t in ctx if offs[t][1] >= a1)
    return start, end


def postprocess(
    examples: Sequence[QAExample],
    features: dict[str, Any],
    start_logits: Any,
    end_logits: Any,
    n_best: int = 20,
    max_answer_len: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    """Best answer text per example id from the features of :func:`prepare_features` (evaluation mode).

    Candidates are the ``n_best`` start x ``n_best`` end tokens of each window that both lie in the context, with
    start <= end and at most ``max_answer_len`` tokens; score = start + end logit. With ``version_2`` the answer is
    empty when the best null score ([CLS] start + end, minimum over windows) exceeds the best span score by more
    than ``null_threshold``.
    """
    start_logits, end_logits = (as_numpy(x).astype(np.float64) for x in (start_logits, end_logits))
    offsets, feature_ids = features["offset_mapping"], features["example_id"]
    if start_logits.shape != end_logits.shape or start_logits.shape[0] != len(feature_ids):
        raise ValueError(f"logits {start_logits.shape}/{end_logits.shape} do not match {len(feature_ids)} features")
    by_example: dict[str, list[int]] = defaultdict(list)
    for f, eid in enumerate(feature_ids):
        by_example[eid].append(f)
    predictions = {}
    for ex in examples:
        if ex.id not in by_example:
            raise ValueError(f"no features for question {ex.id!r}; were they prepared from these examples?")
        best_score, best_text, null_score = -math.inf, "", math.inf
        for f in by_example[ex.id]:
            s_log, e_log, offs = start_logits[f], end_logits[f], offsets[f]
            null_score = min(null_score, float(s_log[0] + e_log[0]))
            top_s = np.argsort(s_log)[::-1][:n_best]
            top_e = np.argsort(e_log)[::-1][:n_best]
            for s in top_s:
                for e in top_e:
                    if s >= len(offs) or e >= len(offs) or offs[s] is None or offs[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_len:
                        continue
                    score = float(s_log[s] + e_log[e])
                    if score > best_score:
                        best_score, best_text = score, ex.context[offs[s][0]:offs[e][1]]
        if version_2 and null_score - best_score > null_threshold:
            best_text = ""
        predictions[ex.id] = best_text
    return predictions


# --------------------------------------------------------------------------------------------------------------
# Official evaluation (evaluate-v1.1.py / evaluate-v2.0.py)
# --------------------------------------------------------------------------------------------------------------


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (the official order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: str, gold: str, version_2: bool) -> float:
    pred_toks, gold_toks = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version_2 and (not pred_toks or not gold_toks):
        return float(pred_toks == gold_toks)  # v2: an empty answer matches only an empty answer
    same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(
    predictions: dict[str, str], examples: Sequence[QAExample], version_2: bool | None = None,
) -> dict[str, float]:
    """``exact_match`` and ``f1`` in percent, the max over each question's gold answers, as the official scripts.

    ``version_2`` (default: whether the file had ``is_impossible`` fields) uses the v2.0 rules: gold answers that
    normalize to nothing are ignored, a question with none is matched only by an (after normalization) empty
    prediction, and ``HasAns_*``/``NoAns_*`` scores are added. A missing prediction scores 0 (as v1.1; logged).
    """
    if not examples:
        raise ValueError("no examples to score")
    if version_2 is None:
        version_2 = any(ex.is_impossible is not None for ex in examples)
    em: dict[str, float] = {}
    f1: dict[str, float] = {}
    missing = 0
    for ex in examples:
        golds = [a.text for a in ex.answers]
        if version_2:
            golds = [g for g in golds if normalize_answer(g)] or [""]
        if ex.id not in predictions:
            missing += 1
            em[ex.id] = f1[ex.id] = 0.0
            continue
        pred = predictions[ex.id]
        em[ex.id] = max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1[ex.id] = max(_f1(pred, g, version_2) for g in golds)
    if missing:
        logger.warning("%d of %d questions have no prediction; they score 0", missing, len(examples))

    def summary(ids: list[str], prefix: str = "") -> dict[str, float]:
        return {f"{prefix}exact_match": 100.0 * sum(em[i] for i in ids) / len(ids),
                f"{prefix}f1": 100.0 * sum(f1[i] for i in ids) / len(ids), f"{prefix}total": float(len(ids))}

    out = summary([ex.id for ex in examples])
    if version_2:
        for prefix, ids in (("HasAns_", [ex.id for ex in examples if ex.answers]),
                            ("NoAns_", [ex.id for ex in examples if not ex.answers])):
            if ids:
                out.update(summary(ids, prefix))
    return out
