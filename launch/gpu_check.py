"""The GPU check: what a CPU machine cannot show, in one run of a few minutes on one CUDA GPU.

1. the whole pipeline (search -> early-bird ticket -> shrink -> efficient training) on a small BERT on one GPU,
   under ZeRO-2 in bf16 and in fp16 (dynamic loss scale), each checked: the loss falls, a ticket is drawn, the
   shrunk engine trains;
2. ``bench throughput`` at BERT-base on that GPU in bf16: tokens/s of the full, gated and shrunk models, the
   realized speedup against the FLOP limit, and MFU against the GPU's bf16 matmul peak measured in the same process.

Everything goes to ``OUT/gpu_check.json`` (and each run's directory under ``OUT``); the exit code is non-zero when
any check fails. Without CUDA it stops at once, naming what is missing (``--allow-cpu`` runs the same steps on CPU
with a tiny model, which is how the tests keep this script working).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPELINES = {"zero2_bf16": "ds_configs/zero2_bf16.json", "zero2_fp16": "ds_configs/zero2_fp16.json"}
SMALL = {"--model.hidden_size": 256, "--model.num_layers": 4, "--model.num_heads": 8,
         "--model.intermediate_size": 1024, "--train.micro_batch_size": 32, "--train.steps": 300,
         "--earlybert.max_search_steps": 100, "--earlybert.detect_every": 10}
TINY = {"--model.hidden_size": 32, "--model.num_layers": 2, "--model.num_heads": 4, "--model.intermediate_size": 64,
        "--train.micro_batch_size": 4, "--train.steps": 30, "--earlybert.max_search_steps": 20,
        "--earlybert.detect_every": 2, "--earlybert.window": 3, "--earlybert.epsilon": 0.3,
        "--earlybert.ffn_multiple": 1, "--data.vocab_size": 600, "--data.seq_len": 32, "--train.lr": 5e-3,
        "--train.warmup_steps": 3, "--train.eval_every": 10, "--train.eval_batches": 2}


def _python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def _cuda() -> tuple[bool, str]:
    code = "import torch; print(torch.cuda.is_available() and torch.cuda.get_device_name(0) or '')"
    proc = subprocess.run([_python(), "-c", code], capture_output=True, text=True)
    if proc.returncode:
        return False, f"{_python()} cannot import torch: {proc.stderr.strip()[-500:]}"
    name = proc.stdout.strip()
    return bool(name), name or "torch.cuda.is_available() is False (no NVIDIA driver or GPU, or a CPU-only torch)"


def _loss_falls(out: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if "loss" in r]
    k = max(1, len(loss) // 6)
    return sum(loss[:k]) / k, sum(loss[-k:]) / k


def pipeline(name: str, ds_config: str, out: Path, shape: dict, corpus: str | None, env: dict) -> dict:
    """One single-GPU pipeline run and its checks."""
    opts = {**shape, "--deepspeed": str(REPO / ds_config), "--output-dir": str(out), "--log.wandb": "disabled",
            "--log.progress": "false", "--train.log_every": 1, "--train.save_every": 0}
    if corpus:
        opts["--corpus"] = corpus
    cmd = [_python(), "-m", "earlybert_ds", "pretrain", *[str(x) for kv in opts.items() for x in kv]]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    result: dict = {"command": cmd, "returncode": proc.returncode, "process_s": time.time() - t0}
    if proc.returncode:
        result.update(ok=False, error=proc.stderr[-3000:])
        return result
    summary = json.loads((out / "summary.json").read_text())
    first, last = _loss_falls(out)
    efficient = summary["stages"].get("efficient", {})
    checks = {"loss falls": last < first - 0.1, "ticket drawn": summary["ticket"] is not None,
              "shrunk engine trained": efficient.get("steps", 0) > 0 and summary["flop_ratio"] < 1,
              "final loss finite": math.isfinite(summary["final_val_loss"])}
    result.update(ok=all(checks.values()), checks=checks, loss_first=first, loss_last=last,
                  ticket=summary["ticket"], flop_ratio=summary["flop_ratio"], peak_flops=summary["peak_flops"],
                  stages=summary["stages"], final_val_loss=summary["final_val_loss"],
                  **{k: v for k, v in summary.items() if k.startswith("speedup_")})
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="where gpu_check.json and the runs go")
    p.add_argument("--corpus", help="pre-training text (default: the built-in corpus)")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU with a tiny model (tests of this script)")
    args = p.parse_args(argv)
    ok, device = _cuda()
    if not ok and not args.allow_cpu:
        print(f"gpu_check: error: no CUDA GPU: {device}. This check needs one NVIDIA GPU; on CPU run the README's "
              "test command instead.", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if not ok:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    report: dict = {"device": device if ok else "cpu (--allow-cpu)", "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                    "pipelines": {}}
    shape = SMALL if ok else TINY
    for name, ds_config in PIPELINES.items():
        if not ok and name.endswith("fp16"):
            continue  # DeepSpeed refuses fp16 on most CPUs; tests/test_faults.py covers its accounting there
        print(f"gpu_check: pipeline {name} ...", file=sys.stderr, flush=True)
        r = report["pipelines"][name] = pipeline(name, ds_config, out / name, shape, args.corpus, env)
        print(f"gpu_check: pipeline {name}: {'ok' if r['ok'] else 'FAILED'} ({r['process_s']:.0f} s)",
              file=sys.stderr, flush=True)
    bench = ["--shapes", "base", "--batch", "64", "--steps", "10", "--warmup", "3", "--repeats", "2"] if ok else \
        ["--shapes", "tiny", "--steps", "1", "--warmup", "0", "--repeats", "1", "--threads", "1"]
    # bf16 on the GPU; on a CPU dry run the machine's auto choice: an AVX2-only CPU emulates bf16 ~100x slower, so
    # its bf16 "peak" (one large matmul) falls below what tiny matmuls reach and MFU would read over 100%
    precision = ["--precision", "bf16"] if ok else []
    cmd = [_python(), "-m", "earlybert_ds.bench", "throughput", *bench, "--variants", "abe", *precision,
           "--out", str(out / "throughput.json")]
    print("gpu_check: bench throughput ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    report["throughput"] = {"command": cmd, "returncode": proc.returncode, "table": proc.stdout,
                            **({"error": proc.stderr[-3000:]} if proc.returncode else
                               json.loads((out / "throughput.json").read_text()))}
    report["ok"] = proc.returncode == 0 and all(r["ok"] for r in report["pipelines"].values())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(proc.stdout, flush=True)
    print(f"gpu_check: {'all checks passed' if report['ok'] else 'FAILED'}; report {out / 'gpu_check.json'}",
          file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
