"""The model card (``README.md``) saved with a model, as on the Hugging Face Hub: what the model is, the shape of its
ticket, how it was trained, and how to load it with plain ``transformers``."""

from __future__ import annotations

from pathlib import Path

from . import distributed as dist
from .checkpoint import TICKET_DIR
from .dsconfig import plan_ds
from .flops import count_parameters
from .hardware import this_machine
from .modeling import CODE_FILE, EarlyBertConfig
from .ticket import Ticket
from .trainer import Run

PAPER = "https://aclanthology.org/2021.acl-long.171/"
OFFICIAL_CODE = "https://github.com/VITA-Group/EarlyBERT"

#: Per model class: the Hugging Face pipeline tag, the Auto class, and lines of code that use the model.
_FILL = ['fill = pipeline("fill-mask", model=path, trust_remote_code=True)', 'fill("Paris is the {mask} of France.")']
_USE = {
    "EarlyBertForMaskedLM": ("fill-mask", "AutoModelForMaskedLM", _FILL),
    "EarlyBertForPreTraining": ("fill-mask", "AutoModelForMaskedLM", _FILL),
    "EarlyBertForSequenceClassification": (
        "text-classification", "AutoModelForSequenceClassification",
        ['classify = pipeline("text-classification", model=path, trust_remote_code=True)',
         'classify("A sentence to classify.")']),
    "EarlyBertForQuestionAnswering": (  # transformers 5 has no question-answering pipeline
        "question-answering", "AutoModelForQuestionAnswering",
        ['inputs = tokenizer("Where is the tower?", "The tower is in Paris.", return_tensors="pt")',
         "out = model(**inputs)  # out.start_logits, out.end_logits: the answer span's scores"]),
}
_WEIGHTS = {"rewind": "restarted from their values at step 0 (`rewind`)",
            "continue": "continued from the search, gates folded in (`continue`)"}


def model_card(run: Run, where: Path, config: EarlyBertConfig, full_config: EarlyBertConfig, ticket: Ticket | None,
               metrics: dict[str, float] | None = None) -> str:
    """The card of the model saved in ``where`` (``OUTPUT/final`` after training with ``metrics``, or
    ``OUTPUT/ticket``, the efficient stage's starting point)."""
    cfg, model_class = run.cfg, run.task.model_class
    tag, auto, example = _USE[model_class.__name__]
    trained = f"fine-tuning on `{cfg.finetune.task}`" if cfg.finetune.task else "masked-LM pre-training"
    if where.name == TICKET_DIR:
        what = (f"The starting point of EarlyBERT's efficient training in a run of {trained}: the model shrunk to "
                f"the ticket drawn at step {ticket.step} of the search, with the weights that training starts from. "
                "The trained model is the run's final/ directory.")
    elif ticket:
        what = f"A BERT encoder shrunk to an EarlyBERT ticket and trained: {run.step} steps of {trained}."
    else:
        what = f"A BERT encoder trained in full (EarlyBERT's baseline, no ticket): {run.step} steps of {trained}."
    full_params, params = count_parameters(full_config, model_class), count_parameters(config, model_class)
    lines = [
        "---", "library_name: transformers", f"pipeline_tag: {tag}", "tags:", "- bert", "- earlybert",
        *(["- pruned"] if ticket else []), "---", "",
        f"# {run.out.name} ({where.name})", "",
        what, "",
        f"EarlyBERT ([Chen et al., ACL 2021]({PAPER}); [official code]({OFFICIAL_CODE})) trains slimming gates on "
        "every attention head and FFN neuron for a few steps, draws an early-bird ticket from them (the units to "
        "keep), and trains the physically smaller network. Trained with earlybert_ds on DeepSpeed.", "",
        "## Shape", "",
        "| | layers | heads per layer | FFN width per layer | parameters |", "|---|---|---|---|---|",
        f"| unpruned | {full_config.num_hidden_layers} | {full_config.num_attention_heads} | "
        f"{full_config.intermediate_size} | {full_params:,} |",
        f"| this model | {config.num_hidden_layers} | {_per_layer(config.heads_per_layer, config.num_attention_heads)} "
        f"| {_per_layer(config.intermediate_sizes, config.intermediate_size)} | {params:,} "
        f"({params / full_params:.1%}) |", "",
        f"Hidden size {config.hidden_size}, head size {config.head_size}, vocabulary {config.vocab_size}.",
    ]
    if ticket:
        e = cfg.earlybert
        how = {"random": "at random", "given": f"elsewhere ({e.ticket})"}.get(ticket.reason, f"from `{e.score}` scores")
        lines += ["", f"The ticket was drawn at step {ticket.step} ({ticket.reason}) {how}: "
                      f"{ticket.spec.head_ratio:.0%} of the heads pruned ({ticket.spec.head_method}), "
                      f"{ticket.spec.ffn_ratio:.0%} of the FFN neurons ({ticket.spec.ffn_method}); the kept weights "
                      f"{_WEIGHTS[e.weights]}. It is `ticket.json` in the run's ticket/ directory."]
    t = cfg.train
    batch = t.micro_batch_size * t.grad_accum * dist.world_size()
    data = (cfg.finetune.train_file or cfg.finetune.data) if cfg.finetune.task else \
        (cfg.data.corpus or "the built-in corpus (the docstrings and comments of Python's standard library)")
    lines += [
        "", "## Training", "",
        f"- started from: {cfg.model.init_from or 'a random initialisation'}",
        f"- data: {data}",
        f"- {t.steps} optimizer steps in all, global batch {batch} ({t.micro_batch_size} per rank x {t.grad_accum} "
        f"accumulated x {dist.world_size()} ranks), {t.optimizer}, peak learning rate {t.lr:g}, "
        f"{t.warmup_steps} warm-up steps, {t.schedule} decay, weight decay {t.weight_decay:g}",
        f"- {plan_ds(cfg, dist.world_size(), this_machine()).describe_precision()}, seed {t.seed}",
        "- every setting: `run_config.json` in the run's output directory",
    ]
    if metrics:
        lines += ["", "## Final evaluation", "", "| metric | value |", "|---|---|",
                  *(f"| {k} | {v:.4g} |" for k, v in metrics.items())]
    lines += [
        "", "## Loading", "",
        f"The model's code is `{CODE_FILE}` beside the weights (config.json's `auto_map` names it), so plain "
        "`transformers` loads it with `trust_remote_code=True` (read that file first: it runs on loading); after "
        "`import earlybert_ds` the classes are registered and it is not needed.", "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer" + (", pipeline" if "pipeline" in example[0] else ""), "",
        f'path = "{where}"',
        f"model = {auto}.from_pretrained(path, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        *(line.format(mask=run.task.tokenizer.mask_token) for line in example),
        "```",
    ]
    return "\n".join(lines) + "\n"


def _per_layer(values: list[int] | None, unpruned: int) -> str:
    return ", ".join(map(str, values)) if values is not None else str(unpruned)
