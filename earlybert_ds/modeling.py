"""A BERT encoder whose shape can follow an EarlyBERT ticket.

Each layer may have its own number of attention heads and its own FFN width (the head size stays that of the
original model), so a shrunk model is a *physically* smaller network with smaller matrices. With
``config.use_gates`` the model carries the slimming gates of the search stage: one scalar per head (scaling that
head's context before the output projection) and one per FFN neuron (scaling the activation).

The parameter names follow Hugging Face's BERT where they can (``embeddings.*``, ``encoder.layer.N.*``), except
that query, key and value are one fused ``qkv`` projection (one GEMM instead of three);
:func:`load_hf_bert` converts a Hugging Face BERT checkpoint directory.

This module stands alone: it imports only torch, transformers and the standard library, never the rest of the
package. ``save_pretrained`` copies it beside the weights (as ``modeling_earlybert.py``, named in config.json's
``auto_map``), so that plain ``transformers`` loads a saved model with ``trust_remote_code=True`` where this
package is not installed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

logger = logging.getLogger(__name__)

#: The label of a position that is not predicted (not masked): cross-entropy skips it, as in Hugging Face.
IGNORE_INDEX = -100


def mlm_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat indices of the MLM targets in ``labels`` (those not ``IGNORE_INDEX``). Found on the host, in the
    batch the model is handed, they spare it a wait for the device (the selection's size is known there)."""
    return (labels.view(-1) != IGNORE_INDEX).nonzero().squeeze(1)

#: What a saved model's directory holds of this module, and the Auto classes that its config.json maps to it.
CODE_FILE = "modeling_earlybert.py"
AUTO_MAP = {
    "AutoConfig": "EarlyBertConfig",
    "AutoModel": "EarlyBertModel",
    "AutoModelForPreTraining": "EarlyBertForPreTraining",
    "AutoModelForMaskedLM": "EarlyBertForMaskedLM",
    "AutoModelForSequenceClassification": "EarlyBertForSequenceClassification",
    "AutoModelForQuestionAnswering": "EarlyBertForQuestionAnswering",
}

