"""EarlyBERT on DeepSpeed: search with slimming gates, draw an early-bird ticket, train the physically shrunk BERT."""

from .modeling import (
    EarlyBertConfig,
    EarlyBertForMaskedLM,
    EarlyBertForPreTraining,
    EarlyBertForQuestionAnswering,
    EarlyBertForSequenceClassification,
    EarlyBertModel,
    load_hf_bert,
)
from .shrink import shrink
from .ticket import PruneSpec, Ticket

__version__ = "0.1.0"
__all__ = [
    "EarlyBertConfig", "EarlyBertModel", "EarlyBertForMaskedLM", "EarlyBertForPreTraining",
    "EarlyBertForSequenceClassification", "EarlyBertForQuestionAnswering", "load_hf_bert", "shrink", "PruneSpec",
    "Ticket",
]
