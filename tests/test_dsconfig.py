"""The DeepSpeed config builder, parameter groups, schedule and LAMB (against a NumPy reference and a real engine)."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from earlybert_ds import dsconfig  # noqa: E402
from earlybert_ds.config import RunConfig  # noqa: E402
from earlybert_ds.engine import Engine, lr_lambda, param_groups  # noqa: E402
from earlybert_ds.dsconfig import (  # noqa: E402
    DEFAULT_DS_CONFIG, DEFAULT_DS_DICT, KNOWN_KEYS, DSConfigError, build_ds_config, plan_ds,
)
from earlybert_ds.hardware import Machine, auto_precision, this_machine  # noqa: E402
from earlybert_ds.modeling import EarlyBertConfig, EarlyBertForPreTraining  # noqa: E402
from earlybert_ds.optim import Lamb, choose_optimizer, make_client_optimizer  # noqa: E402

DS_CONFIGS = sorted(DEFAULT_DS_CONFIG.parent.glob("*.json"))
CPU = this_machine()  # this machine as the tests run it (DS_ACCELERATOR=cpu)
#: a pip-only CUDA install on an A100: torch's CUDA, no nvcc, nothing prebuilt into DeepSpeed
A100 = Machine("cuda", capability=(8, 0), torch_cuda=(12, 8))


def _run(tmp_path: Path | None = None, ds: dict | None = None, **train) -> RunConfig:
    """A default run config (micro-batch 16) with ``train`` overrides, using ``ds`` (written to a file) as its
    DeepSpeed JSON."""
    run = RunConfig()
    run.train.micro_batch_size = 16
    for k, v in train.items():
        setattr(run.train, k, v)
    if ds is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        run.deepspeed = str(path)
    return run


def _error(run: RunConfig, world_size: int = 1, machine: Machine = CPU) -> str:
    with pytest.raises(DSConfigError) as e:
        build_ds_config(run, world_size, machine)
    return str(e.value)


# ---- the default and the shipped files ----------------------------------------------------------------------

def test_embedded_default_matches_cpu_json(monkeypatch):
    assert json.loads(DEFAULT_DS_CONFIG.read_text()) == DEFAULT_DS_DICT
    from_file = build_ds_config(RunConfig(), 1, CPU)
    monkeypatch.setattr(dsconfig, "DEFAULT_DS_CONFIG", Path("/nonexistent/cpu.json"))
    assert build_ds_config(RunConfig(), 1, CPU) == from_file


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_build_on_cpu(path):
    assert {p.name for p in DS_CONFIGS} >= {"cpu.json", "zero1_bf16.json", "zero2_bf16.json", "zero3_bf16.json",
                                            "zero2_fp16.json", "zero3_offload.json"}
    run = _run()
    run.deepspeed = str(path)
    cfg = build_ds_config(run, 2, CPU)
    assert "auto" not in json.dumps(cfg)
    assert cfg["train_batch_size"] == 32 and cfg["optimizer"]["type"] == "AdamW"
    offload = "offload_optimizer" in cfg["zero_optimization"]
    assert cfg["optimizer"]["params"].get("torch_adam", False) is not offload  # offload keeps DeepSpeedCPUAdam
    # cpu.json leaves precision to the machine (bf16 where the CPU has bf16 units); the named configs pin theirs
    machine_bf16 = auto_precision(CPU)[0] == "bf16"
    assert cfg["bf16"]["enabled"] is ("bf16" in path.name or "offload" in path.name or
                                      (path.name == "cpu.json" and machine_bf16))


def test_known_keys_are_the_ones_deepspeed_reads():
    """Record which top-level keys DeepSpeedConfig looks up, so a DeepSpeed upgrade cannot drift silently."""
    from deepspeed.runtime import config as dsc

    seen: set[str] = set()

    class Tracking(dict):
        def get(self, k, *a):
            seen.add(k)
            return super().get(k, *a)

        def __getitem__(self, k):
            seen.add(k)
            return super().__getitem__(k)

        def __contains__(self, k):
            seen.add(k)
            return super().__contains__(k)

        def keys(self):
            outer = self

            class Keys:
                def __contains__(self, k):
                    seen.add(k)
                    return dict.__contains__(outer, k)

                def __iter__(self):
                    return dict.__iter__(outer)

            return Keys()

        def __copy__(self):
            return self

    dsc.DeepSpeedConfig(Tracking(train_micro_batch_size_per_gpu=1))
    read = seen - set(dsc._REMOVED_TOP_LEVEL_CONFIG_KEYS) | {"sequence_parallel_size", "data_parallel_size"}
    assert read == KNOWN_KEYS


# ---- filling "auto" -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_auto_fields_filled(world_size):
    run = _run(micro_batch_size=4, grad_accum=3, lr=2e-4, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05,
               clip_grad=0.5)
    cfg = build_ds_config(run, world_size, CPU)
    assert cfg["train_batch_size"] == 4 * 3 * world_size
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.8, 0.95], "eps": 1e-7,
                                                            "weight_decay": 0.05, "torch_adam": True,
                                                                "fused": True}}
    bf16 = auto_precision(CPU)[0] == "bf16"  # unset + auto on CPU: as its bf16 units allow
    assert cfg["bf16"] == {"enabled": bf16} and cfg["fp16"] == {"enabled": False}
    on_gpu = build_ds_config(run, world_size, A100)
    assert on_gpu["bf16"] == {"enabled": True} and on_gpu["fp16"] == {"enabled": False}  # ... and bf16 on CUDA
    assert cfg["zero_optimization"] == {"stage": 0}
    assert cfg["steps_per_print"] >= 10**6 and cfg["wall_clock_breakdown"] is False


@pytest.mark.parametrize("precision,stage", [("fp32", 0), ("bf16", 3), ("fp16", 2)])
def test_precision_and_stage_from_run(precision, stage):
    cfg = build_ds_config(_run(precision=precision, zero_stage=stage), 1, CPU)
    assert cfg["zero_optimization"]["stage"] == stage
    assert (cfg["bf16"]["enabled"], cfg["fp16"]["enabled"]) == (precision == "bf16", precision == "fp16")


def test_json_decides_when_run_leaves_it_unset():
    run = RunConfig()
    run.deepspeed = str(DEFAULT_DS_CONFIG.parent / "zero2_fp16.json")
    cfg = build_ds_config(run, 1, CPU)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]
    assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_agreeing_values_are_accepted(tmp_path):
    ds = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 16, "gradient_clipping": 1,
          "optimizer": {"type": "adamw", "params": {"lr": 0.001, "betas": [0.9, 0.98]}}}
    cfg = build_ds_config(_run(tmp_path, ds), 2, CPU)
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["gradient_clipping"] == 1.0


def test_optimizer_section_on_cpu():
    assert build_ds_config(RunConfig(), 1, CPU)["optimizer"]["params"]["torch_adam"] is True
    lamb = _run(optimizer="lamb", zero_stage=1)
    cpu = plan_ds(lamb, 1, CPU)
    assert "optimizer" not in cpu.config and cpu.config["zero_allow_untested_optimizer"] is True
    assert cpu.optimizer.client and cpu.optimizer.name == "earlybert_ds Lamb"


# What each kind of machine gets, as a function of what it has: device, nvcc (and its CUDA release against torch's),
# DeepSpeed ops prebuilt into the installed wheel, precision and ZeRO stage, and the config's explicit choice.
V100_NVCC = Machine("cuda", capability=(7, 0), torch_cuda=(12, 8), nvcc=(12, 4))
A100_PREBUILT = Machine("cuda", capability=(8, 0), torch_cuda=(12, 8), prebuilt_ops=frozenset({"fused_adam"}))
AVX2_CPU = Machine("cpu")


@pytest.mark.parametrize("machine,optimizer,precision,stage,offload,torch_adam,want,jit", [
    # default AdamW: torch's fused AdamW wherever FusedAdam would have to be built, nvcc or not
    (AVX2_CPU, "adamw", "fp32", 0, False, None, "torch AdamW (fused)", None),
    (A100, "adamw", "bf16", 2, False, None, "torch AdamW (fused)", None),
    (V100_NVCC, "adamw", "fp16", 1, False, None, "torch AdamW (fused)", None),
    # prebuilt FusedAdam is used where its wrapper is a ZeRO one or none; not at ZeRO-0 in bf16 (FP16_Optimizer)
    (A100_PREBUILT, "adamw", "bf16", 2, False, None, "DeepSpeed FusedAdam", None),
    (A100_PREBUILT, "adamw", "fp32", 0, False, None, "DeepSpeed FusedAdam", None),
    (A100_PREBUILT, "adamw", "bf16", 0, False, None, "torch AdamW (fused)", None),
    # asked for by the config: built just in time where it must be (under the build lock), prebuilt otherwise
    (V100_NVCC, "adamw", "fp16", 1, False, False, "DeepSpeed FusedAdam", "FusedAdamBuilder"),
    (A100_PREBUILT, "adamw", "bf16", 0, False, False, "DeepSpeed FusedAdam", None),
    (AVX2_CPU, "adamw", "fp32", 0, False, False, "DeepSpeed FusedAdam", "FusedAdamBuilder"),
    (A100_PREBUILT, "adamw", "bf16", 2, False, True, "torch AdamW (fused)", None),
    # ZeRO-Offload: DeepSpeedCPUAdam, built under the lock unless prebuilt
    (A100, "adamw", "bf16", 3, True, None, "DeepSpeed CPUAdam", "CPUAdamBuilder"),
    (Machine("cuda", capability=(9, 0), prebuilt_ops=frozenset({"cpu_adam"})), "adamw", "bf16", 3, True, None,
     "DeepSpeed CPUAdam", None),
    # LAMB: ours everywhere, FusedLamb never (its kernel takes no bf16; per-partition trust ratio under ZeRO)
    (V100_NVCC, "lamb", "fp32", 0, False, None, "earlybert_ds Lamb", None),
    (A100_PREBUILT, "lamb", "bf16", 0, False, None, "earlybert_ds Lamb", None),
    (AVX2_CPU, "lamb", "fp32", 2, False, None, "earlybert_ds Lamb", None),
])
def test_optimizer_choice_is_a_function_of_the_machine(machine, optimizer, precision, stage, offload, torch_adam,
                                                       want, jit):
    choice = choose_optimizer(optimizer, machine, precision, stage, offload, torch_adam)
    assert (choice.name, choice.jit_builder, choice.client) == (want, jit, optimizer == "lamb"), choice.why
    assert choice.ds_params == ({"torch_adam": True, "fused": True} if want.startswith("torch") else {})


def test_fused_adam_that_cannot_be_built_is_refused_before_any_rank_starts(tmp_path):
    ds = {"optimizer": {"type": "AdamW", "params": {"torch_adam": False}}, "zero_optimization": {"stage": 1}}
    msg = _error(_run(tmp_path, ds), machine=A100)  # no nvcc, not prebuilt
    assert "torch_adam=false" in msg and "no nvcc" in msg and "DS_BUILD_FUSED_ADAM=1" in msg
    old_nvcc = Machine("cuda", capability=(8, 0), torch_cuda=(12, 8), nvcc=(11, 8))
    msg = _error(_run(tmp_path, ds), machine=old_nvcc)
    assert "nvcc of CUDA 11.8" in msg and "torch was built for CUDA 12.8" in msg
    plan = plan_ds(_run(tmp_path, ds), 1, V100_NVCC)  # nvcc of torch's major release: built just in time
    assert plan.optimizer.jit_builder == "FusedAdamBuilder" and "fused" not in plan.config["optimizer"]["params"]


def test_cuda_without_nvcc_uses_optimizers_that_need_no_build():
    """A pip-only CUDA install (no nvcc, nothing prebuilt into DeepSpeed): torch's fused AdamW and our Lamb, nothing
    compiled; in the config, torch_adam and fused, or no optimizer section (our Lamb is a client optimizer)."""
    plan = plan_ds(_run(zero_stage=2, precision="bf16"), 1, A100)
    assert plan.config["optimizer"]["params"]["torch_adam"] is True and plan.config["optimizer"]["params"]["fused"]
    assert plan.optimizer.jit_builder is None
    lamb = plan_ds(_run(optimizer="lamb", zero_stage=1), 1, A100)
    assert "optimizer" not in lamb.config and lamb.optimizer.client and lamb.optimizer.jit_builder is None


def test_the_config_carries_the_choice():
    """The DeepSpeed config builds what the choice says: DeepSpeed's own optimizer (no torch_adam: FusedAdam, or
    CPUAdam under offload) where the machine has it prebuilt or the config asks for it."""
    prebuilt = build_ds_config(_run(zero_stage=2, precision="bf16"), 1, A100_PREBUILT)["optimizer"]["params"]
    assert "torch_adam" not in prebuilt and "fused" not in prebuilt
    offload = _run()
    offload.deepspeed = str(DEFAULT_DS_CONFIG.parent / "zero3_offload.json")
    assert plan_ds(offload, 1, A100).optimizer.name == "DeepSpeed CPUAdam"


# ---- errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ds,train,world,needles", [
    ({"train_batch_size": 64}, {}, 2, ["train_batch_size=64", "16 × train.grad_accum 1 × world size 2 = 32"]),
    ({"train_micro_batch_size_per_gpu": 8}, {}, 1, ["train_micro_batch_size_per_gpu=8", "train.micro_batch_size=16"]),
    ({"gradient_accumulation_steps": 4}, {}, 1, ["gradient_accumulation_steps=4", "train.grad_accum=1"]),
    ({"gradient_clipping": 0.5}, {}, 1, ["gradient_clipping=0.5", "train.clip_grad=1.0"]),
    ({"zero_optimization": {"stage": 3}}, {"zero_stage": 2}, 1, ["zero_optimization.stage=3", "train.zero_stage=2"]),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, {}, 1, ["bf16.enabled=true and fp16.enabled=true"]),
    ({"bf16": {"enabled": True}}, {"precision": "fp16", "zero_stage": 1}, 1,
     ["bf16.enabled=true", "train.precision=fp16"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 5e-4}}}, {}, 1, ["optimizer.params.lr=0.0005", "train.lr=0.001"]),
    ({"optimizer": {"params": {"betas": [0.9, 0.999]}}}, {}, 1, ["optimizer.params.betas=[0.9, 0.999]", "0.98"]),
    ({"optimizer": {"params": {"eps": 1e-8}}}, {}, 1, ["optimizer.params.eps=1e-08", "train.eps=1e-06"]),
    ({"optimizer": {"params": {"weight_decay": 0.1}}}, {}, 1, ["optimizer.params.weight_decay=0.1", "0.01"]),
    ({"optimizer": {"type": "Lamb"}}, {}, 1, ['optimizer.type="Lamb"', "train.optimizer=adamw"]),
    ({"optimizer": {"type": "SGD"}}, {}, 1, ['optimizer.type="SGD"', "AdamW or Lamb"]),
    ({"optimizer": {"params": {"max_grad_norm": 1.0}}}, {}, 1, ["max_grad_norm", "gradient_clipping"]),
    ({"optimizer": {"params": {"max_coeff": 5}}}, {"optimizer": "lamb"}, 1,
     ["optimizer.params.max_coeff", "earlybert_ds's own Lamb"]),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, {"optimizer": "lamb"}, 1,
     ["train.optimizer=lamb", "offload_optimizer"]),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, {}, 1, ["offload_param", "stage 3"]),
    ({"scheduler": {"type": "WarmupLR"}}, {}, 1, ["'scheduler'", "train.schedule", "train.warmup_steps"]),
    ({"wandb": {"enabled": True}}, {}, 1, ["'wandb'", "earlybert_ds logs to wandb itself"]),
    ({"activation_checkpointing": {"partition_activations": True}}, {}, 1,
     ["'activation_checkpointing'", "train.activation_checkpointing"]),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, {}, 1,
     ['zero_optimization.reduce_bucket_size="auto"']),
    ({"zero_optimization": {"stage": 2, "offload_optimiser": {"device": "cpu"}}}, {}, 1,
     ["DeepSpeed rejects", "offload_optimiser"]),
])
def test_contradictions_name_field_and_values(tmp_path, ds, train, world, needles):
    msg = _error(_run(tmp_path, ds, **train), world)
    assert str(tmp_path / "ds.json") in msg
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize("ds,needle", [
    ({"train_batch_size": "32"}, 'train_batch_size="32" must be a positive integer or "auto"'),
    ({"train_micro_batch_size_per_gpu": True}, "train_micro_batch_size_per_gpu=true must be a positive integer"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0 must be a positive integer"),
    ({"gradient_clipping": "1.0"}, 'gradient_clipping="1.0" must be a number'),
    ({"bf16": {"enabled": "yes"}}, 'bf16.enabled="yes" must be true or false'),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage=4 must be a ZeRO stage 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": "three"}}, 'zero_optimization.stage="three" must be a ZeRO stage'),
    ({"zero_optimization": 2}, "zero_optimization=2 must be a JSON object"),
    ({"optimizer": "adamw"}, 'optimizer="adamw" must be a JSON object'),
    ({"optimizer": {"params": {"betas": [0.9]}}}, "optimizer.params.betas=[0.9] must be a list of two numbers"),
    ({"steps_per_print": "10"}, 'steps_per_print="10" must be a positive integer'),
])
def test_wrong_types_name_the_field(tmp_path, ds, needle):
    assert needle in _error(_run(tmp_path, ds))


@pytest.mark.parametrize("key,hint", [("zero_optimisation", "did you mean 'zero_optimization'"),
                                      ("train_batch_sizes", "did you mean 'train_batch_size'"),
                                      ("amp", "DeepSpeed would silently ignore it")])
def test_unknown_top_level_field(tmp_path, key, hint):
    msg = _error(_run(tmp_path, {key: {}}))
    assert f"unknown top-level field '{key}'" in msg and hint in msg


def test_file_errors(tmp_path):
    run = RunConfig()
    run.deepspeed = str(tmp_path / "missing.json")
    assert "missing.json: file not found" in _error(run)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": 32,\n  "bf16": {"enabled": true,}\n}\n')
    run.deepspeed = str(bad)
    assert "bad.json: invalid JSON at line 3 column" in _error(run)
    bad.write_text("[1, 2]")
    assert "expected a JSON object at the top level, got list" in _error(run)
    bad.write_text('{"train_batch_size": 32, "train_batch_size": 64}')
    assert "duplicate key 'train_batch_size'" in _error(run)


def test_fp16_with_zero0_refused(tmp_path):
    msg = _error(_run(precision="fp16"))  # cpu.json: stage "auto" and train.zero_stage unset -> 0
    assert "fp16 with ZeRO stage 0" in msg and "ZeRO-1/2" in msg and "bf16" in msg
    assert "fp16 with ZeRO stage 0" in _error(_run(tmp_path, {"fp16": {"enabled": True}}))
    build_ds_config(_run(precision="fp16", zero_stage=1), 1, CPU)  # ZeRO-1 is fine


# ---- parameter groups and the schedule ------------------------------------------------------------------------

def test_param_groups_exclude_bias_layernorm_and_gates():
    model = EarlyBertForPreTraining(EarlyBertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32, use_gates=True))
    decay, no_decay, gates = param_groups(model, 0.1, gate_lr=0.5)
    assert (decay["weight_decay"], no_decay["weight_decay"], gates["weight_decay"]) == (0.1, 0.0, 0.0)
    assert "lr" not in decay and "lr" not in no_decay and gates["lr"] == 0.5  # the gates' own learning rate
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    gated = {names[id(p)] for p in gates["params"]}
    assert len(undecayed) + len(decayed) + len(gated) == len(names) and not undecayed & decayed
    assert gated == {n for n in names.values() if n.endswith(("head_gates", "ffn_gates"))} and len(gated) == 4
    for n in names.values():
        assert (n in undecayed) == (n.endswith("bias") or ".LayerNorm." in n), n
    assert "lr" not in param_groups(model, 0.1)[2]  # unset: the optimizer's, train.lr


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_lambda(schedule):
    f = lr_lambda(_run(steps=100, warmup_steps=10, schedule=schedule))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # peak on the last warm-up step
    assert f(10) == pytest.approx(1.0)
    mid = {"linear": 0.5, "cosine": 0.5, "constant": 1.0}[schedule]
    assert f(55) == pytest.approx(mid)
    assert f(100) == pytest.approx(0.0 if schedule != "constant" else 1.0)
    assert f(150) == f(100)
    assert lr_lambda(_run(steps=5, warmup_steps=0, schedule="cosine"))(0) == 1.0
    # an engine starting at step 30 with a re-warm-up of 4 steps: (k + 1) / 4 of the schedule's value at 30 + k
    rewarmed = lr_lambda(_run(steps=100, warmup_steps=10, schedule=schedule), start_step=30, rewarmup_steps=4)
    for k, factor in enumerate((0.25, 0.5, 0.75, 1.0, 1.0)):
        assert rewarmed(30 + k) == pytest.approx(factor * f(30 + k))


def test_schedule_is_a_function_of_the_runs_step():
    """The rate depends on the run's step alone: an engine built at the ticket's step continues the curve without a
    jump (however many steps DeepSpeed skipped before), and the last step's rate is the schedule's last, 0 after."""
    run = _run(steps=100, warmup_steps=10)
    search, efficient = lr_lambda(run), lr_lambda(run, start_step=37)  # the engines before and after the ticket
    assert [efficient(s) for s in range(37, 100)] == [search(s) for s in range(37, 100)]
    assert efficient(99) == pytest.approx(1 / 90) and efficient(100) == 0.0


# ---- LAMB -----------------------------------------------------------------------------------------------------

def _numpy_lamb(ws, grads, lr, b1, b2, eps, wd, bias_correction, eps_inside_sqrt, max_coeff=10.0, min_coeff=0.01):
    """LAMB (You et al. 2019, Alg. 2) as DeepSpeed's fused_lamb_cuda_kernel.cu computes it, per tensor, in float64."""
    ws = [w.astype(np.float64).copy() for w in ws]
    ms, vs = [np.zeros_like(w) for w in ws], [np.zeros_like(w) for w in ws]
    for t, step_grads in enumerate(grads, start=1):
        for w, g, m, v in zip(ws, step_grads, ms, vs):
            m[:] = b1 * m + (1 - b1) * g
            v[:] = b2 * v + (1 - b2) * g * g
            u = m / (np.sqrt(v + eps) if eps_inside_sqrt else np.sqrt(v) + eps) + wd * w
            w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(u)
            r = min(max(w_norm / u_norm, min_coeff), max_coeff) if w_norm > 0 and u_norm > 0 else 1.0
            step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if bias_correction else lr
            w -= step * r * u
    return ws


