"""A BERT encoder whose shape can follow an EarlyBERT ticket.

Each layer may have its own number of attention heads and its own FFN width (the head size stays that of the
original model), so a shrunk model is a *physically* smaller network with smaller matrices. With
``config.use_gates`` the model carries the slimming gates of the search stage: one scalar per head (scaling that
head's context before the output projection) and one per FFN neuron (scaling the activation).

The parameter names follow Hugging Face's BERT where they can (``embeddings.*``, ``encoder.layer.N.*``), except
that query, key and value are one fused ``qkv`` projection (one GEMM instead of three);
:func:`load_hf_bert` converts a Hugging Face BERT checkpoint directory.
"""

from __future__ import annotations

import json
import logging
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

from .config import ConfigError, RunConfig
from .data import masked_positions as find_masked_positions
from .search import apply_gates, new_gates

logger = logging.getLogger(__name__)



class EarlyBertConfig(PretrainedConfig):
    """BERT configuration with optional per-layer head counts and FFN widths (a ticket-shaped model).

    ``num_attention_heads`` and ``intermediate_size`` describe the original (unpruned) model and fix the head size;
    ``heads_per_layer`` / ``intermediate_sizes`` (``None`` = unpruned) give each layer's actual shape.
    """

    model_type = "earlybert"

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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output, and its gates' L1 term (``None`` unless training with one)."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (b, heads, t, head_size)
        ctx, penalty = apply_gates(ctx, self.head_gates, self.l1, self.training, (1, -1, 1, 1))
        ctx = ctx.transpose(1, 2).reshape(b, t, self.num_heads * self.head_size)
        return self.LayerNorm(x + self.dropout(self.dense(ctx))), penalty


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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The layer's output and its blocks' L1 terms (attention, FFN; ``None`` where there is none)."""
        x, attention_l1 = self.attention(x, attn_mask)
        x, ffn_l1 = self.ffn(x)
        return x, attention_l1, ffn_l1


class Encoder(nn.Module):
    def __init__(self, config: EarlyBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = config.gradient_checkpointing_layers

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states, and the gates' L1 penalty of this forward pass (``None`` unless training with it): returned
        by the layers, so a recomputation (activation checkpointing) cannot leave one behind."""
        penalties = []
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                x, *l1 = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x, *l1 = layer(x, attn_mask)
            penalties += [p for p in l1 if p is not None]
        return x, (torch.stack(penalties).sum() if penalties else None)


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


def _sdpa_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, seq) 1/0 padding mask -> additive (batch, 1, 1, seq) mask; ``None`` when nothing is padded. Whether
    anything is padded is read only off a host tensor: on a GPU it would stall every forward until the device
    catches up (``Engine`` drops an all-ones mask on the host, before the batch moves)."""
    if attention_mask is None or (attention_mask.device.type == "cpu" and bool(attention_mask.all())):
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@dataclass
class EncoderOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    gate_penalty: torch.Tensor | None = None


class EarlyBertModel(EarlyBertPreTrainedModel):
    """The bare encoder (embeddings, ticket-shaped layers, pooler)."""

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
        **_: object,
    ) -> EncoderOutput:
        x = self.embeddings(input_ids, token_type_ids)
        x, penalty = self.encoder(x, _sdpa_mask(attention_mask, x.dtype))
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return EncoderOutput(last_hidden_state=x, pooler_output=pooled, gate_penalty=penalty)


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
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mlm_correct: torch.Tensor | None = None
    mlm_count: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None
    gate_penalty: torch.Tensor | None = None


def _add_penalty(loss: torch.Tensor | None, penalty: torch.Tensor | None) -> torch.Tensor | None:
    """The training objective: the task loss plus the gates' L1 term (search stage only)."""
    return loss if loss is None or penalty is None else loss + penalty


class EarlyBertForPreTraining(EarlyBertPreTrainedModel):
    """Masked LM (and next-sentence prediction when ``config.use_nsp``).

    With ``labels`` the decoder runs only at the masked positions: over a 30k vocabulary it would otherwise be a
    large share of the step's FLOPs. ``logits`` are then (num_masked, vocab); without labels, (batch, seq, vocab).
    """

    _tied_weights_keys = {"cls.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        self.bert = EarlyBertModel(config, add_pooling_layer=config.use_nsp)
        self.cls = MLMHead(config)
        self.nsp = nn.Linear(config.hidden_size, 2) if config.use_nsp else None
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
        masked_positions: torch.Tensor | None = None,
        **_: object,
    ) -> PreTrainingOutput:
        """``masked_positions``: the flat indices of ``labels != -100`` (:func:`~earlybert_ds.data.masked_positions`),
        computed on the host before the batch moves; without them they are found here, which on a GPU waits for
        the device (a selection's size is data-dependent)."""
        out = self.bert(input_ids, attention_mask, token_type_ids)
        h = out.last_hidden_state
        nsp_logits = self.nsp(out.pooler_output) if self.nsp is not None else None
        if labels is None:
            return PreTrainingOutput(logits=self.cls(h), nsp_logits=nsp_logits)
        if masked_positions is None:
            masked_positions = find_masked_positions(labels)
        targets = labels.view(-1).index_select(0, masked_positions)
        logits = self.cls(h.flatten(0, 1).index_select(0, masked_positions))
        scores = logits.float()  # exact; and torch's CPU argmax is 4x slower on bf16 than on fp32
        mlm_loss = F.cross_entropy(scores, targets, reduction="sum") / max(targets.numel(), 1)
        loss, nsp_loss = mlm_loss, None
        if nsp_logits is not None and next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label)
            loss = loss + nsp_loss
        return PreTrainingOutput(
            loss=_add_penalty(loss, out.gate_penalty),
            gate_penalty=None if out.gate_penalty is None else out.gate_penalty.detach(),
            mlm_loss=mlm_loss.detach(),
            nsp_loss=None if nsp_loss is None else nsp_loss.detach(),
            logits=logits,
            mlm_correct=(scores.argmax(-1) == targets).sum().detach(),
            mlm_count=torch.full((), targets.numel(), device=logits.device),  # no copy from the host
            nsp_logits=nsp_logits,
        )


