"""The outputs as a Hugging Face user meets them: final/ and ticket/ load in plain ``transformers`` (a fresh process
that never imports earlybert_ds, ``trust_remote_code=True``) with their model card; ``transformers.Trainer``
predicts and evaluates the models as it does ``BertFor*``; the run directory is readable by the team (modes under
umask 0022) and holds the text log ``train.log``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments, pipeline

from earlybert_ds.checkpoint import load_ticket_dir
from earlybert_ds.modeling import EarlyBertForMaskedLM, EarlyBertForSequenceClassification
from earlybert_ds.monitor import LOG_FILE, text_log

from conftest import tiny_config


# A fresh interpreter that cannot import earlybert_ds (an import of it fails loudly), loading with plain transformers.
_PLAIN = r'''
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "earlybert_ds":
            raise ImportError("earlybert_ds imported")

sys.meta_path.insert(0, Refuse())
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, pipeline

result = {}
for name in ("final", "ticket"):
    path = sys.argv[1] + "/" + name
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    mlm = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    enc = tokenizer(["the module defines a class", "a function returns a value"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = mlm(**enc).logits
        hidden = base(**enc).last_hidden_state
    fill = pipeline("fill-mask", model=path, trust_remote_code=True)
    result[name] = {"config": type(config).__name__, "heads_per_layer": config.heads_per_layer,
                    "model": type(mlm).__name__, "logits": logits.tolist(), "hidden": hidden.tolist(),
                    "input_ids": enc["input_ids"].tolist(), "attention_mask": enc["attention_mask"].tolist(),
                    "fill": fill(f"the module defines a {tokenizer.mask_token}", top_k=3)}
result["earlybert_ds_imported"] = any(m.split(".")[0] == "earlybert_ds" for m in sys.modules)
print(json.dumps(result))
'''


@pytest.mark.slow
def test_final_and_ticket_load_in_plain_transformers(finished_run, tmp_path):
    """Without earlybert_ds, with ``trust_remote_code=True``: AutoConfig, AutoTokenizer, AutoModel(ForMaskedLM) and
    the fill-mask pipeline on final/ and on ticket/, giving this package's numbers to 1e-5."""
    out, _ = finished_run
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _PLAIN, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["earlybert_ds_imported"] is False
    ticket = json.loads((out / "ticket" / "ticket.json").read_text())
    _, ticket_model, _ = load_ticket_dir(out / "ticket", EarlyBertForMaskedLM)
    ours = {"final": EarlyBertForMaskedLM.from_pretrained(out / "final").eval(), "ticket": ticket_model.eval()}
    for name, model in ours.items():
        theirs = got[name]
        assert theirs["config"] == "EarlyBertConfig" and theirs["model"] == "EarlyBertForMaskedLM"
        assert theirs["heads_per_layer"] == ticket["heads_per_layer"]
        ids, mask = torch.tensor(theirs["input_ids"]), torch.tensor(theirs["attention_mask"])
        with torch.no_grad():
            logits, hidden = model(ids, mask).logits, model.bert(ids, mask).last_hidden_state
        real = mask.bool()
        assert (torch.tensor(theirs["logits"]) - logits)[real].abs().max() < 1e-5
        assert (torch.tensor(theirs["hidden"]) - hidden)[real].abs().max() < 1e-5
        fill = pipeline("fill-mask", model=model, tokenizer=str(out / name))
        expected = fill(f"the module defines a {fill.tokenizer.mask_token}", top_k=3)
        assert [r["token"] for r in theirs["fill"]] == [r["token"] for r in expected]
        assert np.allclose([r["score"] for r in theirs["fill"]], [r["score"] for r in expected], atol=1e-5)