@pytest.mark.parametrize("bias_correction,eps_inside_sqrt", [(True, False), (False, True)])
def test_lamb_matches_reference(bias_correction, eps_inside_sqrt):
    rng = np.random.default_rng(0)
    shapes_scales = [((4, 5), 1.0), ((3,), 0.0), ((6,), 1000.0), ((2, 3), 1e-5)]  # normal, ratio 1, max, min clamp
    init = [(rng.standard_normal(s) * k).astype(np.float32) for s, k in shapes_scales]
    grads = [[rng.standard_normal(s).astype(np.float32) for s, _ in shapes_scales] for _ in range(6)]
    hp = dict(lr=0.01, b1=0.9, b2=0.98, eps=1e-6, wd=0.01)
    params = [nn.Parameter(torch.from_numpy(w.copy())) for w in init]
    opt = Lamb([{"params": params[:2]}, {"params": params[2:]}], lr=hp["lr"], betas=(hp["b1"], hp["b2"]),
               eps=hp["eps"], weight_decay=hp["wd"], bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.from_numpy(g)
        opt.step()
    expected = _numpy_lamb(init, grads, bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt, **hp)
    for p, w, w0 in zip(params, expected, init):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-6, atol=1e-6)
        assert not np.allclose(w, w0)


def test_lamb_trains_regression():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = x @ (torch.randn(10, 1) / 3) + 0.01 * torch.randn(256, 1)
    model = nn.Linear(10, 1, bias=False)
    opt = Lamb(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(_run(steps=200, warmup_steps=10)))
    losses = []
    for _ in range(200):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0], losses[::25]


