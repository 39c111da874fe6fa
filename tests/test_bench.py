"""The benchmark suites (earlybert_ds.bench): a real throughput run on a tiny shape, and the pieces of the pretrain
suite that need no training and a quick fine-tuning run (the real figures: docs/results.md)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from deepspeed.ops.adam import FusedAdam

from earlybert_ds.bench import common, finetune, pretrain, throughput, tickets
from earlybert_ds.bench.__main__ import main
from earlybert_ds.config import RunConfig
from earlybert_ds.data import load_tokenizer
from earlybert_ds.finetune import ClassificationTask
from earlybert_ds.modeling import EarlyBertForSequenceClassification, load_hf_bert
from earlybert_ds.pipeline import initial_model
from earlybert_ds.probe import probe_and_draw
from earlybert_ds.tasks import custom_task, encode, load_task_split
from earlybert_ds.ticket import PruneSpec, Scores, Ticket, draw_masks

from conftest import REPO, metrics, run_single, tiny_bert_dir, tiny_config, tiny_mlm_batch, tiny_run_args


@pytest.mark.slow
def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run(
        [sys.executable, "-m", "earlybert_ds.bench", "throughput", "--shapes", "tiny", "--steps", "1", "--warmup",
         "0", "--repeats", "1", "--threads", "1", "--variants", "abcd", "--profile", "3", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["shapes"]["tiny"]
    assert {r["variant"] for r in result["runs"]} == set("abcd")
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in result["runs"])
    # MFU: the variant's FLOP rate over the matmul peak measured in the same process
    flops = result["train_flops_per_token"]
    assert all(0 < r["mfu"] < 1 and r["mfu"] == pytest.approx(r["tokens_per_s"] * flops[r["variant"]]
                                                              / r["peak_flops"]) for r in result["runs"])
    summary = result["summary"]
    assert 0 < summary["flop_ratio"]["c"] <= summary["flop_ratio"]["e"] < 1
    assert set(summary["targets_met"]) == {"(c) realized >= 0.95 x theoretical", "gate overhead <= 5%",
                                           "(a) at least as fast as (d)", "(a) MFU >= 30%"}
    assert "realized/theoretical" in proc.stdout and "MFU" in proc.stdout and "targets:" in proc.stdout
    # --profile: one more step per variant, its costliest operators by share of the step's self time
    assert all(len(r["profile"]) == 3 and 0 < sum(share for _, share in r["profile"]) <= 1 for r in result["runs"])
    assert proc.stdout.count("profile (") == 4
    machine = json.loads(out.read_text())["machine"]
    assert machine["cpu"] and isinstance(machine["cpu_flags"], list)


def test_uneven_ticket_has_paper_ratios_and_uneven_widths():
    shape = common.SHAPES["base"]
    ticket = throughput.uneven_ticket(shape)
    assert ticket.heads_per_layer == [8] * 12  # 1/3 of 12 heads pruned in every layer
    assert sum(ticket.intermediate_sizes) == round(0.6 * 12 * 3072)  # 40% of the FFN neurons, across layers
    assert len(set(ticket.intermediate_sizes)) == 12
    aligned = throughput.uneven_ticket(shape, ffn_multiple=64)  # variant (e)
    assert all(w % 64 == 0 for w in aligned.intermediate_sizes)


def test_shrunk_variants_are_ticket_shaped():
    shape = common.SHAPES["tiny"]
    for variant, multiple in throughput.SHRUNK.items():
        config = throughput.build_variant(variant, shape).config
        assert config.intermediate_sizes == throughput.uneven_ticket(shape, multiple).intermediate_sizes
        assert not config.use_gates


def test_time_to_interpolates_between_validations():
    curve = [(10.0, 5.0, 10), (20.0, 4.0, 20), (30.0, 3.0, 30)]
    assert pretrain._time_to(curve, 3.5) == pytest.approx(25.0)
    assert pretrain._time_to(curve, 6.0) == 10.0
    assert pretrain._time_to(curve, 2.0) is None


def test_pretrain_names_the_missing_corpus(tmp_path, capsys):
    assert main(["pretrain", "--corpus", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "runs")]) == 2
    assert "apt-get install python3.11-doc" in capsys.readouterr().err


def _docs_tree(root):
    """A miniature Python-docs _sources tree: three pages per section, four prose paragraphs per page."""
    for section in finetune.SECTIONS:
        for page in range(3):
            paras = [f"Paragraph {i} of {section} page {page} says :func:`~os.{section}` and ``code`` in plain words "
                     "long enough to count as prose here." for i in range(4)]
            text = "Title\n=====\n\n.. note::\n\n   indented\n\n" + "\n\n".join(paras) + "\n\n   >>> code\n"
            path = root / section / f"p{page}.rst.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def test_paragraphs_keep_prose_and_strip_markup(tmp_path):
    _docs_tree(tmp_path)
    paras = finetune._paragraphs(tmp_path / "faq" / "p0.rst.txt", min_words=12)
    assert paras == [f"Paragraph {i} of faq page 0 says os.faq and code in plain words long enough to count as "
                     "prose here." for i in range(4)]


def test_section_task_splits_by_page_and_balances(tmp_path):
    _docs_tree(tmp_path / "docs")
    data = finetune.section_task(tmp_path / "docs", tmp_path / "data", train_per_class=5, dev_per_class=3)
    rows = {side: [json.loads(line) for line in (tmp_path / "data" / f"{side}.jsonl").read_text().splitlines()]
            for side in ("train", "dev")}
    # a quarter of each section's 12 paragraphs goes to dev by whole pages: one page of 4, of which 3 are sampled
    assert data["counts"] == {s: {"dev": 3, "train": 5} for s in finetune.SECTIONS}
    assert {r["label"] for r in rows["train"]} == set(range(len(finetune.SECTIONS)))
    assert not {r["page"] for r in rows["train"]} & {r["page"] for r in rows["dev"]}
    assert all(finetune.SECTIONS[r["label"]] == r["page"].split("/")[0] for side in rows.values() for r in side)


def test_word_order_task_swaps_one_adjacent_pair_and_splits_by_page(tmp_path):
    """As written (1) or two adjacent words swapped (0), balanced; every sentence used once; no page on both sides;
    a swap never moves the first or last word, punctuation or a word that is not letters alone; seeded."""
    _docs_tree(tmp_path / "docs")
    data = finetune.word_order_task(tmp_path / "docs", tmp_path / "data", train_per_class=6, dev_per_class=2)
    rows = {side: [json.loads(line) for line in (tmp_path / "data" / f"{side}.jsonl").read_text().splitlines()]
            for side in ("train", "dev")}
    assert data["classes"] == ["swapped", "as_written"] and data["counts"]["swapped"] == {"train": 6, "dev": 2}
    assert not {r["page"] for r in rows["train"]} & {r["page"] for r in rows["dev"]}
    sources = {}
    for page in (tmp_path / "docs").rglob("*.txt"):
        for para in finetune._paragraphs(page, 8):
            for sentence in finetune._sentences(para):
                sources[(*sorted(sentence.split()), str(page.relative_to(tmp_path / "docs")))] = sentence
    used = []
    for side, n in (("train", 6), ("dev", 2)):
        assert sorted(r["label"] for r in rows[side]) == [0] * n + [1] * n
        for r in rows[side]:
            original = sources[(*sorted(r["text"].split()), r["page"])]  # from its own page
            used.append(original)
            a, b = original.split(), r["text"].split()
            moved = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
            if r["label"] == 1:
                assert r["text"] == original
            else:
                assert len(moved) == 2 and moved[1] == moved[0] + 1 and 0 < moved[0] < len(a) - 2
                assert all(finetune._WORD.fullmatch(a[i]) for i in moved) and b[moved[0]] == a[moved[1]]
    assert len(used) == len(set(used)) == 16  # each sentence once
    again = finetune.word_order_task(tmp_path / "docs", tmp_path / "again", train_per_class=6, dev_per_class=2)
    assert (tmp_path / "again" / "train.jsonl").read_text() == (tmp_path / "data" / "train.jsonl").read_text()
    assert again["pages"] == data["pages"]
    with pytest.raises(common.BenchError, match="too few for 40 per class"):
        finetune.word_order_task(tmp_path / "docs", tmp_path / "big", train_per_class=40, dev_per_class=2)


def test_finetune_names_the_missing_corpus(tmp_path, capsys):
    assert main(["finetune", "--corpus", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "r")]) == 2
    assert "python3.11-doc" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_quick_runs_all_three(tmp_path):
    """The real suite end to end on a miniature docs tree: three real fine-tuning runs from MiniLM."""
    _docs_tree(tmp_path / "docs")
    out = tmp_path / "ft.json"
    proc = subprocess.run(
        [sys.executable, "-m", "earlybert_ds.bench", "finetune", "--quick", "--corpus", str(tmp_path / "docs"),
         "--out-dir", str(tmp_path / "runs"), "--plot", str(tmp_path / "ft.png"), "--threads", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"full", "earlybert", "random-ticket"}
    assert runs["full"]["flop_ratio"] == 1.0 and runs["full"]["ticket_step"] is None
    for name in ("earlybert", "random-ticket"):  # MiniLM shrunk: 8 of 12 heads per layer, 60% of the FFN neurons
        assert runs[name]["heads_per_layer"] == [8] * 6
        widths = runs[name]["intermediate_sizes"]  # rounded up to multiples of 64 (earlybert.ffn_multiple)
        assert all(w % 64 == 0 for w in widths) and 0 <= sum(widths) - round(0.6 * 6 * 1536) < 6 * 64
        assert 0.5 < runs[name]["flop_ratio"] < 0.75
    assert all(0.0 <= r["final_dev_accuracy"] <= 1.0 and r["curve"] for r in runs.values())
    assert (tmp_path / "ft.png").stat().st_size > 0 and "acc vs full" in proc.stdout


def _ticket_run(method, seed, metric, cpu, step=None, flop_ratio=1.0, steps=100, train_loss=None):
    return {"method": method, "seed": seed, "metric": metric, "process_cpu_s": cpu, "process_s": cpu + 1,
            "ticket_step": step, "ticket_reason": None if step is None else "converged", "flop_ratio": flop_ratio,
            "steps": steps, "train_loss": train_loss}


def test_train_loss_tail_is_the_mean_over_the_second_half_of_the_steps(tmp_path):
    rows = [{"step": s, "loss": float(s)} for s in (2, 4, 6, 8)] + [{"step": 8, "dev_accuracy": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert common.train_loss_tail(tmp_path) == pytest.approx(7.0)  # steps 6 and 8 of 8
    assert common.train_loss_tail(tmp_path / "absent") is None


def test_tickets_summary_intervals_and_paired_differences_by_hand():
    runs = []
    for seed, (full, eb, r0, rs) in enumerate([(0.60, 0.58, 0.55, 0.54), (0.62, 0.57, 0.56, 0.53),
                                               (0.61, 0.59, 0.54, 0.55)]):
        runs += [_ticket_run("full", seed, full, 100.0),
                 _ticket_run("eb", seed, eb, 70.0 + seed, 10, 0.6, train_loss=1.0 + seed),
                 _ticket_run("random@0", seed, r0, 60.0, 0, 0.6),
                 _ticket_run("random@eb", seed, rs, 71.0, 10, 0.6, train_loss=1.5 + 2 * seed)]
    s = tickets.summarise_tickets(runs, "dev_accuracy", higher_is_better=True)
    t = 4.302653  # t(0.975, 2 degrees of freedom)
    full = s["methods"]["full"]["metric"]
    assert full["mean"] == pytest.approx(0.61) and full["ci95"] == pytest.approx(t * 0.01 / 3 ** 0.5)
    eb = s["methods"]["eb"]
    assert eb["cpu_vs_full"]["mean"] == pytest.approx(0.71)  # 0.70, 0.71, 0.72 of the same seed's full run
    assert eb["search_share"] == pytest.approx(0.1) and eb["time_saved_bound"] == pytest.approx(1 - (0.1 + 0.9 * 0.6))
    paired = s["paired"]["eb"]
    assert set(paired) == {"full", "random@0", "random@eb"} and "random@eb" not in s["paired"]
    # eb - random@eb per seed: +0.04, +0.04, +0.04 -> mean 0.04, no spread
    assert paired["random@eb"]["mean"] == pytest.approx(0.04) and paired["random@eb"]["ci95"] == pytest.approx(0)
    # train loss eb - random@eb per seed: -0.5, -1.5, -2.5; where either side lacks it, no train-loss difference
    assert paired["random@eb"]["train_loss"]["mean"] == pytest.approx(-1.5)
    assert paired["random@eb"]["train_loss"]["ci95"] == pytest.approx(4.302653 * 1.0 / 3 ** 0.5)
    assert "train_loss" not in paired["full"] and "train_loss" not in paired["random@0"]
    diffs = [0.58 - 0.60, 0.57 - 0.62, 0.59 - 0.61]
    assert paired["full"]["diffs"] == pytest.approx(diffs)
    sd = float(np.std(diffs, ddof=1))
    assert paired["full"]["ci95"] == pytest.approx(t * sd / 3 ** 0.5)
    loss = tickets.summarise_tickets(runs, "val_loss", higher_is_better=False)  # lower is better: gain flips sign
    assert loss["paired"]["eb"]["random@0"]["gain"]["mean"] == pytest.approx(-paired["random@0"]["mean"])
    oracles = [_ticket_run(m, seed, acc, 60.0, 0, 0.6) for seed in (0, 1)
               for m, acc in (("oracle@dev", 0.6 + seed / 100), ("widths@dev", 0.5))]
    o = tickets.summarise_tickets(runs + oracles, "dev_accuracy", higher_is_better=True)["paired"]["oracle@dev"]
    assert set(o) == {"full", "random@0", "widths@dev"}  # an oracle's units against random ones at its widths
    assert o["widths@dev"]["diffs"] == pytest.approx([0.10, 0.11]) and o["random@0"]["n"] == 2
    others = [_ticket_run(m, seed, acc, 60.0, 0, 0.6) for seed in (0, 1)
              for m, acc in (("widths@next", 0.52 + seed / 100), ("widths@train", 0.5))]
    n = tickets.summarise_tickets(runs + others, "dev_accuracy", higher_is_better=True)["paired"]["widths@next"]
    assert set(n) == {"full", "random@0", "widths@train"}  # another run's widths against the run's own
    assert n["widths@train"]["diffs"] == pytest.approx([0.02, 0.03])
    others = [_ticket_run(m, seed, acc, 60.0, 0, 0.6) for seed in (0, 1)
              for m, acc in (("oracle@next", 0.55), ("oracle@train", 0.5 + seed / 100))]
    n = tickets.summarise_tickets(runs + others, "dev_accuracy", higher_is_better=True)["paired"]["oracle@next"]
    assert set(n) == {"full", "random@0", "oracle@train"}  # another run's ticket against the run's own
    assert n["oracle@train"]["diffs"] == pytest.approx([0.05, 0.04])


def test_heads_kept_across_seeds_and_of_the_oracle():
    """Per layer and head, the share of seeds that keep it; per layer, the share of the same seed's oracle heads."""
    probe = {0: {"heads": [[0, 1], [2, 3]]}, 1: {"heads": [[0, 2], [2, 3]]}}
    oracle = {0: {"heads": [[0, 3], [1, 2]]}, 1: {"heads": [[0, 2], [2, 3]]}}
    h = tickets._heads(probe, oracle)
    assert h["head_keep_rate"] == [[1.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 1.0]]
    assert h["heads_kept_of_oracle"] == [0.75, 0.75]  # seed 0: 1 of 2 in each layer; seed 1: all
    assert "heads_kept_of_oracle" not in tickets._heads(probe, {})