@dataclass
class TaskOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    task_loss: torch.Tensor | None = None
    gate_penalty: torch.Tensor | None = None


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
        **_: object,
    ) -> TaskOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
        return TaskOutput(loss=_add_penalty(loss, out.gate_penalty), logits=logits, task_loss=loss,
                          gate_penalty=out.gate_penalty)


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
        **_: object,
    ) -> TaskOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids)
        start, end = self.qa_outputs(out.last_hidden_state).float().unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            n = start.shape[1]
            loss = (
                F.cross_entropy(start, start_positions.clamp(0, n - 1))
                + F.cross_entropy(end, end_positions.clamp(0, n - 1))
            ) / 2
        return TaskOutput(loss=_add_penalty(loss, out.gate_penalty), start_logits=start, end_logits=end,
                          task_loss=loss, gate_penalty=out.gate_penalty)


AutoConfig.register(EarlyBertConfig.model_type, EarlyBertConfig)
AutoModel.register(EarlyBertConfig, EarlyBertModel)
AutoModelForPreTraining.register(EarlyBertConfig, EarlyBertForPreTraining)
AutoModelForMaskedLM.register(EarlyBertConfig, EarlyBertForPreTraining)
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


# --------------------------------------------------------------------------------------------------------------
# The run's initial model
# --------------------------------------------------------------------------------------------------------------

def _model_overrides(cfg: RunConfig, task: Any, gates: bool) -> dict[str, Any]:
    e = cfg.earlybert
    return dict(use_gates=gates, gate_l1_heads=e.l1_heads if gates else 0.0, gate_l1_ffn=e.l1_ffn if gates else 0.0,
                hidden_dropout_prob=cfg.model.dropout, attention_probs_dropout_prob=cfg.model.dropout,
                gradient_checkpointing_layers=cfg.train.activation_checkpointing, **task.model_overrides)


def initial_config(cfg: RunConfig, task: Any, gates: bool = True) -> EarlyBertConfig:
    """The unpruned model's configuration: ``model.init_from``'s, or the ``model.*`` shape."""
    m, extra = cfg.model, _model_overrides(cfg, task, gates)
    vocab = len(task.tokenizer)
    if not m.init_from:
        return EarlyBertConfig(vocab_size=vocab, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                               num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
                               max_position_embeddings=max(512, cfg.data.seq_len), **extra)
    config = hf_bert_config(m.init_from, **extra) if _is_hf_bert(m.init_from) else \
        EarlyBertConfig.from_pretrained(m.init_from, **extra)
    if config.vocab_size != vocab:
        raise ConfigError(f"model.init_from={m.init_from} has a vocabulary of {config.vocab_size}, the tokenizer "
                          f"{vocab}: pass the checkpoint's tokenizer with --data.tokenizer")
    if config.is_pruned and cfg.earlybert.enabled:
        raise ConfigError(f"model.init_from={m.init_from} is already shrunk to a ticket; train it with "
                          "--earlybert.enabled false")
    return config


def initial_model(cfg: RunConfig, task: Any, gates: bool) -> EarlyBertPreTrainedModel:
    """The model at step 0 of ``task`` (its ``model_class``, ``model_overrides`` and ``tokenizer``), identical on
    every rank and rebuildable at any time (rewinding needs it again): the ``model.init_from`` checkpoint (new heads
    initialised from ``train.seed``), or a random initialisation."""
    config = initial_config(cfg, task, gates)
    init_from = cfg.model.init_from
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        if not init_from:
            return task.model_class(config)
        if _is_hf_bert(init_from):
            return load_hf_bert(init_from, task.model_class, **_model_overrides(cfg, task, gates))
        return task.model_class.from_pretrained(init_from, config=config)


def _is_hf_bert(path: str) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "bert"
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.init_from={path}: not a model directory with a readable config.json ({e})") from e
