"""The ticket-shaped BERT: parity with transformers' BERT, Auto-class round trips, task heads, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, BertConfig, BertForMaskedLM, BertModel

from earlybert_ds.modeling import (
    EarlyBertConfig,
    EarlyBertForMaskedLM,
    EarlyBertForPreTraining,
    EarlyBertForQuestionAnswering,
    EarlyBertForSequenceClassification,
    EarlyBertModel,
    load_hf_bert,
)

from conftest import tiny_config


def _inputs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # one padded row
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    return ids, mask, types


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_parity_with_transformers_on_minilm_weights(minilm_dir, attn):
    hf = BertModel.from_pretrained(minilm_dir, attn_implementation=attn).eval()
    ours = load_hf_bert(minilm_dir, EarlyBertModel).eval()
    ids, mask, types = _inputs(30000)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = ours(ids, mask, types)
    real = mask.bool()
    assert (ref.last_hidden_state - out.last_hidden_state)[real].abs().max() < 1e-5
    assert (ref.pooler_output - out.pooler_output).abs().max() < 1e-5


def test_hidden_states_attentions_and_tuples_as_transformers_on_minilm_weights(minilm_dir):
    """``output_hidden_states`` (the embeddings, then every layer), ``output_attentions`` (computed as the eager
    attention does: SDPA returns no probabilities) and ``return_dict=False`` (Hugging Face's tuples) give what
    transformers' BertModel gives on the real MiniLM weights; the config's flags are the defaults."""
    hf = BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    ours = load_hf_bert(minilm_dir, EarlyBertModel).eval()
    ids, mask, types = _inputs(30000)
    real = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True,
                 output_attentions=True)
        out = ours(ids, mask, types, output_hidden_states=True, output_attentions=True)
        ref_tuple = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True,
                       return_dict=False)
        out_tuple = ours(ids, mask, types, output_hidden_states=True, return_dict=False)
        ours.config.output_attentions = True
        by_config = ours(ids, mask, types)
    assert len(out.hidden_states) == len(ref.hidden_states) == 7 and len(out.attentions) == len(ref.attentions) == 6
    for a, b in zip(ref.hidden_states, out.hidden_states):
        assert (a - b)[real].abs().max() < 1e-5
    for a, b in zip(ref.attentions, out.attentions):
        assert a.shape == b.shape == (3, 12, 17, 17) and (a - b).abs().max() < 1e-5
    assert isinstance(out_tuple, tuple) and len(out_tuple) == len(ref_tuple) == 3  # last, pooled, hidden states
    assert (ref_tuple[0] - out_tuple[0])[real].abs().max() < 1e-5 and (ref_tuple[1] - out_tuple[1]).abs().max() < 1e-5
    assert all((a - b)[real].abs().max() < 1e-5 for a, b in zip(ref_tuple[2], out_tuple[2]))
    assert by_config.hidden_states is None and torch.equal(by_config.attentions[2], out.attentions[2])


def test_task_heads_return_tuples_and_refuse_what_they_do_not_support(tmp_path):
    """``return_dict=False`` gives the tuples of ``BertForMaskedLM`` / ``BertForSequenceClassification`` (loss
    first; no training extras); ``head_mask`` is refused with a reason, and an unknown argument is never ignored."""
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=200, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                     intermediate_size=80, max_position_embeddings=40, num_labels=3)
    hf = BertForMaskedLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf_bert(tmp_path, EarlyBertForMaskedLM).eval()
    ids, mask, types = _inputs(200, seed=2)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[2, 7] = 17, 42
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, return_dict=False)
        out = ours(ids, mask, types, labels=labels, return_dict=False)
        plain = ours(ids, mask, types, return_dict=False, output_hidden_states=True)
    assert len(out) == len(ref) == 2 and abs(out[0].item() - ref[0].item()) < 1e-5
    assert (out[1] - ref[1][labels != -100]).abs().max() < 1e-5
    assert len(plain) == 2 and (plain[0] - ref[1])[mask.bool()].abs().max() < 1e-5 and len(plain[1]) == 3
    cls = EarlyBertForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids, mask, types = _inputs(120)
    loss, logits = cls(ids, mask, types, labels=torch.tensor([0, 2, 1]), return_dict=False)
    assert logits.shape == (3, 3) and loss.ndim == 0
    for model in (ours, cls, EarlyBertModel(tiny_config())):
        with pytest.raises(ValueError, match="head_mask is not supported: a ticket-shaped model has its own number"):
            model(ids, mask, head_mask=torch.ones(4))
        with pytest.raises(TypeError, match="inputs_embeds"):
            model(ids, mask, inputs_embeds=torch.zeros(3, 17, 32))


def test_from_pretrained_converts_a_hugging_face_bert_directory(minilm_dir):
    """``EarlyBertModel.from_pretrained(<HF BERT dir>)`` gives the BERT's own outputs (it used to random-initialise
    every weight, with only a warning: max difference 10.5 on MiniLM)."""
    hf = BertModel.from_pretrained(minilm_dir).eval()
    ours = EarlyBertModel.from_pretrained(minilm_dir).eval()
    ids, mask, types = _inputs(30000)
    with torch.no_grad():
        ref, out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types), ours(ids, mask, types)
    assert (ref.last_hidden_state - out.last_hidden_state)[mask.bool()].abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"is a Hugging Face BERT checkpoint \(model_type 'bert'\).*"
                                         r"load_hf_bert\(path, EarlyBertForSequenceClassification"):
        EarlyBertForSequenceClassification.from_pretrained(minilm_dir, num_labels=3)


def test_parity_with_transformers_mlm_random_weights(tmp_path):
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=200, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                     intermediate_size=80, max_position_embeddings=40)
    hf = BertForMaskedLM(cfg).eval()
    hf.save_pretrained(tmp_path)  # a real checkpoint directory on disk (safetensors)
    ours = load_hf_bert(tmp_path, EarlyBertForPreTraining).eval()
    ids, mask, types = _inputs(200, seed=2)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[2, 7], labels[1, 2] = 17, 42, 99
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        full = ours(ids, mask, types)  # no labels: logits everywhere
        sparse = ours(ids, mask, types, labels=labels)  # labels: logits only at the masked positions
    assert (ref.logits - full.logits)[mask.bool()].abs().max() < 1e-5
    assert sparse.logits.shape == (3, 200)
    assert (sparse.logits - ref.logits[labels != -100]).abs().max() < 1e-5
    assert abs(sparse.loss.item() - ref.loss.item()) < 1e-5
    # the decoder is tied to the word embeddings, as in BERT
    assert ours.cls.decoder.weight.data_ptr() == ours.bert.embeddings.word_embeddings.weight.data_ptr()


def test_import_pytorch_bin_checkpoint(tmp_path):
    torch.manual_seed(2)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=40, max_position_embeddings=32)
    hf = BertModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = load_hf_bert(tmp_path, EarlyBertModel).eval()
    ids, mask, types = _inputs(100)
    with torch.no_grad():
        diff = hf(input_ids=ids, attention_mask=mask).last_hidden_state - ours(ids, mask).last_hidden_state
    assert diff[mask.bool()].abs().max() < 1e-5


def test_pruned_model_round_trips_through_auto_classes(tmp_path):
    torch.manual_seed(3)
    cfg = tiny_config(heads_per_layer=[2, 4, 1], intermediate_sizes=[48, 7, 20])
    model = EarlyBertForPreTraining(cfg).eval()
    assert model.bert.encoder.layer[2].attention.qkv.weight.shape == (3 * 8, 32)
    assert model.bert.encoder.layer[1].ffn.intermediate.weight.shape == (7, 32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["heads_per_layer"] == [2, 4, 1]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EarlyBertConfig)
    again = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    base = AutoModel.from_pretrained(tmp_path).eval()
    ids, mask, types = _inputs(120)
    with torch.no_grad():
        assert torch.equal(model(ids, mask, types).logits, again(ids, mask, types).logits)
        assert torch.allclose(model.bert(ids, mask, types).last_hidden_state,
                              base(ids, mask, types).last_hidden_state, atol=1e-6)


def test_gates_only_when_asked():
    plain = EarlyBertForPreTraining(tiny_config())
    gated = EarlyBertForPreTraining(tiny_config(use_gates=True))
    gate_names = [n for n, _ in gated.named_parameters() if n.endswith("_gates")]
    assert len(gate_names) == 6 and not [n for n, _ in plain.named_parameters() if n.endswith("_gates")]
    assert gated.num_parameters() - plain.num_parameters() == 3 * (4 + 48)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in gated.named_parameters() if n.endswith("_gates"))
    # gates at 1 change nothing
    gated.load_state_dict(plain.state_dict(), strict=False)
    ids, mask, types = _inputs(120)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(ids, mask).logits, gated.eval()(ids, mask).logits, atol=1e-6)


def test_task_heads_losses_and_shapes():
    torch.manual_seed(4)
    ids, mask, types = _inputs(120)
    cls = EarlyBertForSequenceClassification(tiny_config(num_labels=3))
    out = cls(ids, mask, types, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and out.loss.item() > 0
    reg = EarlyBertForSequenceClassification(tiny_config(num_labels=1))
    out = reg(ids, mask, types, labels=torch.tensor([0.5, 2.0, 4.5]))
    assert out.logits.shape == (3, 1)
    assert abs(out.loss.item() - ((out.logits.squeeze(-1) - torch.tensor([0.5, 2.0, 4.5])) ** 2).mean().item()) < 1e-6
    qa = EarlyBertForQuestionAnswering(tiny_config())
    out = qa(ids, mask, types, start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([2, 5, 3]))
    assert out.start_logits.shape == (3, 17) and torch.isfinite(out.loss)
    nsp = EarlyBertForPreTraining(tiny_config(use_nsp=True))
    labels = torch.full_like(ids, -100)
    labels[:, 4] = 7
    out = nsp(ids, mask, types, labels=labels, next_sentence_label=torch.tensor([0, 1, 0]))
    assert out.nsp_logits.shape == (3, 2) and abs(out.loss.item() - out.mlm_loss.item() - out.nsp_loss.item()) < 1e-5


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(5)
    ids, mask, _ = _inputs(120)
    labels = ids.clone()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(5)
        model = EarlyBertForPreTraining(tiny_config(use_gates=True, gate_l1_ffn=1e-2, gradient_checkpointing_layers=ckpt))
        model(ids, mask, labels=labels).loss.backward()
        grads.append(model.bert.encoder.layer[0].ffn.ffn_gates.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_the_gates_l1_comes_back_from_the_forward_pass_even_with_recomputation():
    """The L1 term is returned, never left on a module: a checkpointed layer's recomputation in the backward pass
    cannot leak a penalty into the next (evaluation) forward pass, and both modes give the same term."""
    torch.manual_seed(5)
    ids, mask, _ = _inputs(120)
    penalties = []
    for ckpt in (False, True):
        torch.manual_seed(5)
        model = EarlyBertForPreTraining(tiny_config(use_gates=True, gate_l1_ffn=1e-2, gradient_checkpointing_layers=ckpt))
        out = model(ids, mask, labels=ids.clone())
        out.loss.backward()
        penalties.append(out.gate_penalty)
        assert model.eval()(ids, mask, labels=ids.clone()).gate_penalty is None
    assert torch.equal(penalties[0], penalties[1])


def test_bad_checkpoints_and_configs(tmp_path, minilm_dir):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf_bert(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_bert(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="not a BERT checkpoint"):
        load_hf_bert(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hf_bert(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_hf_bert(tmp_path)
    with pytest.raises(ValueError, match="3 entries but the model has 2 layers"):
        EarlyBertConfig(num_hidden_layers=2, heads_per_layer=[1, 2, 3])
    with pytest.raises(ValueError, match="between 1 and 12"):
        EarlyBertConfig(num_hidden_layers=2, heads_per_layer=[0, 12])


def test_pretraining_forward_reads_nothing_off_the_device():
    """On a GPU, reading a value off the device (whether a mask has padding, how many tokens are masked) stalls the
    forward until the device catches up. The meta device has no values at all: a forward and backward that run
    there read none. With the positions the pre-training batches carry (found on the host) and whatever mask is
    given, the model runs there, and computes exactly what it computes without them; without the positions the
    selection's size is data-dependent, which the meta device refuses (the check can fail)."""
    from earlybert_ds.engine import to_device
    from earlybert_ds.modeling import mlm_positions

    torch.manual_seed(0)
    model = EarlyBertForPreTraining(tiny_config(use_gates=True, gate_l1_heads=1e-2, gate_l1_ffn=1e-2)).eval()
    ids, _, _ = _inputs(120)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3, ids, -100)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "masked_positions": mlm_positions(labels)}
    with_positions = model(**batch)
    without = model(**{k: v for k, v in batch.items() if k != "masked_positions"})
    assert torch.equal(with_positions.loss, without.loss) and torch.equal(with_positions.logits, without.logits)
    assert int(with_positions.mlm_count) == int((labels != -100).sum())

    assert "attention_mask" not in to_device(batch, torch.device("meta"))  # no padding: decided on the host
    padded = {**batch, "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][0, -3:] = 0
    on_meta = to_device(padded, torch.device("meta"))
    assert set(on_meta) == set(padded) and all(v.device.type == "meta" for v in on_meta.values())
    model.to("meta")
    out = model(**on_meta)  # a mask on the device is applied as given, never inspected
    out.loss.backward()
    assert out.loss.device.type == "meta" and model.bert.embeddings.word_embeddings.weight.grad is not None
    with pytest.raises(NotImplementedError, match="nonzero"):
        model(**{k: v for k, v in on_meta.items() if k != "masked_positions"})
