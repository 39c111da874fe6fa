"""The data pipeline on real text: the built-in corpus, corpus files and their errors, WordPiece training against the
real MiniLM tokenizer, packed caches, MLM masking statistics and determinism, sharded sampling and resumes."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from earlybert_ds import data
from earlybert_ds.config import DataArgs
from earlybert_ds.data import (
    IGNORE_INDEX,
    DataError,
    MLMMasker,
    ShardedBatches,
    builtin_corpus,
    collate,
    continuation_mask,
    load_corpus,
    load_packed,
    load_tokenizer,
    prepare_corpus,
    train_wordpiece,
    val_batches,
)

SENTENCE = "the parser returns a list of tokens, and the caller checks each one."


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def small_docs() -> list[str]:
    return builtin_corpus(300_000)


@pytest.fixture(scope="module")
def wordpiece(small_docs):
    return train_wordpiece(small_docs, 2000)


@pytest.fixture(scope="module")
def packed_builtin(minilm, tmp_path_factory):
    """The default corpus packed with the real MiniLM vocabulary."""
    args = DataArgs(seq_len=128, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return args, load_packed(prepare_corpus(args, minilm, seed=7))


# ---- the built-in corpus ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_builtin_corpus_is_english_prose_and_deterministic():
    docs = builtin_corpus()
    text = "\n".join(docs)
    assert 1_000_000 < len(text) <= data.BUILTIN_MAX_CHARS + len(docs)
    assert len(docs) > 300 and min(map(len, docs)) > 20
    words = Counter(text.lower().split())
    top = {w for w, _ in words.most_common(15)}
    assert {"the", "of", "to", "a", "is", "and"} <= top
    assert words["the"] / sum(words.values()) > 0.03  # English: 'the' is ~5% of words
    assert len(re.sub(r"[^A-Za-z\s]", "", text)) > 0.9 * len(text)  # prose, not code
    before = set(sys.modules)
    fresh = list(data._builtin.__wrapped__(200_000))  # recomputed, not the cached list
    assert fresh == builtin_corpus(200_000)
    assert fresh[:-1] == docs[: len(fresh) - 1]  # a smaller budget is a prefix
    assert not {"antigravity", "aifc", "argparse", "asyncio.base_events"} & (set(sys.modules) - before)


# ---- corpus files -----------------------------------------------------------------------------------------------

def test_load_text_file_splits_long_files_into_documents(tmp_path, small_docs):
    short = tmp_path / "short.txt"
    short.write_text("First paragraph here.\n\n\n  Second one,\nover two lines.  \n")
    assert load_corpus(str(short))["text"] == ["First paragraph here.\nSecond one,\nover two lines."]
    long = tmp_path / "long.md"
    long.write_text("\n\n".join(small_docs[:60]))
    docs = load_corpus(str(long))["text"]
    assert len(docs) > 3 and max(map(len, docs)) <= data._DOC_CHARS + max(map(len, small_docs[:60]))
    assert " ".join(docs).split() == " ".join(small_docs[:60]).split()  # nothing lost or reordered


def test_load_directory_recursively_sorted_skipping_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.rst").write_text("zeta document text")
    (tmp_path / "a.txt").write_text("alpha document text")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "index").write_bytes(b"\0\1\2binary")
    assert load_corpus(str(tmp_path))["text"] == ["alpha document text", "zeta document text"]


def test_load_jsonl_and_parquet_columns(tmp_path):
    rows = [{"body": "one document", "n": 1}, {"body": "  ", "n": 2}, {"body": None, "n": 3},
            {"body": "two documents", "n": 4}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_corpus(str(jsonl), text_column="body")
    assert ds.column_names == ["text"] and ds["text"] == ["one document", "two documents"]
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["uno", "dos", "tres"], "id": [1, 2, 3]}), parquet)
    assert load_corpus(str(parquet))["text"] == ["uno", "dos", "tres"]


@pytest.mark.parametrize("case", ["missing", "missing_relative", "empty", "empty_dir", "binary", "latin1",
                                  "no_column", "not_text", "bad_json", "hub"])
def test_corpus_errors_name_the_file(tmp_path, case):
    target, column, expect = tmp_path / "corpus.txt", "text", ""
    if case == "missing":
        expect = "not found"
    elif case == "missing_relative":
        target, expect = "data/corpus.jsonl", "not found"
    elif case == "empty":
        target.write_text(" \n\n\t\n")
        expect = "corpus is empty"
    elif case == "empty_dir":
        target, expect = tmp_path, "corpus is empty"
    elif case == "binary":  # inside a directory: the message names the file
        (tmp_path / "a.txt").write_text("fine text")
        (tmp_path / "b.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
        target, expect = tmp_path, "b.bin: binary"
    elif case == "latin1":
        target.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
        expect = "not UTF-8"
    elif case in ("no_column", "not_text"):
        target = tmp_path / "c.jsonl"
        target.write_text('{"body": "x", "n": 1}\n')
        column, expect = ("text", "no column 'text'") if case == "no_column" else ("n", "not text")
    elif case == "bad_json":
        target = tmp_path / "c.jsonl"
        target.write_text('{"text": "x"\n')
        expect = "cannot read"
    elif case == "hub":
        target, expect = "someone/surely-not-a-corpus", "datasets hub"
    with pytest.raises(DataError, match=expect) as err:
        load_corpus(str(target), column)
    assert str(target) in str(err.value)


# ---- tokenizers -------------------------------------------------------------------------------------------------

def test_trained_wordpiece_is_bert_shaped_deterministic_and_round_trips(wordpiece, small_docs, tmp_path):
    tok = wordpiece
    assert len(tok) == 2000
    assert [tok.convert_tokens_to_ids(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 2, 3, 4)
    enc = tok(SENTENCE)["input_ids"]
    assert enc[0] == 2 and enc[-1] == 3 and tok.unk_token_id not in enc
    assert tok.decode(enc, skip_special_tokens=True) == SENTENCE
    assert tok(SENTENCE.upper())["input_ids"] == enc  # uncased
    assert train_wordpiece(small_docs, 2000).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded(small_docs[:20])["input_ids"] == tok(small_docs[:20])["input_ids"]
    cont = continuation_mask(loaded)
    assert cont.sum() == sum(t.startswith("##") for t in loaded.get_vocab()) > 100


def test_wordpiece_pipeline_matches_the_real_minilm_tokenizer(minilm, small_docs):
    assert len(minilm) == 30522 and minilm.all_special_ids  # a real uncased BERT vocabulary
    assert minilm("Hello world")["input_ids"] == [101, 7592, 2088, 102]
    ours = data._bert_pipeline(minilm.get_vocab())  # our normaliser + pre-tokeniser + WordPiece on MiniLM's vocab
    docs = small_docs[:40]
    want = minilm(docs, add_special_tokens=False, truncation=False, padding=False, verbose=False)["input_ids"]
    assert [e.ids for e in ours.encode_batch(docs, add_special_tokens=False)] == want
    assert sum(map(len, want)) > 20_000


@pytest.mark.parametrize("case", ["missing", "empty", "junk"])
def test_load_tokenizer_errors_name_the_path(tmp_path, case):
    path = tmp_path / "tok"
    if case != "missing":
        path.mkdir()
    if case == "junk":
        (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError) as err:
        load_tokenizer(path)
    assert str(path) in str(err.value)


# ---- packing and the cache --------------------------------------------------------------------------------------

def test_packing_matches_an_independent_tokenisation(minilm, small_docs, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in small_docs))
    args = DataArgs(corpus=str(corpus), seq_len=64, val_fraction=0.05, cache_dir=str(tmp_path / "cache"))
    packed = load_packed(prepare_corpus(args, minilm, seed=3))
    ids = minilm(small_docs, add_special_tokens=False, truncation=False, padding=False, verbose=False)["input_ids"]
    stream = np.concatenate([np.array(x + [102]) for x in ids])
    n = len(stream) // 62
    want = np.concatenate([np.full((n, 1), 101), stream[: n * 62].reshape(n, 62), np.full((n, 1), 102)], axis=1)
    n_val = round(0.05 * n)
    assert packed.train.shape == (n - n_val, 64) and packed.val.shape == (n_val, 64)
    assert packed.train.dtype == np.uint16 and isinstance(packed.train, np.memmap)
    is_val = np.isin([r.tobytes() for r in want.astype(np.uint16)], [r.tobytes() for r in packed.val])
    assert is_val.sum() == n_val
    np.testing.assert_array_equal(packed.train, want[~is_val])  # train rows keep corpus order
    np.testing.assert_array_equal(packed.val, want[is_val])
    assert packed.meta["num_documents"] == len(small_docs) and packed.meta["num_tokens"] == len(stream)
    assert packed.vocab_size == 30522
    assert packed.special_ids == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    other = load_packed(prepare_corpus(args, minilm, seed=4))  # another seed: another split, same rows
    assert not np.array_equal(other.val, packed.val)
    assert sorted(r.tobytes() for r in np.concatenate([other.train, other.val])) == sorted(
        r.tobytes() for r in want.astype(np.uint16))


def test_default_corpus_cache_is_reused_without_retokenising(packed_builtin, minilm, monkeypatch, caplog):
    args, packed = packed_builtin
    assert packed.train.shape[1] == 128 and len(packed.train) > 4000
    both = np.concatenate([packed.train, packed.val])
    assert (both[:, 0] == 101).all() and (both[:, -1] == 102).all() and (both != 0).all()  # no padding
    assert len(packed.val) == round(0.02 * len(both))
    path = data.cache_path(args, minilm, 7)
    mtime = (path / "meta.json").stat().st_mtime_ns

    def no_corpus(*a, **k):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(data, "load_corpus", no_corpus)
    with caplog.at_level(logging.INFO, logger="earlybert_ds.data"):
        assert prepare_corpus(args, minilm, seed=7) == path
    assert "reusing cache" in caplog.text and (path / "meta.json").stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporaries left behind


def test_cache_key_follows_the_corpus_file(wordpiece, small_docs, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(small_docs[:30]))
    args = DataArgs(corpus=str(corpus), seq_len=32, cache_dir=str(tmp_path / "cache"))
    first = prepare_corpus(args, wordpiece, seed=0)
    assert load_packed(first).meta["vocab_size"] == 2000
    corpus.write_text("\n\n".join(small_docs[:31]))
    assert prepare_corpus(args, wordpiece, seed=0) != first
    assert prepare_corpus(DataArgs(**{**vars(args), "seq_len": 64}), wordpiece, seed=0) != first


def test_too_small_corpus_and_missing_cache(minilm, tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("just a few words")
    with pytest.raises(DataError, match="at least 2") as err:
        prepare_corpus(DataArgs(corpus=str(corpus), cache_dir=str(tmp_path)), minilm, seed=0)
    assert str(corpus) in str(err.value)
    with pytest.raises(DataError, match="no meta.json"):
        load_packed(tmp_path / "nothing")


# ---- masking ----------------------------------------------------------------------------------------------------

def test_mlm_masking_statistics(packed_builtin, minilm):
    _, packed = packed_builtin
    idx = np.arange(600)
    ids = torch.from_numpy(packed.train[idx].astype(np.int64))
    out, labels = MLMMasker.from_tokenizer(minilm)(ids, idx, seed=1)
    special = torch.isin(ids, torch.tensor(minilm.all_special_ids))
    picked = labels != IGNORE_INDEX
    assert not (picked & special).any() and torch.equal(out[~picked], ids[~picked])
    assert torch.equal(labels[picked], ids[picked])
    per_row = torch.round(0.15 * (~special).sum(1)).clamp(min=1)
    assert torch.equal(picked.sum(1), per_row.long())  # exactly round(15%) of the non-special tokens per row
    n = picked.sum().item()
    as_mask = (out[picked] == 103).float().mean().item()
    kept = (out[picked] == ids[picked]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(1 - as_mask - kept - 0.1) < 0.01, n
    replaced = out[picked & (out != 103) & (out != ids)]
    assert not torch.isin(replaced, torch.tensor(minilm.all_special_ids)).any()
    assert len(set(replaced.tolist())) > 0.8 * len(replaced)  # spread over the vocabulary


def test_masks_depend_only_on_seed_and_sample_index(packed_builtin, minilm):
    _, packed = packed_builtin
    masker = MLMMasker.from_tokenizer(minilm)
    idx = np.array([11, 4, 250, 3])
    ids = torch.from_numpy(packed.train[idx].astype(np.int64))
    out, labels = masker(ids, idx, seed=5)
    sub_out, sub_labels = masker(ids[[2, 0]], idx[[2, 0]], seed=5)  # another batch composition
    assert torch.equal(sub_out, out[[2, 0]]) and torch.equal(sub_labels, labels[[2, 0]])
    assert not torch.equal(masker(ids, idx, seed=6)[1], labels)
    assert not torch.equal(masker(ids, idx + 1, seed=5)[1], labels)
    row = torch.tensor([[101, 102, 7592, 102, 0]])  # a single maskable token is always masked
    assert masker(row, np.array([0]), seed=0)[1].tolist() == [[-100, -100, 7592, -100, -100]]


def test_whole_word_masking_keeps_words_together(packed_builtin, minilm):
    _, packed = packed_builtin
    idx = np.arange(300)
    ids = torch.from_numpy(packed.train[idx].astype(np.int64))
    _, labels = MLMMasker.from_tokenizer(minilm, whole_word_mask=True)(ids, idx, seed=2)
    picked = (labels != IGNORE_INDEX).numpy()
    cont = continuation_mask(minilm)[ids.numpy()]
    special = np.isin(ids.numpy(), minilm.all_special_ids)
    inner = cont[:, 1:] & ~special[:, :-1]  # a piece whose word start is in the same row
    assert inner.sum() > 1000 and (picked[:, 1:][inner] == picked[:, :-1][inner]).all()
    assert picked[:, 1:][inner].sum() > 50  # multi-piece words do get masked
    frac = picked.sum() / (~special).sum()
    assert 0.13 < frac <= 0.15


def test_collate_and_validation_batches(packed_builtin, minilm):
    _, packed = packed_builtin
    masker = MLMMasker.from_tokenizer(minilm)
    batch = collate(packed.train, np.array([9, 1, 4]), masker, seed=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "masked_positions", "sample_idx"}
    assert all(t.dtype == torch.long for t in batch.values()) and batch["input_ids"].shape == (3, 128)
    # the MLM targets' flat indices, found on the host: the model selects them without waiting for the device
    assert torch.equal(batch["masked_positions"], (batch["labels"] != IGNORE_INDEX).flatten().nonzero().squeeze(1))
    assert (batch["attention_mask"] == 1).all() and batch["sample_idx"].tolist() == [9, 1, 4]
    ranks = [val_batches(packed.val, 3, 4, 2, r, masker) for r in (0, 1)]
    assert [len(b) for b in ranks] == [4, 4]
    rows = [b["sample_idx"] for b in ranks[0]], [b["sample_idx"] for b in ranks[1]]
    assert torch.equal(torch.sort(torch.cat(rows[0] + rows[1])).values, torch.arange(24))
    again = val_batches(packed.val, 3, 4, 2, 0, masker)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(again, ranks[0]))
    small = packed.val[:5]
    assert [len(val_batches(small, 2, 10, 2, r, masker)) for r in (0, 1)] == [1, 1]
    assert val_batches(small, 4, 10, 2, 1, masker)[0]["sample_idx"].tolist() == [4, 0, 1, 2]  # wraps around


# ---- sharded sampling -------------------------------------------------------------------------------------------

def _steps(n: int, micro: int, accum: int, world: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    """Per step, all ranks' indices in rank order."""
    shards = [ShardedBatches(n, micro, accum, world, r, seed) for r in range(world)]
    return [np.concatenate([np.concatenate(s.next_step()) for s in shards]) for _ in range(steps)]