# ---- a real engine --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_deepspeed_initialize_zero1_bf16(distributed, optimizer):
    run = _run(optimizer=optimizer, zero_stage=1, precision="bf16", micro_batch_size=32, lr=5e-2, warmup_steps=2,
               steps=40, schedule="constant")
    plan = plan_ds(run, 1, CPU)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 1))
    groups = param_groups(model, run.train.weight_decay)
    client = make_client_optimizer(plan.optimizer, groups, run.train)
    engine, *_ = distributed.initialize(model=model, model_parameters=groups, optimizer=client,
                                        config=copy.deepcopy(plan.config))
    try:
        assert type(engine.basic_optimizer) is (Lamb if optimizer == "lamb" else torch.optim.AdamW)
        if optimizer == "adamw":  # torch's fused CPU kernel, not its per-op loop
            assert engine.basic_optimizer.defaults["fused"] is True
        ours = Engine(nn.Linear(4, 1), run)  # says which implementation ran
        assert ours.optimizer_name == ("earlybert_ds.optim.Lamb" if optimizer == "lamb" else "torch.optim.adamw.AdamW")
        ours.destroy()
        assert engine.zero_optimization_stage() == 1 and engine.bfloat16_enabled()
        x = torch.randn(32, 8)
        y = x.sum(dim=1, keepdim=True)
        losses = []
        for _ in range(15):
            loss = nn.functional.mse_loss(engine(x.to(torch.bfloat16)).float(), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        assert engine.get_lr() == [pytest.approx(5e-2)] * len(engine.get_lr())
        assert losses[-1] < 0.5 * losses[0], losses
    finally:
        engine.destroy()


@pytest.mark.parametrize("stage", [0, 2])
def test_gates_are_read_from_fp32_masters_under_bf16(distributed, stage):
    """Under bf16 (auto's choice on CPUs with bf16 units) the gates move by less than bf16's spacing near 1 (2^-7)
    for many steps: the masks must come from the optimizer's fp32 master copies, not the rounded module weights."""
    from earlybert_ds.engine import Engine
    from earlybert_ds.search import read_gates

    from conftest import tiny_config, tiny_mlm_batch

    run = _run(zero_stage=stage, precision="bf16", lr=1e-4, warmup_steps=0, steps=10)
    torch.manual_seed(0)
    model = EarlyBertForPreTraining(tiny_config(use_gates=True, gate_l1_heads=1e-2, gate_l1_ffn=1e-2))
    engine = Engine(model, run)
    try:
        batch = tiny_mlm_batch()
        for step in range(3):
            engine.train_step([batch], step)
        gates = read_gates(engine.module, engine.optimizer)
        module = [m.head_gates for m in engine.module.modules() if getattr(m, "head_gates", None) is not None]
        assert all(p.dtype == torch.bfloat16 and torch.all(p == 1.0) for p in module)  # rounded: still 1
        moved = np.concatenate(gates.heads + gates.ffn)
        assert moved.dtype == np.float32 and 1e-5 < np.abs(moved - 1).max() < 2**-9  # fp32 masters: moved
    finally:
        engine.destroy()


def test_deepspeed_requirement_is_the_tested_range():
    """The code reads DeepSpeed 0.19's private internals and config keys (ZeRO-3 coordinator caches, the shm op,
    fp32 master copies): pyproject.toml admits the tested version and its patch releases only."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    deps = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(r.specifier for r in map(Requirement, deps) if r.name == "deepspeed")
    assert version("deepspeed") in spec
    assert "0.19.8" in spec and "0.19.9" in spec
    assert "0.14.0" not in spec and "0.19.7" not in spec and "0.20.0" not in spec


# ---- LAMB under ZeRO: the trust ratio stays per parameter ------------------------------------------------------

def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lamb_under_zero_is_layerwise(distributed, stage):
    """ZeRO hands the optimizer each parameter group flattened into one tensor: LAMB must still take its trust
    ratio per parameter, so its weights after a few steps are those of ZeRO-0, where it steps each parameter
    itself; with the ratio per flat group (what FusedLamb computes there) they are not."""
    from lamb_ranks import lamb_run

    reference, none = lamb_run(0)
    weights, partitions = lamb_run(stage)
    per_group, _ = lamb_run(stage, layerwise=False)
    assert none == 0 and partitions >= 2  # decayed and undecayed weights, gates: each group one flat tensor
    assert _max_diff(weights, reference) < 1e-5
    assert _max_diff(per_group, reference) > 1e-3


@pytest.mark.slow
def test_lamb_under_zero_is_layerwise_across_ranks(tmp_path):
    """The same on two real ranks, where a parameter's elements lie on both (ZeRO-3 splits every parameter;
    ZeRO-1/2 cut the flat group wherever the halves meet): its norms are summed over the ranks."""
    from conftest import launch

    proc = launch([str(tmp_path)], module="tests.lamb_ranks")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference = torch.load(tmp_path / "stage0.pt")["weights"]
    for stage in (1, 2, 3):
        run = torch.load(tmp_path / f"stage{stage}.pt")
        assert run["partitions"] >= 2 and _max_diff(run["weights"], reference) < 1e-5, stage
    assert _max_diff(torch.load(tmp_path / "stage2-per-group.pt")["weights"], reference) > 1e-3
