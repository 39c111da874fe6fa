"""The GPU check: what a CPU machine cannot show, in one run of a few minutes on one CUDA GPU, step by step.

1. ``preflight``: everything a run imports, and what the machine offers (launch/preflight.py);
2. ``pipeline_zero2_bf16`` and ``pipeline_zero2_fp16``: the whole pipeline (search -> early-bird ticket -> shrink
   -> efficient training) on a small BERT on one GPU, under ZeRO-2 in bf16 and in fp16 (dynamic loss scale), each
   checked: the loss falls, a ticket is drawn, the shrunk engine trains;
3. ``throughput``: ``bench throughput`` at BERT-base in bf16: tokens/s of the full, gated and shrunk models, the
   realized speedup against the FLOP limit, and MFU against the GPU's bf16 matmul peak measured in the same process.

Each step runs in its own process group under a time limit (``--timeout``); after every step ``OUT/gpu_check.json``
is rewritten with what passed, failed, timed out or was skipped (a step still "running" there was cut short with the
check itself), and one line says the step's verdict. ``OUT`` holds only that report and the throughput figures; the
runs and each step's log go to ``--work`` (default: ``OUT_runs`` beside it), cleared before a step runs, so the check
can be rerun into the same folders at once; ``--resume`` keeps the steps that passed and runs the others. The exit
code is 0 when every step that ran passed. Without CUDA it stops at once (``--allow-cpu`` runs the same steps on CPU
with a tiny model, which is how the tests keep this script working).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ("preflight", "pipeline_zero2_bf16", "pipeline_zero2_fp16", "throughput")
PIPELINES = {"pipeline_zero2_bf16": "ds_configs/zero2_bf16.json", "pipeline_zero2_fp16": "ds_configs/zero2_fp16.json"}
DEFAULT_TIMEOUT_S = 600
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


def run_step(cmd: list[str], log: Path, timeout_s: float, env: dict) -> tuple[str, float, str]:
    """Run ``cmd`` with its output in ``log``, in a process group of its own that is killed whole at ``timeout_s``;
    returns its status ("passed": exit 0, "failed", "timed out"), seconds, and the end of its output."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = "passed" if proc.wait(timeout=timeout_s) == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its children (DeepSpeed's op builds, bench workers) too
            proc.wait()
            status = "timed out"
    return status, time.monotonic() - t0, log.read_text(errors="replace")[-3000:]