@pytest.mark.slow
def test_oracle_ticket_ranks_units_by_their_loss_gradient_by_hand(tmp_path, minilm_dir):
    """The oracle's scores against central differences of the loss in each gate (at 1, in float64), summed over
    batches: the ticket keeps the units with the largest. (The model's own loss is cast to float32, too coarse for
    differences of h = 1e-5, so the loss is taken here from its float64 logits.)"""
    torch.manual_seed(0)
    model = EarlyBertForSequenceClassification(tiny_config(vocab_size=30522, num_labels=3, intermediate_size=16))
    final = tmp_path / "full" / "final"
    model.save_pretrained(final)
    load_tokenizer(minilm_dir).save_pretrained(final)
    words = "lists dicts sockets threads modules classes strings bytes".split()
    rows = [{"text": f"paragraph {i} about {w} and more words", "label": i % 3} for i, w in enumerate(words)]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = PruneSpec(head_ratio=0.5, ffn_ratio=0.5, ffn_multiple=1)
    path = tickets.oracle_ticket(tmp_path / "full", str(tmp_path / "dev.jsonl"), 16, 3, tmp_path / "o.json", spec)

    gated = EarlyBertForSequenceClassification.from_pretrained(final, use_gates=True).double().eval()
    data = encode(load_task_split(custom_task(3, "text"), tmp_path / "dev.jsonl", "dev"), load_tokenizer(final), 16)
    batches = [data.collate([data[i] for i in range(k, min(k + 3, len(data)))]) for k in range(0, len(data), 3)]

    def score(gate: torch.nn.Parameter, i: int, h: float = 1e-5) -> float:
        total = 0.0
        with torch.no_grad():
            for b in batches:
                up_down = []
                for d in (h, -h):
                    gate[i] += d
                    logits = gated(**{k: v for k, v in b.items() if k != "labels"}).logits
                    up_down.append(float(torch.nn.functional.cross_entropy(logits, b["labels"])))
                    gate[i] -= d
                total += abs(up_down[0] - up_down[1]) / (2 * h)
        return total

    layers = gated.bert.encoder.layer
    hand = Scores([np.array([score(m.attention.head_gates, i) for i in range(4)]) for m in layers],
                  [np.array([score(m.ffn.ffn_gates, i) for i in range(16)]) for m in layers])
    ticket = Ticket.load(path)
    assert (ticket.heads, ticket.ffn) == draw_masks(hand, spec).kept()
    assert (ticket.step, ticket.reason, ticket.spec) == (0, "given", spec)


