"""The run config: files and the command line load into one object, and anything malformed is a ConfigError that
names the field — never a crash deeper in the program (fuzzed with hypothesis)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earlybert_ds.config import ConfigError, RunConfig, all_fields, load_config_file

FIELDS = sorted(all_fields())
SECTIONS = sorted({k.split(".")[0] for k in FIELDS if "." in k})
values = (st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(max_size=12) | st.lists(st.floats(0, 1), max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                          st.integers(), max_size=2))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS + ["bogus", "train.lrr"]), values, max_size=6))
def test_fuzzed_configs_load_or_fail_with_config_error(flat):
    nested: dict = {}
    for key, value in flat.items():
        if "." in key:
            sec, name = key.split(".")
            nested.setdefault(sec, {})[name] = value
        else:
            nested[key] = value
    try:
        cfg = RunConfig.from_dict(nested)
    except ConfigError as e:
        assert any(k in str(e) for k in (*FIELDS, *SECTIONS, "bogus")), e  # the message names the field
        return
    try:  # whatever loads settles its budget consistently, or says why it cannot
        cfg.resolve()
    except ConfigError as e:
        assert "train.steps" in str(e), e
        return
    assert cfg.train.warmup_steps <= cfg.train.steps and cfg.train.micro_batch_size >= 1


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(SECTIONS), values)
def test_sections_must_be_mappings(section, value):
    if isinstance(value, dict):
        return
    with pytest.raises(ConfigError, match=f"section '{section}' must be a mapping"):
        RunConfig.from_dict({section: value})


def test_round_trip_and_file_formats(tmp_path):
    cfg = RunConfig.from_dict({"train": {"lr": 3e-4, "betas": [0.9, 0.95]}, "earlybert": {"draw": "fixed",
                                                                                         "fixed_step": 50}})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg and cfg.train.betas == (0.9, 0.95)
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.0003\n")
    (tmp_path / "c.json").write_text('{"train": {"lr": 0.0003}}')
    assert load_config_file(tmp_path / "c.yaml") == load_config_file(tmp_path / "c.json")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot parse config"):
        load_config_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config_file(tmp_path / "missing.yaml")


def test_every_field_has_help():
    assert all(f.metadata.get("help") for f in all_fields().values() if not dataclasses.is_dataclass(f.type))


@pytest.mark.parametrize("key, value", [("model.num_heads", 0), ("model.hidden_size", -8), ("model.dropout", 1.0),
                                        ("data.vocab_size", 0), ("train.seed", -1), ("train.eps", 0.0),
                                        ("earlybert.l1_ffn", -1e-4), ("finetune.epochs", 0.0),
                                        ("finetune.num_labels", 0), ("train.warmup_ratio", 1.0)])
def test_out_of_range_values_name_their_field(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"^{key}={value}"):
        RunConfig.from_dict({section: {name: value}})


BOUNDED = sorted((k, f.metadata["bounds"]) for k, f in all_fields().items() if f.metadata.get("bounds"))


@pytest.mark.parametrize("key, bounds", BOUNDED, ids=[k for k, _ in BOUNDED])
def test_each_declared_range_is_enforced_at_its_edges(key, bounds):
    section, name = key.split(".")
    edge = bounds.get("ge", bounds.get("gt"))
    outside = [edge if "gt" in bounds else edge - 1e-9 if isinstance(edge, float) else edge - 1]
    if "lt" in bounds:
        outside.append(bounds["lt"])
    if "le" in bounds:
        outside.append(bounds["le"] + 1e-9)
    for value in outside:
        with pytest.raises(ConfigError, match=rf"^{key}="):
            RunConfig.from_dict({section: {name: value}})
    cfg = RunConfig()  # set in code, not loaded: validate() still holds it to the declared range
    setattr(getattr(cfg, section), name, outside[0])
    with pytest.raises(ConfigError, match=rf"^{key}="):
        cfg.validate()


def test_taylor_decay_needs_the_taylor_score():
    assert RunConfig.from_dict({"earlybert": {"score": "taylor", "taylor_decay": 1.0}}).earlybert.taylor_decay == 1.0
    with pytest.raises(ConfigError, match=r"^earlybert.taylor_decay=1.5 must be in \(0, 1\]"):
        RunConfig.from_dict({"earlybert": {"score": "taylor", "taylor_decay": 1.5}})
    with pytest.raises(ConfigError, match="earlybert.taylor_decay=0.9 needs earlybert.score=taylor"):
        RunConfig.from_dict({"earlybert": {"taylor_decay": 0.9}})


def test_zero_stage_parses_from_the_command_line_and_refuses_booleans():
    assert RunConfig.from_dict({"train": {"zero_stage": "2"}}).train.zero_stage == 2
    for bad in (True, 4, "three"):
        with pytest.raises(ConfigError, match="train.zero_stage=.* must be one of 0, 1, 2, 3"):
            RunConfig.from_dict({"train": {"zero_stage": bad}})


def test_resolve_settles_derived_fields_once_then_freezes():
    cfg = RunConfig.from_dict({"train": {"micro_batch_size": 8, "steps": None, "warmup_ratio": 0.1},
                               "finetune": {"epochs": 2.0, "search_epochs": 0.5}})
    assert cfg.resolve(epoch_examples=100, world_size=2) is cfg  # 100 / (8 x 2) -> 7 steps per epoch
    assert (cfg.train.steps, cfg.earlybert.max_search_steps, cfg.train.warmup_steps) == (14, 4, 1)
    assert cfg.earlybert.detect_every == 1  # 4 // (2 x (window 5 + 1)), at least 1
    for section, name in (("train", "steps"), ("earlybert", "detect_every")):
        with pytest.raises(dataclasses.FrozenInstanceError, match="resolved and frozen"):
            setattr(getattr(cfg, section), name, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.output_dir = "elsewhere"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # what is saved loads back, unfrozen
    steps_only = RunConfig().resolve()  # pre-training: the budget is in steps, nothing to settle but the schedule
    assert steps_only.train.steps == RunConfig().train.steps


def test_resolve_refuses_derived_values_that_break_a_constraint():
    cfg = RunConfig.from_dict({"train": {"warmup_steps": 30, "steps": None}, "finetune": {"epochs": 0.01}})
    with pytest.raises(ConfigError, match="train.warmup_steps=30 exceeds train.steps=2"):
        cfg.resolve(epoch_examples=8)


def test_from_dict_takes_sections_or_dotted_keys_alike():
    dotted = RunConfig.from_dict({"data.vocab_size": 600, "log.progress": False, "train": {"lr": 0.5}})
    nested = RunConfig.from_dict({"data": {"vocab_size": 600}, "log": {"progress": False}, "train": {"lr": 0.5}})
    assert dotted == nested and dotted.given == nested.given == {"data.vocab_size", "log.progress", "train.lr"}
    with pytest.raises(ConfigError, match="unknown field 'data.vocab'"):
        RunConfig.from_dict({"data.vocab": 600})


# ---- recipes, the global batch, budgets in fractions ----------------------------------------------------------

def _cli(command: str, *argv: str) -> RunConfig:
    from earlybert_ds.cli import parse

    return parse([command, *argv])[1]


@pytest.fixture
def finetune_args(minilm_dir) -> tuple[str, ...]:
    return "--task", "sst2", "--model", str(minilm_dir)


@pytest.mark.parametrize("command, recipe, published, splits", [
    # BERT (Devlin et al. 2019) phase 1: 256 x 128 tokens, Adam lr 1e-4, 10k warm-up; 900k of its 1M steps
    ("pretrain", "bert_base", dict(steps=900000, global_batch_size=256, lr=1e-4, warmup=10000, optimizer="adamw",
                                   betas=(0.9, 0.999), seq_len=128, hidden=768, layers=12),
     {1: (32, 8), 8: (32, 1), 64: (4, 1)}),
    # NVIDIA's BERT-large LAMB phase 1: 65,536 x 128 tokens, lr 6e-3, 28.43% warm-up (2,000 steps) of 7,038
    ("pretrain", "bert_large", dict(steps=7038, global_batch_size=65536, lr=6e-3, warmup=2000, optimizer="lamb",
                                    betas=(0.9, 0.999), seq_len=128, hidden=1024, layers=24),
     {1: (64, 1024), 8: (64, 128), 64: (64, 16)}),
    # BERT's GLUE fine-tuning: 32 per step over all ranks, 3 epochs, lr 2e-5, 10% warm-up (SST-2: 67,349 examples)
    ("finetune", "glue", dict(steps=6315, global_batch_size=32, lr=2e-5, warmup=631, optimizer="adamw",
                              betas=(0.9, 0.999)), {1: (32, 1), 8: (4, 1), 32: (1, 1)}),
    ("finetune", "squad", dict(steps=6315, global_batch_size=32, lr=5e-5, warmup=631, optimizer="adamw",
                               betas=(0.9, 0.999)), {1: (32, 1), 8: (4, 1), 16: (2, 1)}),
])
def test_recipes_load_and_validate(command, recipe, published, splits, finetune_args):
    """Each shipped recipe loads by name for its command, holds the published numbers, and splits its global batch
    on 1, 8 and more ranks into micro-batches of at most its per-rank maximum."""
    argv = ["--config", recipe, *(finetune_args if command == "finetune" else ())]
    for world, (micro, accum) in splits.items():
        cfg = _cli(command, *argv)
        cfg.settle_launch(world)
        assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (micro, accum), world
        assert cfg.global_batch(world) == published["global_batch_size"]
    cfg = _cli(command, *argv)
    cfg.settle_launch(1)
    cfg.resolve(epoch_examples=67349 if command == "finetune" else None)  # SST-2's training set
    t = cfg.train
    got = dict(steps=t.steps, global_batch_size=t.global_batch_size, lr=t.lr, warmup=t.warmup_steps,
               optimizer=t.optimizer, betas=t.betas)
    if command == "pretrain":
        got.update(seq_len=cfg.data.seq_len, hidden=cfg.model.hidden_size, layers=cfg.model.num_layers)
    assert got == published
    assert 0 < cfg.earlybert.max_search_steps < t.steps
    other = "finetune" if command == "pretrain" else "pretrain"  # a recipe is named only by its own command
    with pytest.raises(ConfigError, match=f"{recipe}: config file not found, nor a {other} recipe"):
        _cli(other, "--config", recipe, *(finetune_args if other == "finetune" else ()))


def test_the_global_batch_follows_the_ranks_or_is_refused(finetune_args):
    """Fine-tuning's batch of 32 is the global batch: micro-batches shrink as ranks are added; a global batch that
    does not divide among the ranks is refused. A per-rank batch (ours or Hugging Face's name for it) instead makes
    the global batch follow the ranks, as in Hugging Face."""
    cfg = _cli("finetune", *finetune_args)
    with pytest.raises(ConfigError, match="train.global_batch_size=32 does not divide among 3 ranks"):
        cfg.settle_launch(3)
    for argv in (["--per_device_train_batch_size", "16"], ["--train.micro_batch_size", "16"]):
        cfg = _cli("finetune", *finetune_args, *argv)
        cfg.settle_launch(8)
        assert cfg.train.global_batch_size is None and cfg.global_batch(8) == 128
    cfg = _cli("finetune", *finetune_args, "--train.global_batch_size", "48", "--train.micro_batch_size", "16")
    cfg.settle_launch(1)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (16, 3)
    cfg = _cli("pretrain", "--train.global_batch_size", "30", "--train.micro_batch_size", "8")
    cfg.settle_launch(2)  # 15 per rank: the fewest micro-batches of at most 8 that divide it evenly
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (5, 3)


def test_budget_fractions_fit_a_4_step_run():
    """Unset counts follow fractions of the steps, so a 4-step smoke run needs no other option; set ones stay."""
    cfg = _cli("pretrain", "--train.steps", "4").resolve()
    assert (cfg.train.warmup_steps, cfg.earlybert.max_search_steps, cfg.earlybert.detect_every) == (0, 1, 1)
    fixed = _cli("pretrain", "--train.steps", "30", "--earlybert.draw", "fixed").resolve()
    assert fixed.earlybert.fixed_step == fixed.earlybert.max_search_steps == 10  # a fixed draw: the budget's end
    kept = _cli("pretrain", "--train.steps", "30", "--train.warmup_steps", "7", "--earlybert.max_search_steps",
                "12").resolve()
    assert (kept.train.warmup_steps, kept.earlybert.max_search_steps) == (7, 12)
    with pytest.raises(ConfigError, match=r"train.steps=1 leaves no step after the search"):
        _cli("pretrain", "--train.steps", "1")
    with pytest.raises(ConfigError, match="earlybert.fixed_step=30 must be in"):
        _cli("pretrain", "--train.steps", "30", "--earlybert.draw", "fixed", "--earlybert.fixed_step", "30")