def _loss_falls(out: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if "loss" in r]
    k = max(1, len(loss) // 6)
    return sum(loss[:k]) / k, sum(loss[-k:]) / k


def pipeline_checks(out: Path) -> dict:
    """What a finished single-GPU pipeline run must show, read off its output directory."""
    summary = json.loads((out / "summary.json").read_text())
    first, last = _loss_falls(out)
    efficient = summary["stages"].get("efficient", {})
    checks = {"loss falls": last < first - 0.1, "ticket drawn": summary["ticket"] is not None,
              "shrunk engine trained": efficient.get("steps", 0) > 0 and summary["flop_ratio"] < 1,
              "final loss finite": math.isfinite(summary["final_val_loss"])}
    return {"checks": checks, "loss_first": first, "loss_last": last, "ticket": summary["ticket"],
            "flop_ratio": summary["flop_ratio"], "peak_flops": summary["peak_flops"], "stages": summary["stages"],
            "final_val_loss": summary["final_val_loss"], **{k: v for k, v in summary.items() if k.startswith("speedup_")}}


class Check:
    """The steps of one check and its report, rewritten after each."""

    def __init__(self, args: argparse.Namespace, device: str, on_gpu: bool):
        self.args, self.on_gpu = args, on_gpu
        self.out, self.work = Path(args.out).resolve(), Path(args.work or f"{args.out}_runs").resolve()
        self.report_path = self.out / "gpu_check.json"
        old = json.loads(self.report_path.read_text()) if args.resume and self.report_path.is_file() else {}
        self.report = {"device": device, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "work": str(self.work),
                       "steps": {k: v for k, v in old.get("steps", {}).items() if v["status"] == "passed"}}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
        if not on_gpu:
            self.env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=self.env.get("OMP_NUM_THREADS", "1"))

    def timeout(self, step: str) -> float:
        limits = dict(t.split("=", 1) if "=" in t else ("*", t) for t in self.args.timeout)
        return float(limits.get(step, limits.get("*", DEFAULT_TIMEOUT_S)))

    def write(self) -> None:
        steps = self.report["steps"].values()
        self.report["ok"] = bool(steps) and all(s["status"] in ("passed", "skipped") for s in steps)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.report_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=1) + "\n")
        os.replace(tmp, self.report_path)  # whole or absent, whenever the check itself is cut short

    def run(self, step: str) -> dict:
        if step in self.report["steps"]:  # --resume: passed before
            return {**self.report["steps"][step], "note": "passed in the report resumed (--resume)"}
        if step == "pipeline_zero2_fp16" and not self.on_gpu:
            return {"status": "skipped", "note": "fp16 on CPU: DeepSpeed refuses it on most CPUs "
                                                 "(tests/test_faults.py covers its accounting there)"}
        if self.report["steps"].get("preflight", {}).get("status", "passed") != "passed":
            return {"status": "skipped", "note": "the preflight failed: see its log"}
        run_dir = self.work / step
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        self.report["steps"][step] = {"status": "running", "log": str(run_dir / "log.txt")}
        self.write()
        status, seconds, tail = run_step(self.command(step, run_dir), run_dir / "log.txt", self.timeout(step),
                                         self.env)
        result = {"status": status, "seconds": round(seconds, 1), "log": str(run_dir / "log.txt")}
        if status == "timed out":
            result["note"] = f"killed at its limit of {self.timeout(step):g} s (--timeout)"
        if status != "passed":
            return {**result, "output_tail": tail}
        if step in PIPELINES:
            result.update(pipeline_checks(run_dir / "run"))
            result["status"] = "passed" if all(result["checks"].values()) else "failed"
        elif step == "throughput":
            result.update(json.loads((self.out / "throughput.json").read_text()), output_tail=tail)  # its table
        else:
            result.update(json.loads((run_dir / "preflight.json").read_text()))
        return result

    def command(self, step: str, run_dir: Path) -> list[str]:
        if step == "preflight":
            return [_python(), str(REPO / "launch" / "preflight.py"), "--json", str(run_dir / "preflight.json")]
        if step in PIPELINES:
            opts = {**(SMALL if self.on_gpu else TINY), "--deepspeed": str(REPO / PIPELINES[step]),
                    "--output-dir": str(run_dir / "run"), "--data.cache_dir": str(run_dir / "cache"),
                    "--log.wandb": "disabled", "--log.progress": "false", "--train.log_every": 1,
                    "--train.save_every": 0}
            if self.args.corpus:
                opts["--corpus"] = self.args.corpus
            return [_python(), "-m", "earlybert_ds", "pretrain", *[str(x) for kv in opts.items() for x in kv]]
        bench = ["--shapes", "base", "--batch", "64", "--steps", "10", "--warmup", "3", "--repeats", "2"] \
            if self.on_gpu else ["--shapes", "tiny", "--steps", "1", "--warmup", "0", "--repeats", "1", "--threads", "1"]
        # bf16 on the GPU; on a CPU dry run the machine's auto choice: an AVX2-only CPU emulates bf16 ~100x slower,
        # so its bf16 "peak" (one large matmul) falls below what tiny matmuls reach and MFU would read over 100%
        precision = ["--precision", "bf16"] if self.on_gpu else []
        return [_python(), "-m", "earlybert_ds.bench", "throughput", *bench, "--variants", "abe", *precision,
                "--out", str(self.out / "throughput.json")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="where gpu_check.json and throughput.json go")
    p.add_argument("--work", help="where the steps' runs and logs go (default: OUT_runs)")
    p.add_argument("--corpus", help="pre-training text (default: the built-in corpus)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"which steps to run (default: all, {','.join(STEPS)})")
    p.add_argument("--timeout", action="append", default=[], metavar="[STEP=]SECONDS",
                   help=f"time limit of every step, or of one (repeatable; default {DEFAULT_TIMEOUT_S} s)")
    p.add_argument("--resume", action="store_true", help="keep the steps that passed in OUT/gpu_check.json")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU with a tiny model (tests of this script)")
    args = p.parse_args(argv)
    steps = args.steps.split(",")
    unknown = [s for s in steps if s not in STEPS] + [t.split("=")[0] for t in args.timeout
                                                      if "=" in t and t.split("=")[0] not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}: the steps are {', '.join(STEPS)}")
    on_gpu, device = _cuda()
    if not on_gpu and not args.allow_cpu:
        print(f"gpu_check: error: no CUDA GPU: {device}. This check needs one NVIDIA GPU; `python3 launch/preflight.py` "
              "says what this Python has. On CPU run the README's test command instead.", file=sys.stderr)
        return 2
    check = Check(args, device if on_gpu else "cpu (--allow-cpu)", on_gpu)
    for step in steps:
        print(f"gpu_check: {step} ...", flush=True)
        result = check.report["steps"][step] = check.run(step)
        check.write()
        note = f": {result['note']}" if "note" in result else ""
        took = f" ({result['seconds']:.0f} s)" if "seconds" in result else ""
        print(f"gpu_check: {step}: {result['status'].upper() if result['status'] != 'passed' else 'passed'}"
              f"{took}{note}", flush=True)
    if "output_tail" in check.report["steps"].get("throughput", {}):
        print(check.report["steps"]["throughput"]["output_tail"], flush=True)  # the figures' table
    print(f"gpu_check: {'all steps passed' if check.report['ok'] else 'FAILED'}; report {check.report_path}",
          flush=True)
    return 0 if check.report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
