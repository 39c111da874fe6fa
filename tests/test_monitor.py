"""Monitor, the offline wandb reader and the plots, checked against real offline wandb runs (no server)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from earlybert_ds.config import LogArgs
from earlybert_ds.monitor import METRICS_FILE, Monitor, resolve_wandb_mode, strip_secrets
from earlybert_ds.plots import plot_curves, plot_gates, plot_mask_distances
from wandb_offline import iter_records, read_config, read_history, read_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECRET = "sekrit-value-4f2a9"


@pytest.fixture(autouse=True)
def _isolated_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user wandb settings, keys or netrc leak into (or out of) the tests."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, (path, len(data))


def test_offline_run_logs_exact_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "my-run"
    config = {"train": {"lr": 1e-3}, "data": {"tokenizer": "tok-dir"}, "api_key": SECRET,
              "log": {"hf_token": SECRET, "db": {"password": SECRET, "host": "h"}}}
    steps = {10: (2.5, 1e-4, 1200.0), 20: (2.25, 2e-4, 1300.0), 30: (2.0, 1.5e-4, 1250.0)}
    png = plot_curves({"a": [(0, 1), (1, 0.5)]}, "x", "y", tmp_path / "c.png")
    with Monitor(LogArgs(wandb="offline", progress=False), out, config, rank=0, total_steps=30) as mon:
        for step, (loss, lr, tps) in steps.items():
            mon.log(step, {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tps})
            if step == 20:
                mon.event(20, "ticket", {"distance": 0.05, "heads_kept": 20, "sizes": np.array([3, 4])})
        mon.log_image(30, "plots/curve", png)
        mon.summary({"best_val_loss": 1.875})
    wandb_file = mon.wandb_file
    assert wandb_file is not None and wandb_file.is_file()
    assert wandb_file.parent.parent == out / "wandb" and wandb_file.parent.name.startswith("offline-run-")

    rows = read_history(wandb_file)
    assert [r["_step"] for r in rows] == [10, 20, 30]
    for row in rows:
        loss, lr, tps = steps[row["_step"]]
        assert (row["train/loss"], row["train/lr"], row["train/tokens_per_s"]) == (loss, lr, tps)
    assert (rows[1]["ticket/distance"], rows[1]["ticket/heads_kept"], rows[1]["ticket/sizes"]) == (0.05, 20, [3, 4])
    assert rows[2]["plots/curve"]["_type"] == "image-file"

    summary = read_summary(wandb_file)
    assert summary["best_val_loss"] == 1.875 and summary["train/loss"] == 2.0
    assert (summary["ticket/step"], summary["ticket/heads_kept"]) == (20, 20)
    assert read_config(wandb_file) == {"train": {"lr": 1e-3}, "data": {"tokenizer": "tok-dir"},
                                       "log": {"db": {"host": "h"}}, "resume_step": 0}
    assert SECRET.encode() not in wandb_file.read_bytes()
    assert next(iter_records(wandb_file)).HasField("header")

    lines = _jsonl(out)
    assert [(r["step"], r.get("train/loss"), r.get("event")) for r in lines] == [
        (10, 2.5, None), (20, 2.25, None), (20, None, "ticket"), (30, 2.0, None)]
    assert all(next(iter(r)) == "step" and r["time"] > 0 for r in lines)
    assert lines[2]["sizes"] == [3, 4]
    printed = capsys.readouterr().out
    assert "step 20/30 | train/loss 2.25 | train/lr 0.0002 | train/tokens_per_s 1300" in printed
    assert "step 20: ticket distance=0.05 heads_kept=20" in printed


def test_reader_spans_blocks_and_survives_a_cut_file(tmp_path: Path) -> None:
    out = tmp_path / "long"
    wide = {f"w/{i}": i / 4 for i in range(4000)}  # one record of ~100 KiB: FIRST, MIDDLE..., LAST chunks
    with Monitor(LogArgs(wandb="offline", progress=False), out, {}, rank=0, total_steps=400) as mon:
        for step in range(1, 301):
            mon.log(step, {"train/loss": 10 / step, "val/loss": step * 0.5})
        mon.log(301, wide)
    assert mon.wandb_file is not None
    data = mon.wandb_file.read_bytes()
    assert len(data) > 4 * 32 * 1024
    rows = read_history(mon.wandb_file)
    assert [r["_step"] for r in rows] == list(range(1, 302))
    assert all(r["train/loss"] == 10 / r["_step"] and r["val/loss"] == r["_step"] * 0.5 for r in rows[:300])
    assert {k: v for k, v in rows[300].items() if k.startswith("w/")} == wide

    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[: len(data) // 2])  # a killed writer: the stream ends early, nothing raises
    partial = read_history(cut)
    assert 0 < len(partial) < 301 and partial == rows[: len(partial)]
    bad = bytearray(data)
    bad[200] ^= 0xFF
    cut.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="checksum"):
        read_history(cut)


def test_resume_truncates_metrics_and_disabled_writes_no_wandb(tmp_path: Path) -> None:
    args = LogArgs(wandb="disabled", progress=False)
    with Monitor(args, tmp_path, {}, rank=0, total_steps=10) as mon:
        for step in range(1, 6):
            mon.log(step, {"train/loss": float(step)})
        mon.event(4, "ticket", {"distance": 0.0})
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 6, "train/lo')  # torn line from a crash
    assert mon.wandb_file is None and not (tmp_path / "wandb").exists()

    with Monitor(args, tmp_path, {}, rank=0, total_steps=10, resume_step=3) as mon:
        assert [r["step"] for r in _jsonl(tmp_path)] == [1, 2, 3]
        mon.log(4, {"train/loss": 40.0})
    assert [(r["step"], r["train/loss"]) for r in _jsonl(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]

    with Monitor(args, tmp_path, {}, rank=0, total_steps=10) as mon:  # a fresh start begins a new file
        mon.log(1, {"train/loss": 7.0})
    assert _jsonl(tmp_path)[0]["train/loss"] == 7.0 and len(_jsonl(tmp_path)) == 1


def test_other_ranks_do_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with Monitor(LogArgs(wandb="offline"), out, {"a": 1}, rank=1, total_steps=5, resume_step=2) as mon:
        mon.log(3, {"train/loss": 1.0})
        mon.event(3, "ticket", {"x": 1})
        mon.log_image(3, "k", tmp_path / "missing.png")
        mon.summary({"b": 2})
    assert mon.wandb_file is None and not out.exists()


def test_wandb_mode_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_wandb_mode("auto") == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'a' * 40}\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


def test_strip_secrets() -> None:
    config = {"tokenizer": "t", "num_tokens": 3, "apiKey": 1, "HF_TOKEN": 2, "client_secret": 3,
              "nested": {"db_password": 4, "keep_last": 5, "monitor": {"wandb_api_key": 6, "ok": 7}}}
    assert strip_secrets(config) == {"tokenizer": "t", "num_tokens": 3,
                                     "nested": {"keep_last": 5, "monitor": {"ok": 7}}}


def test_plots_write_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    steps = list(range(10, 110, 10))
    dists = [0.5 / (i + 1) for i in range(len(steps))]
    _png(plot_mask_distances(steps, dists, [d * 0.8 for d in dists], 0.1, 80, tmp_path / "dist.png"))
    _png(plot_mask_distances(steps, dists, dists, 0.1, None, tmp_path / "sub" / "nodraw.png"))
    heads = [rng.normal(size=8) for _ in range(4)]
    ffn = [rng.normal(size=256) for _ in range(4)]
    head_masks = [np.abs(h) >= np.sort(np.abs(h))[3] for h in heads]
    ffn_masks = [np.abs(f) >= np.quantile(np.abs(f), 0.4) for f in ffn]
    _png(plot_gates(heads, ffn, tmp_path / "gates.png", head_masks, ffn_masks))
    _png(plot_gates(heads[:3] + [heads[3][:5]], ffn, tmp_path / "gates_ragged.png"))
    series = {"full": [(0.0, 7.0), (60.0, 5.5), (120.0, 4.9)], "earlybert": [(0.0, 7.0), (45.0, 5.6), (90.0, 5.0)]}
    _png(plot_curves(series, "wall-clock (s)", "validation loss", tmp_path / "curves.png", "Validation loss"))


def test_progress_bar_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with Monitor(LogArgs(wandb="disabled"), tmp_path, {}, rank=0, total_steps=40, resume_step=10) as mon:
        mon.log(20, {"train/loss": 2.5, "train/lr": 1e-4, "train/tokens_per_s": 1234.0})
        mon.event(20, "ticket", {"distance": 0.05})
        assert mon._bar is not None and mon._bar.n == 20
    captured = capsys.readouterr()
    assert "loss=2.5, lr=0.0001, tok/s=1234" in captured.err and "20/40" in captured.err
    assert captured.out == "step 20: ticket distance=0.05\n"  # tqdm.write: above the bar, no per-step lines
