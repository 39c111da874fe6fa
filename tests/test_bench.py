"""The benchmark suites (earlybert_ds.bench): a real throughput run on a tiny shape, and the pieces of the pretrain
suite that need no training (its real runs take minutes even with --quick, see docs/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from earlybert_ds import bench

from conftest import REPO


@pytest.mark.slow
def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run(
        [sys.executable, "-m", "earlybert_ds.bench", "throughput", "--shapes", "tiny", "--steps", "1", "--warmup",
         "0", "--repeats", "1", "--threads", "1", "--variants", "abcd", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["shapes"]["tiny"]
    assert {r["variant"] for r in result["runs"]} == set("abcd")
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in result["runs"])
    summary = result["summary"]
    assert 0 < summary["flop_ratio"]["c"] <= summary["flop_ratio"]["e"] < 1
    assert set(summary["targets_met"]) == {"(c) realized >= 0.9 x theoretical", "gate overhead <= 5%",
                                           "(a) at least as fast as (d)"}
    assert "realized/theoretical" in proc.stdout and "targets:" in proc.stdout


def test_uneven_ticket_has_paper_ratios_and_uneven_widths():
    shape = bench.SHAPES["base"]
    ticket = bench.uneven_ticket(shape)
    assert ticket.heads_per_layer == [8] * 12  # 1/3 of 12 heads pruned in every layer
    assert sum(ticket.intermediate_sizes) == round(0.6 * 12 * 3072)  # 40% of the FFN neurons, across layers
    assert len(set(ticket.intermediate_sizes)) == 12
    aligned = bench.uneven_ticket(shape, ffn_multiple=64)  # variant (e)
    assert all(w % 64 == 0 for w in aligned.intermediate_sizes)


def test_shrunk_variants_are_ticket_shaped():
    shape = bench.SHAPES["tiny"]
    for variant, multiple in bench.SHRUNK.items():
        config = bench.build_variant(variant, shape).config
        assert config.intermediate_sizes == bench.uneven_ticket(shape, multiple).intermediate_sizes
        assert not config.use_gates


def test_time_to_interpolates_between_validations():
    curve = [(10.0, 5.0, 10), (20.0, 4.0, 20), (30.0, 3.0, 30)]
    assert bench._time_to(curve, 3.5) == pytest.approx(25.0)
    assert bench._time_to(curve, 6.0) == 10.0
    assert bench._time_to(curve, 2.0) is None


def test_pretrain_names_the_missing_corpus(tmp_path, capsys):
    assert bench.main(["pretrain", "--corpus", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "runs")]) == 2
    assert "apt-get install python3.11-doc" in capsys.readouterr().err


def test_finetune_is_a_clear_hook(capsys):
    assert bench.main(["finetune"]) == 2
    assert "not implemented yet" in capsys.readouterr().err
