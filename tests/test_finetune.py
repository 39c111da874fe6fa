"""EarlyBERT fine-tuning end to end on the real pre-trained MiniLM (6 layers, 12 heads) with small labelled data made
here: classification (2 ranks), regression and SQuAD-style QA run all three stages and learn."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, pipeline

from conftest import launch, run_single, tiny_bert_dir


GOOD = ["great", "wonderful", "excellent", "superb", "delightful", "brilliant", "lovely", "fantastic"]
BAD = ["terrible", "awful", "dreadful", "horrible", "boring", "poor", "bad", "disappointing"]
THINGS = ["film", "book", "meal", "concert", "trip", "show", "game", "hotel"]


def _sentiment(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(GOOD if label else BAD)
        rows.append((f"the {rng.choice(THINGS)} was {word} and i {'loved' if label else 'hated'} it", label))
    return rows


def _glue_sst2(root: Path) -> Path:
    d = root / "SST-2"
    d.mkdir(parents=True)
    for split, n, seed in (("train", 192, 0), ("dev", 64, 1)):
        (d / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in _sentiment(n, seed)))
    return root


def _finetune(args: list[str], out: Path, nproc: int = 1) -> dict:
    common = ["--output-dir", str(out), "--log.progress", "false", "--log.wandb", "offline",
              "--earlybert.detect_every", "2", "--earlybert.window", "2", "--earlybert.epsilon", "0.2"]
    proc = run_single(args + common, "finetune") if nproc == 1 else launch(args + common, nproc, command="finetune")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_classification_two_ranks_learns_and_shrinks(minilm_dir, tmp_path):
    glue = _glue_sst2(tmp_path / "glue")
    summary = _finetune(["--task", "sst2", "--model", str(minilm_dir), "--data", str(glue),
                         "--train.micro_batch_size", "16", "--train.lr", "2e-4", "--finetune.epochs", "2",
                         "--finetune.search_epochs", "0.75"], tmp_path / "run", nproc=2)
    ticket = summary["ticket"]
    assert ticket["heads_per_layer"] == [8] * 6  # 1/3 of 12 heads pruned per layer
    widths = ticket["intermediate_sizes"]  # 40% of the FFN neurons pruned globally, widths rounded up to x64
    assert all(w % 64 == 0 for w in widths) and 0 <= sum(widths) - round(0.6 * 6 * 1536) < 6 * 64
    assert ticket["step"] <= 5  # 192 examples / 32 per step = 6 steps per epoch; search limit 0.75 epoch (4.5)
    assert summary["steps"] == 12 and summary["params_final"] < summary["params_full"]
    assert summary["final_dev_accuracy"] >= 0.9  # chance is 0.5
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final")
    assert model.config.num_labels == 2 and model.config.heads_per_layer == [8] * 6
    # the model card says what it is, and its pipeline works as the card shows
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "12 steps of fine-tuning on `sst2`" in card
    assert "| this model | 6 | 8, 8, 8, 8, 8, 8 |" in card and "| dev_accuracy |" in card
    classify = pipeline("text-classification", model=str(tmp_path / "run" / "final"))
    assert classify("a great film")[0]["label"] in model.config.id2label.values()


@pytest.mark.slow
def test_regression_learns(minilm_dir, tmp_path):
    rng = random.Random(3)
    rows = []
    for _ in range(160):  # a score of how positive a review is: 0 (two bad words) .. 5 (two good words)
        a, b = rng.choice(GOOD + BAD), rng.choice(GOOD + BAD)
        rows.append({"sentence1": f"it was {a}", "sentence2": f"really {b}", "label": 2.5 * ((a in GOOD) + (b in GOOD))})
    for name, part in (("train.jsonl", rows[:128]), ("dev.jsonl", rows[128:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    summary = _finetune(["--task", "custom", "--model", str(minilm_dir), "--finetune.num_labels", "1",
                         "--finetune.text_b", "sentence2", "--finetune.train_file", str(tmp_path / "train.jsonl"),
                         "--finetune.dev_file", str(tmp_path / "dev.jsonl"), "--train.micro_batch_size", "32",
                         "--train.lr", "8e-4", "--finetune.epochs", "2", "--earlybert.draw", "fixed",
                         "--earlybert.fixed_step", "2", "--earlybert.weights", "continue"], tmp_path / "run")
    assert summary["ticket"]["reason"] == "fixed" and summary["ticket"]["step"] == 2 and summary["steps"] == 8
    assert summary["final_dev_pearson"] > 0.7, summary


@pytest.mark.slow
def test_squad_qa_learns(minilm_dir, tmp_path):
    cities = ["paris", "rome", "madrid", "berlin", "vienna", "lisbon", "oslo", "dublin", "prague", "warsaw"]
    names = ["anna", "boris", "clara", "david", "elena", "felix", "greta", "hugo", "irene", "jonas", "karl", "lena"]

    def squad(n: int, seed: int) -> dict:
        rng = random.Random(seed)
        paragraphs = []
        for i in range(n):
            who, city, other = rng.choice(names), *rng.sample(cities, 2)
            context = f"{who} was born in {city}. later {who} moved to {other} to study music."
            paragraphs.append({"context": context, "qas": [{
                "id": f"q{seed}-{i}", "question": f"where was {who} born?",
                "answers": [{"text": city, "answer_start": context.index(city)}]}]})
        return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}

    data = tmp_path / "squad"
    data.mkdir()
    (data / "train-v1.1.json").write_text(json.dumps(squad(160, 0)))
    (data / "dev-v1.1.json").write_text(json.dumps(squad(40, 1)))
    summary = _finetune(["--task", "squad", "--model", str(minilm_dir), "--data", str(data),
                         "--finetune.max_len", "32", "--finetune.stride", "16", "--train.micro_batch_size", "32",
                         "--train.lr", "5e-4", "--finetune.epochs", "1", "--earlybert.draw", "random"],
                        tmp_path / "run")
    assert summary["ticket"]["reason"] == "random" and "search" not in summary["stages"] and summary["steps"] == 5
    assert summary["final_dev_exact_match"] > 60, summary  # two cities per context: chance is far lower
    preds = json.loads((tmp_path / "run" / "predictions" / "dev_predictions.json").read_text())
    assert len(preds) == 40
    AutoModelForQuestionAnswering.from_pretrained(tmp_path / "run" / "final")


@pytest.mark.slow
def test_custom_task_with_label_names(tmp_path):
    """A JSON-lines task whose labels are names: ids in sorted order of the names, ``id2label``/``label2id`` in the
    saved models' configs, predictions written with the names (a tiny BERT with the task's vocabulary: what is
    checked is the naming, not the learning)."""
    names = {0: "negative", 1: "positive"}
    for split, n, seed in (("train", 64, 0), ("dev", 32, 1), ("test", 16, 2)):
        rows = [{"text": s, **({"label": names[y]} if split != "test" else {})} for s, y in _sentiment(n, seed)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {f"--finetune.{k}_file": str(tmp_path / f"{k}.jsonl") for k in ("train", "dev", "test")}
    model = tiny_bert_dir(tmp_path / "model", " ".join(s for s, _ in _sentiment(64, 0)), 80)
    _finetune(["--task", "custom", "--model", str(model), "--finetune.text_a", "text",
               *[x for kv in files.items() for x in kv], "--train.micro_batch_size", "16", "--finetune.epochs", "1",
               "--finetune.max_len", "32"], tmp_path / "run")
    for saved in ("final", "ticket"):
        config = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / saved).config
        assert config.id2label == names and config.label2id == {"negative": 0, "positive": 1}, saved
    lines = (tmp_path / "run" / "predictions" / "custom.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 17
    assert {line.split("\t")[1] for line in lines[1:]} <= {"negative", "positive"}


def test_custom_label_list_flag_and_its_errors(tmp_path):
    from earlybert_ds.config import ConfigError, RunConfig
    from earlybert_ds.finetune import _custom_spec

    (tmp_path / "train.jsonl").write_text('{"sentence1": "a b", "label": "yes"}\n{"sentence1": "c", "label": "no"}\n'
                                          '{"sentence1": "d", "label": "maybe"}\n')
    cfg = RunConfig.from_dict({"finetune": {"task": "custom", "train_file": str(tmp_path / "train.jsonl")}})
    assert _custom_spec(cfg).label_list == ("maybe", "no", "yes")  # inferred, sorted: 3 classes
    cfg = RunConfig.from_dict({"finetune": {"task": "custom", "train_file": str(tmp_path / "train.jsonl"),
                                            "label_list": "yes, no, maybe"}})
    assert _custom_spec(cfg).label_list == ("yes", "no", "maybe")  # given: that order
    cfg = RunConfig.from_dict({"finetune": {"task": "custom", "train_file": str(tmp_path / "train.jsonl"),
                                            "num_labels": 2}})
    with pytest.raises(ConfigError, match=r"finetune.num_labels=2, but the labels are \['maybe', 'no', 'yes'\]"):
        _custom_spec(cfg)