@pytest.mark.slow
def test_saved_models_carry_their_code_and_a_model_card(finished_run):
    """Each saved directory holds modeling_earlybert.py (named by config.json's auto_map) and a README.md model card
    with the ticket's shape, how it was trained and how to load it."""
    out, _ = finished_run
    ticket = json.loads((out / "ticket" / "ticket.json").read_text())
    for name in ("final", "ticket"):
        d = out / name
        config = json.loads((d / "config.json").read_text())
        assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_earlybert.EarlyBertForMaskedLM"
        assert (d / "modeling_earlybert.py").read_text() == Path(__file__).parent.parent.joinpath(
            "earlybert_ds", "modeling.py").read_text()
        card = (d / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: fill-mask\n")
        heads = ", ".join(map(str, ticket["heads_per_layer"]))
        ffn = ", ".join(map(str, ticket["intermediate_sizes"]))
        assert f"| this model | 2 | {heads} | {ffn} |" in card and "| unpruned | 2 | 4 | 64 |" in card
        assert "drawn at step 3 (fixed)" in card and "peak learning rate 0.005" in card
        assert f'pipeline("fill-mask", model=path, trust_remote_code=True)' in card and f'path = "{d}"' in card
    assert "8 steps of masked-LM pre-training" in (out / "final" / "README.md").read_text()
    assert "| val_loss |" in (out / "final" / "README.md").read_text()


@pytest.mark.slow
def test_outputs_get_the_modes_the_umask_allows(finished_run):
    """Under umask 0022 every file of the run is 0644 and every directory 0755 (the safetensors weights, the
    atomically written summary and config included), so that colleagues can read a finished run."""
    out, _ = finished_run
    modes = {p: p.lstat().st_mode for p in [out, *out.rglob("*")] if not p.is_symlink()}
    assert out / "final" / "model.safetensors" in modes and out / "summary.json" in modes
    wrong = {str(p): oct(m & 0o777) for p, m in modes.items() if m & 0o777 != (0o755 if p.is_dir() else 0o644)}
    assert not wrong


@pytest.mark.slow
def test_train_log_holds_the_consoles_lines(finished_run):
    """``OUTPUT/train.log`` holds every line rank 0 showed from the start of the run: its log records as the
    console formats them and the metric lines it printed."""
    out, proc = finished_run
    log = (out / LOG_FILE).read_text().splitlines()
    records = [line for line in proc.stderr.splitlines() if " [rank0] " in line]
    start = next(i for i, line in enumerate(records) if " precision " in line)
    assert records[start:] and all(line in log for line in records[start:])
    printed = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(printed) >= 8 and all(any(entry.endswith(line) for entry in log) for line in printed)
    assert any("ticket drawn at step 3" in line for line in log) and any("step 8/8 | loss" in line for line in log)


def test_train_log_ends_with_the_error_that_ended_the_run(tmp_path):
    with pytest.raises(ValueError), text_log(tmp_path, rank=0, append=False):
        logging.getLogger("earlybert_ds").warning("before the error")
        raise ValueError("the corpus is empty")
    log = (tmp_path / LOG_FILE).read_text()
    assert "before the error" in log and "run failed: ValueError: the corpus is empty" in log
    with text_log(tmp_path, rank=0, append=True):
        logging.getLogger("earlybert_ds").warning("resumed")
    assert (tmp_path / LOG_FILE).read_text().startswith(log) and "resumed" in (tmp_path / LOG_FILE).read_text()
    with text_log(tmp_path / "other", rank=1, append=False):  # only rank 0 writes it
        pass
    assert not (tmp_path / "other").exists()


# ---- transformers.Trainer --------------------------------------------------------------------------------------

def _trainer(model, tmp_path: Path, **kw) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    return Trainer(model=model, args=args, **kw)


def test_trainer_predict_gives_logits_to_compute_metrics(tmp_path):
    """Trainer.predict on the classifier: the predictions are the logits (not a tuple with the task loss), so the
    usual ``compute_metrics`` works."""
    torch.manual_seed(0)
    model = EarlyBertForSequenceClassification(tiny_config(num_labels=3)).eval()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(5, 120, (9,), generator=g), "attention_mask": torch.ones(9, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(12)]
    accuracy = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}  # noqa: E731
    result = _trainer(model, tmp_path, compute_metrics=accuracy).predict(data)
    with torch.no_grad():
        logits = model(torch.stack([d["input_ids"] for d in data])).logits
    labels = torch.tensor([d["labels"] for d in data])
    assert isinstance(result.predictions, np.ndarray) and result.predictions.shape == (12, 3)
    assert np.abs(result.predictions - logits.numpy()).max() < 1e-5
    assert result.metrics["test_accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert result.metrics["test_loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), abs=1e-5)


def test_trainer_evaluate_reports_the_mlm_eval_loss(tmp_path):
    """Trainer.evaluate on the masked LM reports ``eval_loss``: the mean over its batches of the cross-entropy at
    the masked positions, computed here from the full (batch, seq, vocab) logits."""
    torch.manual_seed(0)
    model = EarlyBertForMaskedLM(tiny_config()).eval()
    g = torch.Generator().manual_seed(2)
    data = []
    for _ in range(8):
        ids = torch.randint(5, 120, (11,), generator=g)
        labels = torch.full_like(ids, -100)
        picked = torch.randperm(11, generator=g)[:3]
        labels[picked] = ids[picked]
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    metrics = _trainer(model, tmp_path).evaluate(data)
    expected = []
    with torch.no_grad():
        for i in range(0, 8, 4):
            ids = torch.stack([d["input_ids"] for d in data[i:i + 4]])
            labels = torch.stack([d["labels"] for d in data[i:i + 4]])
            expected.append(F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
    assert metrics["eval_loss"] == pytest.approx(float(torch.stack(expected).mean()), abs=1e-5)