def test_ranks_are_disjoint_and_epochs_are_permutations():
    steps = _steps(120, 4, 2, 3, 10)  # global batch 24: five steps per epoch
    assert all(len(set(s.tolist())) == 24 for s in steps)
    epochs = [np.sort(np.concatenate(steps[i:i + 5])) for i in (0, 5)]
    assert all(np.array_equal(e, np.arange(120)) for e in epochs)
    assert not np.array_equal(np.concatenate(steps[:5]), np.concatenate(steps[5:]))  # reshuffled
    stream = np.concatenate(_steps(103, 5, 1, 2, 60))  # epochs straddle steps
    assert all(np.array_equal(np.sort(stream[i:i + 103]), np.arange(103)) for i in range(0, 500, 103))
    micro = ShardedBatches(103, 5, 3, 2, 1, 0).next_step()
    assert [len(m) for m in micro] == [5, 5, 5]


def test_resume_and_world_size_change_continue_the_same_stream():
    ref = ShardedBatches(97, 4, 2, 2, 1, seed=9)
    full = [ref.next_step() for _ in range(12)]
    part = ShardedBatches(97, 4, 2, 2, 1, seed=9)
    for _ in range(5):
        part.next_step()
    resumed = ShardedBatches(97, 4, 2, 2, 1, seed=9)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert resumed.state_dict() == {"consumed": 80} and resumed.epoch == 0
    for want in full[5:]:
        assert all(np.array_equal(a, b) for a, b in zip(resumed.next_step(), want))
    one, two, four = _steps(97, 8, 2, 1, 15), _steps(97, 4, 2, 2, 15), _steps(97, 4, 1, 4, 15)
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(one, two, four))
    assert not np.array_equal(np.concatenate(one), np.concatenate(_steps(97, 8, 2, 1, 15, seed=1)))