#: Output fields that training reads beside Hugging Face's own (the task loss without the gates' term, MLM counts):
#: left out of the tuples that ``return_dict=False`` gives and of a ``Trainer``'s predictions, as ``BertFor*``.
TRAINING_EXTRAS = ("task_loss", "gate_penalty", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count")


class EarlyBertConfig(PretrainedConfig):
    """BERT configuration with optional per-layer head counts and FFN widths (a ticket-shaped model).

    ``num_attention_heads`` and ``intermediate_size`` describe the original (unpruned) model and fix the head size;
    ``heads_per_layer`` / ``intermediate_sizes`` (``None`` = unpruned) give each layer's actual shape.
    """

    model_type = "earlybert"
    keys_to_ignore_at_inference = list(TRAINING_EXTRAS)  # read by transformers.Trainer's prediction_step

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        heads_per_layer: list[int] | None = None,
        intermediate_sizes: list[int] | None = None,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        use_gates: bool = False,
        gate_l1_heads: float = 0.0,
        gate_l1_ffn: float = 0.0,
        use_nsp: bool = False,
        gradient_checkpointing_layers: bool = False,
        classifier_dropout: float | None = None,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.heads_per_layer = list(heads_per_layer) if heads_per_layer is not None else None
        self.intermediate_sizes = list(intermediate_sizes) if intermediate_sizes is not None else None
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.use_gates = use_gates
        self.gate_l1_heads = gate_l1_heads
        self.gate_l1_ffn = gate_l1_ffn
        self.use_nsp = use_nsp
        self.gradient_checkpointing_layers = gradient_checkpointing_layers
        self.classifier_dropout = classifier_dropout
        self.tie_word_embeddings = tie_word_embeddings
        for name, values, limit in (
            ("heads_per_layer", self.heads_per_layer, num_attention_heads),
            ("intermediate_sizes", self.intermediate_sizes, intermediate_size),
        ):
            if values is None:
                continue
            if len(values) != num_hidden_layers:
                raise ValueError(f"{name} has {len(values)} entries but the model has {num_hidden_layers} layers")
            if any(not 1 <= v <= limit for v in values):
                raise ValueError(f"{name}={values}: every layer needs between 1 and {limit}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_heads(self, layer: int) -> int:
        return self.heads_per_layer[layer] if self.heads_per_layer is not None else self.num_attention_heads

    def layer_ffn(self, layer: int) -> int:
        return self.intermediate_sizes[layer] if self.intermediate_sizes is not None else self.intermediate_size

    @property
    def is_pruned(self) -> bool:
        return self.heads_per_layer is not None or self.intermediate_sizes is not None


# ---- the slimming gates (the search stage) ---------------------------------------------------------------------

def new_gates(units: int, enabled: bool) -> nn.Parameter | None:
    """One gate per unit, all 1 at the start (``None`` for a model without gates)."""
    return nn.Parameter(torch.ones(units)) if enabled else None


def l1_term(gates: torch.Tensor, coef: float) -> torch.Tensor:
    """``coef * sum|gates|``, written so that its backward needs only ``sign(gates)``, never the gates themselves:
    under ZeRO-3 a gate is gathered only while its module runs, and this term's backward may run outside that
    window."""
    return coef * (gates.float() * gates.detach().float().sign()).sum()


def apply_gates(x: torch.Tensor, gates: nn.Parameter | None, coef: float, training: bool,
                shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` scaled by its units' gates (viewed as ``shape`` to broadcast), and their L1 term when training with one
    (else ``None``)."""
    if gates is None:
        return x, None
    return x * gates.to(x.dtype).view(shape), l1_term(gates, coef) if training and coef else None


# ---- the encoder ------------------------------------------------------------------------------------------------

class Embeddings(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``num_heads`` heads of the original head size; optional per-head gates."""

    def __init__(self, config: EarlyBertConfig, num_heads: int):
        super().__init__()
        self.num_heads, self.head_size = num_heads, config.head_size
        inner = num_heads * self.head_size
        self.qkv = nn.Linear(config.hidden_size, 3 * inner)
        self.dense = nn.Linear(inner, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attn_dropout = config.attention_probs_dropout_prob
        self.head_gates = new_gates(num_heads, config.use_gates)
        self.l1 = config.gate_l1_heads

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, output_attentions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The block's output, its gates' L1 term (``None`` unless training with one) and, with
        ``output_attentions``, the attention probabilities (batch, heads, seq, seq)."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)
        dropout = self.attn_dropout if self.training else 0.0
        probs = None
        if output_attentions:  # SDPA does not return the probabilities: computed as Hugging Face's eager attention
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)
            probs = F.dropout((scores if attn_mask is None else scores + attn_mask).softmax(-1), dropout)
            ctx = probs @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        ctx, penalty = apply_gates(ctx, self.head_gates, self.l1, self.training, (1, -1, 1, 1))  # (b, heads, t, hs)
        ctx = ctx.transpose(1, 2).reshape(b, t, self.num_heads * self.head_size)
        return self.LayerNorm(x + self.dropout(self.dense(ctx))), penalty, probs


class FeedForward(nn.Module):
    """The FFN block; ``ffn_gates`` (search stage) scale each intermediate neuron's activation."""

    def __init__(self, config: EarlyBertConfig, width: int):
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, width)
        self.act = ACT2FN[config.hidden_act]
        self.output = nn.Linear(width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.ffn_gates = new_gates(width, config.use_gates)
        self.l1 = config.gate_l1_ffn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output, and its gates' L1 term (``None`` unless training with one)."""
        h, penalty = apply_gates(self.act(self.intermediate(x)), self.ffn_gates, self.l1, self.training, (-1,))
        return self.LayerNorm(x + self.dropout(self.output(h))), penalty


class Layer(nn.Module):
    def __init__(self, config: EarlyBertConfig, index: int):
        super().__init__()
        self.attention = SelfAttention(config, config.layer_heads(index))
        self.ffn = FeedForward(config, config.layer_ffn(index))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, output_attentions: bool = False
                ) -> tuple[torch.Tensor | None, ...]:
        """The layer's output, its blocks' L1 terms (attention, FFN; ``None`` where there is none) and its attention
        probabilities (``None`` unless asked for)."""
        x, attention_l1, probs = self.attention(x, attn_mask, output_attentions)
        x, ffn_l1 = self.ffn(x)
        return x, attention_l1, ffn_l1, probs


class Encoder(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = config.gradient_checkpointing_layers

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> tuple[Any, ...]:
        """Hidden states; the gates' L1 penalty of this forward pass (``None`` unless training with it): returned
        by the layers, so a recomputation (activation checkpointing) cannot leave one behind; and, when asked for,
        every layer's input and output (the embeddings first) and every layer's attention probabilities."""
        penalties, hidden, attentions = [], [x] if output_hidden_states else None, [] if output_attentions else None
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                x, *l1, probs = checkpoint(layer, x, attn_mask, output_attentions, use_reentrant=False)
            else:
                x, *l1, probs = layer(x, attn_mask, output_attentions)
            penalties += [p for p in l1 if p is not None]
            if hidden is not None:
                hidden.append(x)
            if attentions is not None:
                attentions.append(probs)
        penalty = torch.stack(penalties).sum() if penalties else None
        return (x, penalty, None if hidden is None else tuple(hidden),
                None if attentions is None else tuple(attentions))


class EarlyBertPreTrainedModel(PreTrainedModel):
    config_class = EarlyBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Layer"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """As ``PreTrainedModel.from_pretrained``, except that a local Hugging Face BERT directory (``model_type``
        "bert") is converted with :func:`load_hf_bert`: loaded as it is, none of its weights would match this
        model's names, and every one would be random-initialised with only a warning."""
        config_file = Path(pretrained_model_name_or_path) / "config.json"
        try:
            is_bert = json.loads(config_file.read_text()).get("model_type") == "bert"
        except (OSError, ValueError, AttributeError):
            is_bert = False
        if not is_bert:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if args or kwargs:
            raise ValueError(f"{pretrained_model_name_or_path} is a Hugging Face BERT checkpoint (model_type 'bert'): "
                             f"{cls.__name__}.from_pretrained converts it only without further arguments (got "
                             f"{', '.join([*map(repr, args), *kwargs])}); use earlybert_ds.modeling.load_hf_bert(path, "
                             f"{cls.__name__}, **config_overrides)")
        return load_hf_bert(pretrained_model_name_or_path, cls)

    def save_pretrained(self, save_directory: str | Path, is_main_process: bool = True, **kwargs: Any) -> None:
        """As ``PreTrainedModel.save_pretrained``, plus this module's source beside the weights (:data:`CODE_FILE`)
        and config.json's ``auto_map`` naming it: plain ``transformers`` then loads the directory with
        ``trust_remote_code=True``, without this package."""
        self.config.auto_map = {auto: f"{Path(CODE_FILE).stem}.{name}" for auto, name in AUTO_MAP.items()}
        if is_main_process:  # before the weights: save_pretrained(..., push_to_hub=True) uploads when it is done
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(__file__, Path(save_directory) / CODE_FILE)
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, (SelfAttention, FeedForward)):
            for gate in (getattr(module, "head_gates", None), getattr(module, "ffn_gates", None)):
                if gate is not None:
                    gate.data.fill_(1.0)
        elif isinstance(module, MLMHead):
            module.bias.data.zero_()

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        self.base_model.encoder.gradient_checkpointing = enable

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self._set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_gradient_checkpointing(False)

    def _returned(self, out: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple:
        """``out``, or with ``return_dict=False`` (default: the config's) Hugging Face's tuple: its fields that are
        set, in order, without the :data:`TRAINING_EXTRAS`."""
        if self.config.return_dict if return_dict is None else return_dict:
            return out
        return tuple(v for k, v in out.items() if k not in TRAINING_EXTRAS)


def _sdpa_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, seq) 1/0 padding mask -> additive (batch, 1, 1, seq) mask; ``None`` when nothing is padded. Additive
    for both attention paths: SDPA, and the explicit one of ``output_attentions`` adds it to the scores. Whether
    anything is padded is read only off a host tensor: on a GPU it would stall every forward until the device
    catches up (``Engine`` drops an all-ones mask on the host, before the batch moves)."""
    if attention_mask is None or (attention_mask.device.type == "cpu" and bool(attention_mask.all())):
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@dataclass
class EncoderOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    gate_penalty: torch.Tensor | None = None


class EarlyBertModel(EarlyBertPreTrainedModel):
    """The bare encoder (embeddings, ticket-shaped layers, pooler).

    ``output_hidden_states``, ``output_attentions`` and ``return_dict`` (default: the config's) mean what they mean
    for Hugging Face's ``BertModel``; ``head_mask`` is refused (see :func:`_refuse_head_mask`).
    """

    _input_embed_layer = "word_embeddings"  # transformers' get/set_input_embeddings find embeddings.word_embeddings

    def __init__(self, config: EarlyBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> EncoderOutput | tuple:
        _refuse_head_mask(head_mask)
        c = self.config
        x = self.embeddings(input_ids, token_type_ids)
        x, penalty, hidden, attentions = self.encoder(
            x, _sdpa_mask(attention_mask, x.dtype),
            c.output_hidden_states if output_hidden_states is None else output_hidden_states,
            c.output_attentions if output_attentions is None else output_attentions)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        out = EncoderOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden, attentions=attentions,
                            gate_penalty=penalty)
        return self._returned(out, return_dict)


def _refuse_head_mask(head_mask: torch.Tensor | None) -> None:
    if head_mask is not None:
        raise ValueError("head_mask is not supported: a ticket-shaped model has its own number of heads in each "
                         "layer (and transformers 5's BERT takes no head_mask either); to remove heads, shrink the "
                         "model to a ticket (earlybert_ds.shrink) or build it with use_gates=True and set the "
                         "layers' head_gates to 0")


class MLMHead(nn.Module):
    """Transform + decoder tied to the word embeddings (Hugging Face's ``cls.predictions``)."""

    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.act(self.dense(h)))) + self.bias


@dataclass
class PreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    mlm_correct: torch.Tensor | None = None
    mlm_count: torch.Tensor | None = None
    gate_penalty: torch.Tensor | None = None


def _add_penalty(loss: torch.Tensor | None, penalty: torch.Tensor | None) -> torch.Tensor | None:
    """The training objective: the task loss plus the gates' L1 term (search stage only)."""
    return loss if loss is None or penalty is None else loss + penalty


class EarlyBertForPreTraining(EarlyBertPreTrainedModel):
    """Masked LM, and next-sentence prediction when ``config.use_nsp`` (Hugging Face's ``BertForPreTraining``).

    With ``labels`` the decoder runs only at the masked positions: over a 30k vocabulary it would otherwise be a
    large share of the step's FLOPs. ``logits`` are then (num_masked, vocab), in the order of
    ``labels[labels != -100]``; without labels, (batch, seq, vocab).
    """

    _tied_weights_keys = {"cls.decoder.weight": "bert.embeddings.word_embeddings.weight"}
    _next_sentence = True  # EarlyBertForMaskedLM: never

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        nsp = config.use_nsp and self._next_sentence
        self.bert = EarlyBertModel(config, add_pooling_layer=nsp)
        self.cls = MLMHead(config)
        self.nsp = nn.Linear(config.hidden_size, 2) if nsp else None
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.cls.decoder = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        *,
        masked_positions: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> PreTrainingOutput | tuple:
        """``masked_positions``: the flat indices of ``labels != -100`` (:func:`mlm_positions`), found on the host
        before the batch moves; without them they are found here, which on a GPU waits for the device (the
        selection's size depends on the data)."""
        out = self.bert(input_ids, attention_mask, token_type_ids, head_mask=head_mask,
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                        return_dict=True)
        h = out.last_hidden_state
        nsp_logits = self.nsp(out.pooler_output) if self.nsp is not None else None
        if labels is None:
            return self._returned(PreTrainingOutput(logits=self.cls(h), nsp_logits=nsp_logits,
                                                    hidden_states=out.hidden_states, attentions=out.attentions),
                                  return_dict)
        if masked_positions is None:
            masked_positions = mlm_positions(labels)
        targets = labels.view(-1).index_select(0, masked_positions)
        logits = self.cls(h.flatten(0, 1).index_select(0, masked_positions))
        scores = logits.float()  # exact; and torch's CPU argmax is 4x slower on bf16 than on fp32
        mlm_loss = F.cross_entropy(scores, targets, reduction="sum") / max(targets.numel(), 1)
        loss, nsp_loss = mlm_loss, None
        if nsp_logits is not None and next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label)
            loss = loss + nsp_loss
        return self._returned(PreTrainingOutput(
            loss=_add_penalty(loss, out.gate_penalty),
            logits=logits,
            nsp_logits=nsp_logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            mlm_loss=mlm_loss.detach(),
            nsp_loss=None if nsp_loss is None else nsp_loss.detach(),
            mlm_correct=(scores.argmax(-1) == targets).sum().detach(),
            mlm_count=torch.full((), targets.numel(), device=logits.device),  # no copy from the host
            gate_penalty=None if out.gate_penalty is None else out.gate_penalty.detach(),
        ), return_dict)


class EarlyBertForMaskedLM(EarlyBertForPreTraining):
    """The masked LM alone (Hugging Face's ``BertForMaskedLM``): ``labels`` is its only label argument, so that a
    ``transformers.Trainer`` evaluating it computes ``eval_loss`` (it computes a loss only when every argument named
    like a label is in the batch). Its weights are those of :class:`EarlyBertForPreTraining` without NSP."""

    _next_sentence = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        masked_positions: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> PreTrainingOutput | tuple:
        return super().forward(input_ids, attention_mask, token_type_ids, labels, masked_positions=masked_positions,
                               head_mask=head_mask, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=return_dict)


@dataclass
class TaskOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    task_loss: torch.Tensor | None = None
    gate_penalty: torch.Tensor | None = None


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sequence head's loss: cross-entropy over classes, mean squared error with one label (regression)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


class EarlyBertForSequenceClassification(EarlyBertPreTrainedModel):
    """Pooled [CLS] -> dropout -> linear; regression when ``num_labels == 1`` (e.g. STS-B)."""

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = EarlyBertModel(config, add_pooling_layer=True)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> TaskOutput | tuple:
        out = self.bert(input_ids, attention_mask, token_type_ids, head_mask=head_mask,
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                        return_dict=True)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None if labels is None else classification_loss(logits, labels)
        return self._returned(TaskOutput(loss=_add_penalty(loss, out.gate_penalty), logits=logits,
                                         hidden_states=out.hidden_states, attentions=out.attentions, task_loss=loss,
                                         gate_penalty=out.gate_penalty), return_dict)


class EarlyBertForQuestionAnswering(EarlyBertPreTrainedModel):
    """Extractive QA: start/end logits per token (SQuAD)."""

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        self.bert = EarlyBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        *,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> TaskOutput | tuple:
        out = self.bert(input_ids, attention_mask, token_type_ids, head_mask=head_mask,
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                        return_dict=True)
        start, end = self.qa_outputs(out.last_hidden_state).float().unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            n = start.shape[1]
            loss = (
                F.cross_entropy(start, start_positions.clamp(0, n - 1))
                + F.cross_entropy(end, end_positions.clamp(0, n - 1))
            ) / 2
        return self._returned(TaskOutput(loss=_add_penalty(loss, out.gate_penalty), start_logits=start,
                                         end_logits=end, hidden_states=out.hidden_states, attentions=out.attentions,
                                         task_loss=loss, gate_penalty=out.gate_penalty), return_dict)


AutoConfig.register(EarlyBertConfig.model_type, EarlyBertConfig)
AutoModel.register(EarlyBertConfig, EarlyBertModel)
AutoModelForPreTraining.register(EarlyBertConfig, EarlyBertForPreTraining)
AutoModelForMaskedLM.register(EarlyBertConfig, EarlyBertForMaskedLM)
AutoModelForSequenceClassification.register(EarlyBertConfig, EarlyBertForSequenceClassification)
AutoModelForQuestionAnswering.register(EarlyBertConfig, EarlyBertForQuestionAnswering)


# --------------------------------------------------------------------------------------------------------------
# Import from a Hugging Face BERT checkpoint directory
# --------------------------------------------------------------------------------------------------------------

_BERT_CONFIG_FIELDS = (
    "vocab_size hidden_size num_hidden_layers num_attention_heads intermediate_size hidden_act hidden_dropout_prob "
    "attention_probs_dropout_prob max_position_embeddings type_vocab_size initializer_range layer_norm_eps "
    "pad_token_id"
).split()


def _read_checkpoint_dir(path: str | Path, weights: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and (with ``weights``) the state dict of a local Hugging Face BERT checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no config.json, so this is not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from e
    if config.get("model_type") != "bert":
        raise ValueError(f"{path}: model_type is {config.get('model_type')!r}, not a BERT checkpoint ('bert')")
    if not weights:
        return config, {}
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin weights found")
    return config, state


def _convert_hf_state(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BERT state dict to this module's names (fusing q/k/v) under the ``bert.`` prefix."""
    state = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("embeddings.") and "position_ids" not in k:
            out["bert." + k] = v
        elif k.startswith("pooler.dense."):
            out["bert.pooler." + k.split(".")[-1]] = v
        elif k.startswith("cls.predictions.transform.dense."):
            out["cls.dense." + k.split(".")[-1]] = v
        elif k.startswith("cls.predictions.transform.LayerNorm."):
            out["cls.LayerNorm." + k.split(".")[-1]] = v
        elif k in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
            out["cls.bias"] = v
        elif k.startswith("cls.seq_relationship."):
            out["nsp." + k.split(".")[-1]] = v
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attention.qkv.{kind}"] = torch.cat(
                [state[f"{src}attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            out[f"{dst}attention.dense.{kind}"] = state[f"{src}attention.output.dense.{kind}"]
            out[f"{dst}attention.LayerNorm.{kind}"] = state[f"{src}attention.output.LayerNorm.{kind}"]
            out[f"{dst}ffn.intermediate.{kind}"] = state[f"{src}intermediate.dense.{kind}"]
            out[f"{dst}ffn.output.{kind}"] = state[f"{src}output.dense.{kind}"]
            out[f"{dst}ffn.LayerNorm.{kind}"] = state[f"{src}output.LayerNorm.{kind}"]
    return out


def hf_bert_config(path: str | Path, **overrides) -> EarlyBertConfig:
    """An :class:`EarlyBertConfig` (unpruned) for a local Hugging Face BERT checkpoint directory."""
    hf_config, _ = _read_checkpoint_dir(path, weights=False)
    return EarlyBertConfig(**{**{k: hf_config[k] for k in _BERT_CONFIG_FIELDS if k in hf_config}, **overrides})


def load_hf_bert(
    path: str | Path, model_class: type[EarlyBertPreTrainedModel] = EarlyBertForPreTraining, **config_overrides
) -> EarlyBertPreTrainedModel:
    """Build ``model_class`` from a local Hugging Face ``BertModel`` / ``BertForPreTraining`` / ``BertForMaskedLM``
    checkpoint directory. Weights the checkpoint lacks (e.g. the MLM head of a sentence encoder, a new task head)
    keep their fresh initialisation and are logged. ``config_overrides`` (e.g. ``use_gates=True``, ``num_labels``)
    go to :class:`EarlyBertConfig`.
    """
    config = hf_bert_config(path, **config_overrides)
    model = model_class(config)
    _, state = _read_checkpoint_dir(path, weights=True)
    try:
        converted = _convert_hf_state(state, config.num_hidden_layers)
    except KeyError as e:
        raise ValueError(f"{path}: weights do not look like a BERT encoder (missing {e})") from e
    prefix = "" if isinstance(model, EarlyBertModel) else "bert."
    if prefix == "":
        converted = {k[len("bert."):]: v for k, v in converted.items() if k.startswith("bert.")}
    own = model.state_dict()
    loadable = {k: v for k, v in converted.items() if k in own}
    for k, v in loadable.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{path}: weight {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    missing, _ = model.load_state_dict(loadable, strict=False)
    fresh = [k for k in missing if not k.endswith(("_gates",)) and k != "cls.decoder.weight"]
    if fresh:
        logger.info("%s: %d tensors not in the checkpoint were freshly initialised: %s", path, len(fresh), fresh)
    model.tie_weights()
    return model
