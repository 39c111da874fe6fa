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