def test_every_epoch_masks_a_sequence_anew_and_deterministically(corpus):
    """The pre-training task masks the same sequence differently in each epoch (BERT: 10 masks per sequence), yet as
    a pure function of (seed, sample, epoch): a resume in epoch 1 and 2 ranks give the same batches."""
    from earlybert_ds.config import RunConfig
    from earlybert_ds.pretrain import MLMTask

    cfg = RunConfig()
    cfg.data.corpus, cfg.data.cache_dir, cfg.data.vocab_size, cfg.data.seq_len = str(corpus[0]), str(corpus[1]), 600, 32
    cfg.train.micro_batch_size = 64
    task = MLMTask(cfg)
    n = len(task.packed.train)
    seen: dict[tuple[int, int], np.ndarray] = {}
    while task.batches.consumed < 2 * n + 64:
        state = task.state_dict()
        for mb in task.next_step():
            for i, labels, epoch in zip(mb["sample_idx"].tolist(), mb["labels"].numpy(),
                                        [(state["consumed"] + k) // n for k in range(len(mb["labels"]))]):
                seen[(epoch, i)] = labels != IGNORE_INDEX
        if state["consumed"] < n <= state["consumed"] + 64:  # the step that crosses into epoch 1
            crossing = state
    same = [np.array_equal(seen[(0, i)], seen[(1, i)]) for i in range(n)]
    assert sum(same) < 0.02 * n, f"{sum(same)} of {n} sequences masked alike in epochs 0 and 1"
    again = MLMTask(cfg)  # a resume just before epoch 1
    again.load_state_dict(crossing)
    task.load_state_dict(crossing)
    assert all(torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(again.next_step(), task.next_step()))
    one = ShardedBatches(n, 8, 1, 1, 0, seed=3)
    two = [ShardedBatches(n, 4, 1, 2, r, seed=3) for r in (0, 1)]
    for s in (one, *two):
        s.load_state_dict({"consumed": n - 4})  # a global step that straddles epochs 0 and 1
    want = [collate(task.packed.train, i, task.masker, 3, e) for i, e in one.next_step_epochs()][0]
    got = [collate(task.packed.train, i, task.masker, 3, e) for s in two for i, e in s.next_step_epochs()]
    assert torch.equal(torch.cat([g["labels"] for g in got]), want["labels"])


_ANON_PEAK = """
import json, sys, threading, time
from earlybert_ds.config import DataArgs
from earlybert_ds.data import load_tokenizer, prepare_corpus
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) / 1024
tok = load_tokenizer(sys.argv[3])
base, peak = anon(), [0.0]
def watch():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
prepare_corpus(DataArgs(corpus=sys.argv[1], cache_dir=sys.argv[2], seq_len=128), tok, seed=0)
time.sleep(0.1)
print(json.dumps(peak[0] - base))
"""


@pytest.mark.slow
def test_preparing_a_corpus_holds_neither_its_text_nor_its_tokens_in_memory(tmp_path, minilm_dir, small_docs):
    """20 MB of plain text: the preparing process's anonymous memory grows by far less than the corpus (documents
    and token ids go through memory-mapped Arrow files, the packed arrays are written chunk by chunk). Measured:
    +354 MB for 30 MB of text before (all text, then int64 ids, then copies in memory), +44 MB after."""
    import subprocess

    corpus = tmp_path / "big.txt"
    block = "\n\n".join(small_docs)
    with open(corpus, "w", encoding="utf-8") as f:
        while f.tell() < 20e6:
            f.write(block + "\n\n")
    proc = subprocess.run([sys.executable, "-c", _ANON_PEAK, str(corpus), str(tmp_path / "cache"), str(minilm_dir)],
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth_mb = json.loads(proc.stdout.strip().splitlines()[-1])
    assert growth_mb < 100, f"+{growth_mb:.0f} MB of anonymous memory to prepare 20 MB of text"
    packed = load_packed(next((tmp_path / "cache").iterdir()))
    assert isinstance(packed.train, np.memmap) and packed.train.dtype == np.uint16
    assert packed.meta["num_tokens"] > 4_000_000


def test_parallel_tokenisation_gives_the_same_cache(tmp_path, minilm, small_docs):
    words = " ".join(small_docs).split()
    docs = [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)]
    assert len(docs) > 2000  # two processes: one per 1000 documents at most
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    packs = [load_packed(prepare_corpus(DataArgs(corpus=str(corpus), seq_len=32, num_workers=w,
                                                 cache_dir=str(tmp_path / f"cache{w}")), minilm, seed=1))
             for w in (1, 2)]
    np.testing.assert_array_equal(packs[0].train, packs[1].train)
    np.testing.assert_array_equal(packs[0].val, packs[1].val)
    assert packs[0].meta == packs[1].meta and packs[0].meta["num_documents"] == len(docs)