@pytest.mark.slow
def test_width_profile_reads_each_step_against_the_final_ticket(tmp_path, minilm_dir):
    """Step 0 (the pre-trained encoder with a fresh head drawn with the seed) and a checkpoint holding that very
    state give the same ticket, the one oracle_ticket draws from a final model in that state, and keep of the final
    ticket what the two oracle tickets share; the last step is the final model's own ticket, all of it kept."""
    def encoder(head_seed: int) -> EarlyBertForSequenceClassification:
        torch.manual_seed(head_seed)
        return load_hf_bert(minilm_dir, EarlyBertForSequenceClassification, num_labels=3)

    rows = [{"text": f"paragraph {i} about {w} and more words", "label": i % 3}
            for i, w in enumerate("lists dicts sockets threads modules classes".split())]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for head_seed in (0, 1):
        run = runs[head_seed] = tmp_path / f"full{head_seed}"
        encoder(head_seed).save_pretrained(run / "final")
        load_tokenizer(minilm_dir).save_pretrained(run / "final")
        (run / "run_config.json").write_text(json.dumps({"model": {"init_from": str(minilm_dir)}}))
    ckpt = runs[1] / "checkpoints" / "global_step2"
    ckpt.mkdir(parents=True)
    torch.save({"module": encoder(0).state_dict()}, ckpt / "mp_rank_00_model_states.pt")  # DeepSpeed's layout
    spec = PruneSpec(ffn_ratio=0.4, ffn_multiple=1)
    profile = tickets.width_profile(runs[1], str(train), 16, 6, [0, 2, 5], 6, 0, spec)

    start, final = (Ticket.load(tickets.oracle_ticket(runs[s], str(train), 16, 6, tmp_path / f"o{s}.json", spec))
                    for s in (0, 1))
    shared = sum(len(set(a) & set(b)) for a, b in zip(start.ffn, final.ffn)) / sum(map(len, final.ffn))
    assert [r["step"] for r in profile] == [0, 2, 5]
    assert profile[0] == {**profile[1], "step": 0} and profile[0]["ffn_widths"] == start.intermediate_sizes
    assert profile[0]["ffn_kept_of_final"] == pytest.approx(shared) and 0.0 < shared < 1.0
    assert profile[2]["ffn_widths"] == final.intermediate_sizes
    assert profile[2]["ffn_kept_of_final"] == profile[2]["heads_kept_of_final"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("score", ["magnitude", "taylor"])
def test_gate_profile_reads_a_bf16_search_as_the_search_did(corpus, tmp_path, score):
    """A real bf16 search that draws at step 12 and saves at 4 and 8: the profile reads the gates' fp32 master copies
    (the module's bf16 copies are all still 1.0) and the Taylor sums from the checkpoints, and the ticket they give
    at step 8 lies at the very distance from the final ticket that the search itself logged at its check of step
    12 (checks every 4 steps)."""
    out = tmp_path / "run"
    proc = run_single(tiny_run_args(*corpus, out, **{
        "train.precision": "bf16", "earlybert.draw": "fixed", "earlybert.fixed_step": 12, "earlybert.detect_every": 4,
        "earlybert.score": score, "train.steps": 16, "train.save_every": 4, "train.keep_last": 10}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    module = torch.load(out / "checkpoints" / "global_step8" / "mp_rank_00_model_states.pt", weights_only=False)
    halves = torch.cat([v.flatten() for k, v in module["module"].items() if k.endswith("ffn_gates")])
    gates, taylor = tickets.checkpoint_gates(out / "checkpoints" / "global_step8")
    masters = torch.from_numpy(np.concatenate(gates.ffn))
    assert halves.dtype == torch.bfloat16 and torch.equal(masters.bfloat16(), halves)  # the module's copies, rounded
    assert (masters != halves.float()).float().mean() > 0.5 and (taylor is not None) == (score == "taylor")

    profile = tickets.gate_profile(out, [4, 8])
    logged = {m["step"]: m for m in metrics(out) if "mask_distance/ffn" in m}
    assert [r["step"] for r in profile] == [4, 8, 12] and sorted(logged) == [8, 12]
    assert profile[1]["distance_to_final"] == {"heads": logged[12]["mask_distance/heads"],
                                               "ffn": logged[12]["mask_distance/ffn"]}
    final = Ticket.load(out / "ticket")
    assert profile[2]["ffn_widths"] == final.intermediate_sizes and profile[2]["ffn_kept_of_final"] == 1.0
    assert all(0.0 < r["ffn_kept_of_final"] <= 1.0 and sum(r["ffn_widths"]) == sum(final.intermediate_sizes)
               for r in profile)


def test_same_widths_keeps_each_layers_width_with_other_units():
    given = Ticket(step=0, reason="given", heads=[[0, 1, 2], [3]], ffn=[list(range(40)), [0, 1]],
                   spec=PruneSpec(head_ratio=0.5, ffn_ratio=0.5, ffn_multiple=1), hidden_size=32,
                   num_attention_heads=4, intermediate_size=64)
    twin = tickets.same_widths(given, seed=3)
    assert twin.heads_per_layer == [3, 1] and twin.intermediate_sizes == [40, 2]
    assert twin.ffn[0] != given.ffn[0] and all(u == sorted(set(u)) for u in twin.heads + twin.ffn)
    assert twin == tickets.same_widths(given, seed=3) != tickets.same_widths(given, seed=4)
    twin.check()


def test_a_freed_run_slot_goes_to_the_earliest_waiting_job():
    """A matched control that waited for its method takes the next slot before later seeds that queued first."""
    slots, started = tickets._Slots(1), []
    held = threading.Event()

    def job(order: int) -> None:
        with slots.take(order):
            started.append(order)
            held.wait(0 if order else 10)  # job 0 holds the slot until every other job waits

    first = threading.Thread(target=job, args=(0,))
    first.start()
    later = [threading.Thread(target=job, args=(k,)) for k in (5, 3, 4, 1)]  # queued in this order, 1 last
    for t in later:
        t.start()
        time.sleep(0.05)
    held.set()
    for t in [first, *later]:
        t.join(10)
    assert started == [0, 1, 3, 4, 5]


def test_oracles_and_drawn_tickets_need_their_source_before_them():
    args = argparse.Namespace(quick=False, batch=None, lr=None, task="finetune", matched="", rewarmup=10, variant=[],
                              methods="oracle@dev,full")
    with pytest.raises(common.BenchError, match="'full' listed before them"):
        tickets._methods(args)
    args = argparse.Namespace(quick=False, batch=None, lr=None, task="finetune", matched="", rewarmup=10, variant=[],
                              methods="full,widths@next", seeds=1, profile_steps=[])
    with pytest.raises(common.BenchError, match="widths@next and oracle@next are drawn from another seed's full run"):
        tickets._methods(args)
    args = argparse.Namespace(quick=False, batch=None, lr=None, task="pretrain", matched="", rewarmup=10, variant=[],
                              methods="full,ticket@paper,paper")
    with pytest.raises(common.BenchError, match=r"ticket@paper trains the ticket \(or the widths\) of 'paper'"):
        tickets._methods(args)
    args.methods, args.matched = "full,random@0,widths@random@0", ""
    with pytest.raises(common.BenchError, match="widths@random@0 trains the ticket"):
        tickets._methods(args)
    args.methods, args.matched = "full,paper,ticket@paper", "ticket@paper"
    with pytest.raises(common.BenchError, match="random@0 is its control"):
        tickets._methods(args)
    args.methods, args.matched, args.seeds, args.profile_steps = "full,probe,widths@probe", "", 2, []
    assert tickets._methods(args)["widths@probe"] == ["--earlybert.draw", "given"]


def test_matched_control_keeps_the_method_and_draws_at_its_step():
    methods = tickets.ticket_methods(5e-5, 10)
    opts = tickets.matched_control(methods["continue"], 17)
    assert opts[:len(methods["continue"])] == methods["continue"]  # same weights rule, same search settings
    assert opts[-4:] == ["--earlybert.draw", "random_at", "--earlybert.fixed_step", "17"]
    assert methods["gate_lr1000"][-2:] == ["--earlybert.gate_lr", "0.05"]
    jobs = tickets._tickets_jobs(argparse.Namespace(first_seed=0, seeds=2, matched=["paper"]),
                               {"full": [], "paper": []})
    assert jobs == [("full", 0, None), ("paper", 0, None), ("random@paper", 0, "paper"),
                    ("full", 1, None), ("paper", 1, None), ("random@paper", 1, "paper")]
    jobs = tickets._tickets_jobs(argparse.Namespace(first_seed=3, seeds=2, matched=[]),
                                 {"full": [], "oracle@next": [], "widths@next": [], "random@0": []})
    assert jobs == [("full", 3, None), ("random@0", 3, None), ("full", 4, None), ("random@0", 4, None),
                    ("widths@next", 3, None), ("oracle@next", 3, None), ("widths@next", 4, None),
                    ("oracle@next", 4, None)]  # after the full runs they are drawn from


@pytest.mark.slow
def test_tickets_quick_runs_seeds_and_controls(tmp_path):
    """The suite end to end on a miniature docs tree, from a tiny BERT with its vocabulary: 2 seeds of full,
    EarlyBERT, the two random controls, EarlyBERT's own ticket trained from step 0 (ticket@paper), the probe's ticket
    and its widths with random units (widths@probe). FFN 256 wide in 2 layers: kept widths rounded up to 64
    (earlybert.ffn_multiple) still prune at 40%."""
    _docs_tree(tmp_path / "docs")
    text = " ".join(p.read_text() for p in sorted((tmp_path / "docs").rglob("*.txt")))
    model = tiny_bert_dir(tmp_path / "model", text, 120, intermediate_size=256)
    out = tmp_path / "tickets.json"
    proc = subprocess.run(
        [sys.executable, "-m", "earlybert_ds.bench", "tickets", "--quick", "--corpus", str(tmp_path / "docs"),
         "--model", str(model),
         "--methods", "full,paper,random@0,ticket@paper,probe,widths@probe", "--matched", "paper",
         "--out-dir", str(tmp_path / "runs"),
         "--plot", str(tmp_path / "t.png"), "--threads", "1", "--parallel", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {(r["method"], r["seed"]): r for r in result["runs"]}
    assert set(runs) == {(m, s) for m in ("full", "paper", "random@0", "random@paper", "ticket@paper", "probe",
                                          "widths@probe") for s in (0, 1)}
    for s in (0, 1):  # the control drew at the method's own step, with a random ticket
        assert runs[("random@paper", s)]["ticket_step"] == runs[("paper", s)]["ticket_step"] >= 1
        assert runs[("random@paper", s)]["ticket_reason"] == "random"
        assert runs[("random@0", s)]["ticket_step"] == 0
        drawn, given = (Ticket.load(tmp_path / "runs" / f"{m}-s{s}" / "ticket") for m in ("paper", "ticket@paper"))
        assert (given.step, given.reason, given.heads, given.ffn) == (0, "given", drawn.heads, drawn.ffn)
        probed, widths = (Ticket.load(tmp_path / "runs" / f"{m}-s{s}" / "ticket") for m in ("probe", "widths@probe"))
        assert (probed.step, probed.reason, widths.reason) == (0, "probe", "given")
        assert widths.intermediate_sizes == probed.intermediate_sizes and widths.ffn != probed.ffn
        assert runs[("probe", s)]["stages"]["probe"]["cpu_s"] > 0
    summary = result["summary"]
    assert summary["methods"]["full"]["metric"]["n"] == 2
    assert set(summary["paired"]) == {"paper", "ticket@paper", "probe", "widths@probe"}
    assert set(summary["paired"]["probe"]) == {"full", "random@0", "widths@probe"}
    probe = summary["methods"]["probe"]  # s: the probe's CPU time over the full run's; the bound 1 - (s + r)
    assert 0 < probe["search_share"] < 1
    assert probe["time_saved_bound"] == pytest.approx(1 - probe["search_share"] - probe["flop_ratio"])
    assert set(summary["paired"]["ticket@paper"]) == {"full", "random@0"}
    assert all(0 < r["train_loss"] < 20 for r in runs.values())  # each run's own metrics.jsonl, read back
    assert "train_loss" in summary["paired"]["paper"]["random@paper"]
    assert (tmp_path / "t.png").stat().st_size > 0 and "paired differences" in proc.stdout


@pytest.mark.slow
def test_lamb_suite_matches_tokens_and_scales_the_rate(corpus, tmp_path):
    """Large-batch LAMB against small-batch AdamW: the same tokens, LAMB's batch by accumulation, its learning rate
    scaled by the square root of the batch ratio, both under ZeRO-2, and the paired difference computed by seed."""
    out = tmp_path / "lamb.json"
    proc = subprocess.run(
        [sys.executable, "-m", "earlybert_ds.bench", "lamb", "--model-size", "tiny", "--steps", "16",
         "--small-batch", "4", "--large-batch", "16", "--lamb-lr", "5e-3", "--seeds", "2", "--eval-batches", "2",
         "--threads", "1", "--parallel", "2", "--corpus", str(corpus[0]), "--cache-dir", str(corpus[1]),
         "--out-dir", str(tmp_path / "runs"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {(r["arm"], r["seed"]): r for r in result["runs"]}
    assert set(runs) == {(a, s) for a in ("adamw", "lamb") for s in (0, 1)}
    for s in (0, 1):
        adamw, lamb = runs[("adamw", s)], runs[("lamb", s)]
        assert (adamw["steps"], lamb["steps"]) == (16, 4)  # 16 x 4 sequences = 4 x 16
        cmd = lamb["command"]
        assert cmd[cmd.index("--train.grad_accum") + 1] == "4" and cmd[cmd.index("--train.zero_stage") + 1] == "2"
        assert float(cmd[cmd.index("--train.lr") + 1]) == pytest.approx(5e-3 * 2)
        assert cmd[cmd.index("--corpus") + 1] == str(corpus[0]) == adamw["command"][cmd.index("--corpus") + 1]
    s = result["summary"]
    diffs = [runs[("lamb", k)]["final_val_loss"] - runs[("adamw", k)]["final_val_loss"] for k in (0, 1)]
    assert s["diffs"] == pytest.approx(diffs) and s["lamb_minus_adamw"]["mean"] == pytest.approx(np.mean(diffs))
    assert "LAMB − AdamW" in proc.stdout


@pytest.mark.slow
def test_probe_variants_draw_without_training_and_compare_with_the_oracle(tiny_bert):
    """Each setting of the probe, without training: the probed head with Taylor scores draws the probe route's own
    ticket (all of it kept when that ticket is the oracle), the others their own widths and shares."""
    model, data = tiny_bert
    cfg = RunConfig.from_dict({"finetune.task": "custom", "model.init_from": str(model),
                               "finetune.train_file": str(data / "train.jsonl"),
                               "finetune.dev_file": str(data / "dev.jsonl"), "finetune.text_a": "text",
                               "finetune.max_len": 16, "train.micro_batch_size": 8, "earlybert.probe_examples": 48,
                               "earlybert.probe_batches": 3, "earlybert.ffn_multiple": 1})
    alone = tickets.probe_variants(cfg, None)  # as the suite calls it: the tokenizer is the model's
    assert cfg.data.tokenizer == str(model) and all("ffn_kept_of_oracle" not in r for r in alone)
    task = ClassificationTask(cfg)
    probed, _, _ = probe_and_draw(initial_model(cfg, task, gates=True), task.train, cfg.earlybert, 8, cfg.train.seed)
    rows = tickets.probe_variants(cfg, probed)
    assert [r["ffn_widths"] for r in rows] == [r["ffn_widths"] for r in alone]  # the oracle only compares
    assert [(r["head"], r["score"], r["normalise"]) for r in rows] == [
        (h, s, n) for h in ("fresh", "probed") for s in ("taylor", "fisher") for n in (False, True)]
    same = rows[4]  # the probed head, Taylor, raw: the probe route's own ticket
    assert same["ffn_widths"] == probed.intermediate_sizes
    assert same["ffn_kept_of_oracle"] == same["heads_kept_of_oracle"] == 1.0
    assert all(sum(r["ffn_widths"]) == sum(probed.intermediate_sizes) for r in rows)  # global FFN ratio: the same
    assert all(0 <= r["ffn_kept_of_oracle"] <= 1 and 0 <= r["heads_kept_of_oracle"] <= 1 for r in rows)


class _FusedAdamOnTorch(FusedAdam, torch.optim.AdamW):
    """DeepSpeed's FusedAdam as DeepSpeed's engine sees it, so that bf16 at ZeRO-0 wraps it in FP16_Optimizer as on a
    GPU with ``"torch_adam": false``, stepped by torch's AdamW: FusedAdam's kernel is not compiled for the CPU."""

    def __init__(self, params: list[dict], lr: float) -> None:
        torch.optim.AdamW.__init__(self, params, lr=lr)

    step = torch.optim.AdamW.step
    zero_grad = torch.optim.AdamW.zero_grad


@pytest.mark.parametrize("precision,stage,fused,layout", [
    ("fp32", 0, False, "the module's own fp32 gates"),
    ("bf16", 0, False, "FP16_UnfusedOptimizer: fp32_groups"),
    ("bf16", 0, True, "FP16_Optimizer: fp32_groups_flat"),
    ("bf16", 1, False, "ZeRO-1 partitions"),
    ("bf16", 2, False, "ZeRO-2 partitions"),
    ("bf16", 3, False, "ZeRO-3 partitions"),
])
def test_checkpoint_gates_reads_the_fp32_masters_in_every_layout(distributed, monkeypatch, tmp_path, precision, stage,
                                                                 fused, layout):
    """A real engine of each kind saves a search checkpoint after a few steps: the gates read back from it are the
    optimizer's fp32 masters exactly as the live engine holds them; in bf16 the module's copies are all still 1.0,
    so reading those instead would be wrong. (The FP16_Optimizer layout exists only with a FusedAdam: handed to the
    engine as its optimizer, see :class:`_FusedAdamOnTorch`.)"""
    from earlybert_ds import engine as engine_module
    from earlybert_ds.config import RunConfig
    from earlybert_ds.engine import Engine
    from earlybert_ds.modeling import EarlyBertForPreTraining
    from earlybert_ds.search import read_gates

    if fused:  # FP16_Optimizer steps flat groups, as the ZeRO wrappers do: no per-parameter partitions to record
        monkeypatch.setattr(engine_module, "make_client_optimizer", lambda _, groups, t: _FusedAdamOnTorch(groups, t.lr))
        monkeypatch.setattr(engine_module, "zero_partitions", lambda wrapper: {})
    run = RunConfig.from_dict({"train": {
        "precision": precision, "zero_stage": stage, "lr": 1e-4, "warmup_steps": 0, "steps": 200}})
    torch.manual_seed(0)
    engine = Engine(EarlyBertForPreTraining(tiny_config(use_gates=True, gate_l1_heads=1e-2, gate_l1_ffn=1e-2)), run)
    try:
        batch = tiny_mlm_batch()
        for step in range(3):
            engine.train_step([batch], step)
        engine.engine.save_checkpoint(str(tmp_path / "ckpt"), tag="global_step3")
        live = read_gates(engine.module, engine.optimizer)
        wrapper = type(engine.engine.optimizer).__name__
    finally:
        engine.destroy()
    assert layout.split(":")[0] in (wrapper, "the module's own fp32 gates", f"ZeRO-{stage} partitions")
    gates, _ = tickets.checkpoint_gates(tmp_path / "ckpt" / "global_step3")
    for read, want in zip(gates.heads + gates.ffn, live.heads + live.ffn, strict=True):
        assert read.dtype == np.float32 and np.array_equal(read, want), layout
    moved = np.abs(np.concatenate(gates.heads + gates.ffn) - 1).max()
    assert (1e-5 < moved < 2**-9) if precision == "bf16" else moved > 1e-5  # bf16 copies would all read 1.0


def test_checkpoint_gates_refuses_a_layout_it_does_not_read(distributed, tmp_path):
    """bf16 ZeRO-1 with fp32 gradient accumulation runs DeepSpeed's BF16_Optimizer, whose masters are not read:
    refused, naming the layout, rather than read off the rounded module."""
    from earlybert_ds.config import RunConfig
    from earlybert_ds.engine import Engine
    from earlybert_ds.modeling import EarlyBertForPreTraining

    (tmp_path / "ds.json").write_text(json.dumps({"data_types": {"grad_accum_dtype": "fp32"}}))
    run = RunConfig.from_dict({"deepspeed": str(tmp_path / "ds.json"), "train": {"precision": "bf16",
                                                                                 "zero_stage": 1, "warmup_steps": 0}})
    engine = Engine(EarlyBertForPreTraining(tiny_config(use_gates=True)), run)
    try:
        assert type(engine.engine.optimizer).__name__ == "BF16_Optimizer"
        engine.engine.save_checkpoint(str(tmp_path / "ckpt"), tag="global_step0")
    finally:
        engine.destroy()
    with pytest.raises(common.BenchError, match="BF16_Optimizer"):
        tickets.checkpoint_gates(tmp_path / "ckpt" / "global_step0")
