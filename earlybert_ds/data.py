"""Pre-training data: corpus loading, WordPiece tokenizers, packed-sequence caches, MLM masking and sharded sampling.

Everything random here is a pure function of ``(seed, what, index)`` rather than of a generator's running state:
the validation split of ``seed``, the order of epoch ``e``, the masks of sample ``i`` in epoch ``e``. That is what makes a
resumed run bit-exact, whatever the world size, batch composition or restart point.

The flow on each rank::

    tokenizer = load_tokenizer(path)        # or train_wordpiece(...) on rank 0, saved, then loaded everywhere
    if rank == 0:
        prepare_corpus(data_args, tokenizer, seed)    # tokenise + pack once; later calls reuse the cache
    barrier()
    packed = load_packed(prepare_corpus(data_args, tokenizer, seed))   # cache hit: no corpus work
    batches = ShardedBatches(len(packed.train), micro, accum, world, rank, seed)
    masker = MLMMasker.from_tokenizer(tokenizer, data_args.mlm_probability, data_args.whole_word_mask)
    for idx, epochs in batches.next_step_epochs():
        batch = collate(packed.train, idx, masker, seed, epochs)
"""

from __future__ import annotations

import ast
import functools
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

from .atomic import atomic_directory
from .config import DataArgs
from .digest import json_digest
from .modeling import IGNORE_INDEX, mlm_positions

if TYPE_CHECKING:  # imported where a corpus is prepared: a run from a prepared cache needs neither
    import datasets
    import pyarrow as pa

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in trained vocabularies
BUILTIN_MAX_CHARS = 3_000_000
CACHE_FORMAT = 1
_DOC_CHARS = 10_000  # text files are cut into documents of about this size (paragraphs merged)
_TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_FILE_SUFFIXES = (".txt", ".md", ".rst", *_TABLE_FORMATS)
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")
_SPLIT, _ORDER, _MASK = 0, 1, 2  # stream tags: the val split, epoch orders and masks never share random numbers


class DataError(ValueError):
    """A corpus, tokenizer or cache that cannot be used; the message names the path and the problem."""


# ---- the built-in corpus ----------------------------------------------------------------------------------------

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STMT_NODES = (ast.stmt, ast.excepthandler, ast.match_case)
_NOT_PROSE = re.compile(r"[^A-Za-z ]")


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of a module and of every class and function in it (statements only: expressions have none)."""
    if isinstance(node, _DOC_NODES) and (doc := ast.get_docstring(node)):
        yield doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _STMT_NODES):
            yield from _docstrings(child)


def _comment_blocks(source: str) -> Iterator[str]:
    """Comments on consecutive lines, one line each: a block usually is one sentence or paragraph."""
    block: list[str] = []
    last = -1
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        if block and tok.start[0] != last + 1:
            yield "\n".join(block)
            block = []
        block.append(tok.string.lstrip("#!"))
        last = tok.start[0]
    if block:
        yield "\n".join(block)


def _is_prose(line: str) -> bool:
    """Mostly letters and not a doctest: drops code examples, ASCII tables and separators."""
    line = line.strip()
    return not line.startswith((">>>", "...")) and len(_NOT_PROSE.sub("", line)) >= 0.85 * len(line)


def _clean(bit: str) -> str:
    """Prose lines of a docstring or comment block, whitespace collapsed; '' if under five words remain."""
    words = " ".join(line for line in bit.splitlines() if _is_prose(line)).split()
    return " ".join(words) if len(words) >= 5 else ""


def _module_text(path: Path) -> str:
    """One module's docstrings and comment blocks, cleaned; '' if it does not parse."""
    try:
        with tokenize.open(path) as f:
            source = f.read()
        bits = [*_docstrings(ast.parse(source)), *_comment_blocks(source)]
    except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
        return ""
    return "\n".join(text for text in map(_clean, bits) if text)


@functools.cache
def _builtin(max_chars: int) -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "encodings"}  # encodings: generated codec tables
    files = sorted((p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    docs, total = [], 0
    # pure-Python parsing is the bottleneck: fan out over forked processes (they need no imports)
    with multiprocessing.get_context("fork").Pool(min(os.cpu_count() or 1, 8)) as pool:
        for text in filter(None, pool.imap(_module_text, files, chunksize=4)):
            if total + len(text) >= max_chars:
                docs.append(text[: max_chars - total].rsplit(" ", 1)[0])
                break
            docs.append(text)
            total += len(text)
    return tuple(docs)


def builtin_corpus(max_chars: int = BUILTIN_MAX_CHARS) -> list[str]:
    """English prose that every Python installation carries offline: the docstrings (read with ``ast``) and comment
    blocks (read with ``tokenize``, never importing anything) of the standard library's modules, one document per
    module, modules in sorted order, cut at ``max_chars`` characters. Deterministic for a given Python build."""
    return list(_builtin(max_chars))


# ---- corpora ----------------------------------------------------------------------------------------------------

def _text_files(root: Path) -> list[Path]:
    """Files under ``root``, recursively, sorted, skipping hidden ones (``.git``, editor swap files...)."""
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _units(path: Path) -> Iterator[str]:
    """A text file's paragraphs (split at blank lines), an over-long one (> ``_DOC_CHARS``) as its lines, read line
    by line: memory stays bounded by the longest line, whatever the file's size."""
    with open(path, "rb") as f:
        if b"\0" in f.read(1 << 16):
            raise DataError(f"{path}: binary file, not text")
    para: list[str] = []
    size = 0
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if "\0" in line:
                    raise DataError(f"{path}: binary file, not text (NUL on line {lineno})")
                line = line.rstrip("\n")
                if not line.strip():  # a blank line ends the paragraph
                    if para and size <= _DOC_CHARS:
                        yield "\n".join(para)
                    para, size = [], 0
                elif size > _DOC_CHARS:  # long paragraph: already given line by line
                    yield line
                else:
                    para.append(line)
                    size += len(line) + (len(para) > 1)
                    if size > _DOC_CHARS:
                        yield from para
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    if para and size <= _DOC_CHARS:
        yield "\n".join(para)


def _file_documents(path: Path) -> Iterator[str]:
    """A text file's paragraphs merged up to ``_DOC_CHARS`` characters, so a large file becomes many rows that
    tokenise in parallel and pack with [SEP] between them."""
    cur: list[str] = []
    size = 0
    for u in _units(path):
        if not u.strip():
            continue
        if cur and size + len(u) > _DOC_CHARS:
            yield "\n".join(cur)
            cur, size = [], 0
        cur.append(u.strip())
        size += len(u)
    if cur:
        yield "\n".join(cur)


def _text_files_dataset(files: list[Path], work_dir: Path | None) -> datasets.Dataset:
    """The documents of ``files`` as a dataset: written in batches to an Arrow file in ``work_dir`` and
    memory-mapped from there (held in memory without one: small corpora, tests)."""
    import datasets
    import pyarrow as pa

    docs = (d for f in files for d in _file_documents(f))
    if work_dir is None:
        return datasets.Dataset.from_dict({"text": list(docs)})
    work_dir.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("text", pa.string())])
    out = work_dir / "documents.arrow"
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: list[str] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == 1000:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
                batch = []
        writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
    return datasets.Dataset.from_file(str(out))


def _text_column(ds: datasets.Dataset, column: str, where: str) -> datasets.Dataset:
    """Only ``column``, renamed "text", without empty rows."""
    if column not in ds.column_names:
        raise DataError(f"{where}: no column '{column}' (columns: {', '.join(ds.column_names)}); "
                        "set data.text_column")
    feature = ds.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{where}: column '{column}' holds {feature}, not text")
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    return ds.filter(lambda b: [bool(t and not t.isspace()) for t in b["text"]], batched=True,
                     keep_in_memory=len(ds) < 10_000)  # large ones: into the dataset's own Arrow cache


def load_corpus(corpus: str | None, text_column: str = "text", work_dir: Path | None = None) -> datasets.Dataset:
    """The corpus as a dataset with one "text" column, one document per row; text files go through an Arrow file
    in ``work_dir`` (memory-mapped, see :func:`_text_files_dataset`), tables stay in ``datasets``' own cache.

    ``None``: :func:`builtin_corpus`; a ``.jsonl``/``.json``/``.parquet`` file: its ``text_column``; another file: UTF-8
    text cut into documents; a directory: its files, recursively, in sorted order, as text; any other string that
    looks like ``name`` or ``owner/name``: ``datasets.load_dataset(corpus, split="train")`` (needs the network).
    """
    import datasets

    if corpus is None:
        ds, where = datasets.Dataset.from_dict({"text": builtin_corpus()}), "built-in corpus"
    elif (path := Path(corpus).expanduser()).exists():
        where = str(path)
        if path.is_file() and path.suffix.lower() in _TABLE_FORMATS:
            try:
                ds = datasets.load_dataset(_TABLE_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
            except Exception as e:
                raise DataError(f"{path}: cannot read as {path.suffix} ({type(e).__name__}: {e})") from e
            ds = _text_column(ds, text_column, where)
        else:
            ds = _text_files_dataset(_text_files(path) if path.is_dir() else [path], work_dir)
    elif not _HUB_NAME.fullmatch(corpus) or corpus.lower().endswith(_FILE_SUFFIXES):
        raise DataError(f"{corpus}: corpus file or directory not found")
    else:
        where = corpus
        try:
            ds = datasets.load_dataset(corpus, split="train")
        except Exception as e:
            raise DataError(f"{corpus}: not a local path, and loading it from the datasets hub failed "
                            f"({type(e).__name__}: {e})") from e
        ds = _text_column(ds, text_column, where)
    if len(ds) == 0:
        raise DataError(f"{where}: corpus is empty (no non-whitespace text)")
    return ds


def _corpus_identity(corpus: str | None) -> dict:
    """What the cache key needs to notice a changed corpus, without reading it: files' sizes and mtimes."""
    if corpus is None:
        return {"builtin": sys.version, "max_chars": BUILTIN_MAX_CHARS}
    path = Path(corpus).expanduser()
    if not path.exists():
        return {"hub": corpus}
    files = _text_files(path) if path.is_dir() else [path]
    return {"path": str(path.resolve()),
            "files": [[f.relative_to(path).as_posix() if path.is_dir() else f.name, (st := f.stat()).st_size,
                       st.st_mtime_ns] for f in files]}


# ---- tokenizers -------------------------------------------------------------------------------------------------

def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A local Hugging Face tokenizer directory (never the hub), checked to have what BERT's MLM needs."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: tokenizer directory not found")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise DataError(f"{path}: not a Hugging Face tokenizer directory ({type(e).__name__}: {e})") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise DataError(f"{path}: {type(tok).__name__} is not a fast (tokenizers-backed) tokenizer")
    missing = [t for t in ("cls_token", "sep_token", "mask_token", "pad_token") if getattr(tok, t) is None]
    if missing:
        raise DataError(f"{path}: the tokenizer has no {', '.join(missing)}, which BERT pre-training needs")
    return tok


def _bert_pipeline(vocab: dict[str, int] | None = None) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]") if vocab else models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def train_wordpiece(texts: Iterable[str] | datasets.Dataset, vocab_size: int) -> BertTokenizerFast:
    """An uncased BERT WordPiece tokenizer trained on ``texts`` ([PAD]=0, [UNK], [CLS], [SEP], [MASK]; encoding
    adds [CLS] ... [SEP]). Deterministic: ``tokenizers`` numbers '##x' pieces in hash order, which also breaks merge
    ties (huggingface/tokenizers#1794), so every '##x' of the corpus alphabet is registered up front, sorted.
    Two passes (the alphabet, then training): a dataset's "text" column is streamed in batches, other texts are
    held in memory."""
    import datasets

    if vocab_size <= len(SPECIAL_TOKENS):
        raise DataError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens")
    if isinstance(texts, datasets.Dataset):
        ds = texts
        batches = lambda: (b["text"] for b in ds.iter(batch_size=1000))  # noqa: E731
    else:
        held = list(texts)
        batches = lambda: [held]  # noqa: E731
    tok = _bert_pipeline()
    alphabet: set[str] = set()
    for batch in batches():
        for t in batch:
            alphabet.update(tok.normalizer.normalize_str(t))
    pieces = sorted("##" + c for c in alphabet if not c.isspace())
    tok.train_from_iterator(batches(), trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                                                 special_tokens=[*SPECIAL_TOKENS, *pieces]))
    final = _bert_pipeline(tok.get_vocab())  # the '##x' pieces become ordinary vocabulary entries again
    final.add_special_tokens(list(SPECIAL_TOKENS))
    final.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, final.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return BertTokenizerFast(tokenizer_object=final)


def continuation_mask(tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """Boolean over the vocabulary: True for word-continuation pieces ('##ing'), for whole-word masking."""
    prefix = getattr(tokenizer.backend_tokenizer.model, "continuing_subword_prefix", None) or "##"
    return np.array([t.startswith(prefix) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))])


def tokenizer_digest(tokenizer: PreTrainedTokenizerFast) -> str:
    """Hash of what decides token ids (vocabulary, normaliser, pre-tokeniser), not of truncation/padding state."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    keep = {k: spec.get(k) for k in ("added_tokens", "normalizer", "pre_tokenizer", "model")}
    return json_digest(keep, chars=None)


# ---- packing and the cache --------------------------------------------------------------------------------------

@dataclass
class PackedCorpus:
    """Packed sequences (memory-mapped, shape (N, seq_len)): [CLS], seq_len-2 corpus tokens, [SEP]; no padding."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    special_ids: dict[str, int]
    meta: dict


def cache_path(data_args: DataArgs, tokenizer: PreTrainedTokenizerFast, seed: int) -> Path:
    """Where :func:`prepare_corpus` puts (or finds) this corpus/tokenizer/shape/seed's packed sequences."""
    key = {"format": CACHE_FORMAT, "corpus": _corpus_identity(data_args.corpus), "text_column": data_args.text_column,
           "tokenizer": tokenizer_digest(tokenizer), "seq_len": data_args.seq_len,
           "val_fraction": data_args.val_fraction, "seed": seed}
    return _cache_entry(data_args, "packed", key)


def _cache_entry(data_args: DataArgs, kind: str, key: dict) -> Path:
    """``CACHE_DIR/KIND-DIGEST``: the cached ``kind`` (packed corpus, trained tokenizer) for ``key``."""
    return Path(data_args.cache_dir or "~/.cache/earlybert_ds").expanduser() / f"{kind}-{json_digest(key)}"


def prepare_corpus(data_args: DataArgs, tokenizer: PreTrainedTokenizerFast, seed: int) -> Path:
    """Tokenise, pack and split the corpus into a cache directory (written atomically) and return it; reuse it if
    it exists. Documents are joined with [SEP] and cut into rows of [CLS] + seq_len-2 tokens + [SEP] (the last
    partial row is dropped); ``val_fraction`` of rows (at least one), chosen by ``seed``, are held out.

    Call it on one rank, then barrier, then on every rank (a cache hit only hashes file metadata); concurrent
    writers would each build the cache and the first rename wins. Memory stays bounded whatever the corpus size:
    documents and token ids go through memory-mapped Arrow files (tokenised in ``data.num_workers`` processes),
    and the packed arrays are written one chunk at a time.
    """
    path = cache_path(data_args, tokenizer, seed)
    if (path / "meta.json").is_file():
        logger.info("reusing cache %s", path)
        return path
    with atomic_directory(path, replace=False) as tmp:
        ds = load_corpus(data_args.corpus, data_args.text_column, work_dir=tmp / "work")
        ids = _tokenise(ds, tokenizer, _workers(data_args, len(ds)), tmp / "work")
        meta = _pack(ids, tokenizer, data_args, seed, tmp)
        meta["num_documents"] = len(ds)
        del ds, ids
        shutil.rmtree(tmp / "work", ignore_errors=True)  # the corpus and token ids as Arrow: not part of the cache
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("packed %d documents (%d tokens) into %d train + %d val sequences in %s", meta["num_documents"],
                meta["num_tokens"], meta["num_train"], meta["num_val"], path)
    return path


def _workers(data_args: DataArgs, num_documents: int) -> int:
    """Tokenising processes: ``data.num_workers`` (default: the CPUs, at most 8), one per 1000 documents at most
    (a process costs more than it saves on a small corpus)."""
    want = data_args.num_workers or min(os.cpu_count() or 1, 8)
    return max(1, min(want, num_documents // 1000))


def _tokenise(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, workers: int,
              work_dir: Path) -> datasets.Dataset:
    """Token ids of every document, [SEP] after each, in ``workers`` processes, into memory-mapped Arrow files in
    ``work_dir`` (never all in memory)."""
    import datasets

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    sep = tokenizer.sep_token_id
    work_dir.mkdir(parents=True, exist_ok=True)

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        encs = backend.encode_batch_fast(batch["text"], add_special_tokens=False)
        return {"ids": [e.ids + [sep] if e.ids else [] for e in encs]}

    return ds.map(encode, batched=True, batch_size=256, remove_columns=ds.column_names, num_proc=workers,
                  features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
                  cache_file_name=str(work_dir / "ids.arrow"), desc="tokenising")


def _record_batches(ds: datasets.Dataset) -> Iterator[pa.RecordBatch]:
    """The record batches of a dataset's Arrow cache files, in order, read (not memory-mapped) one at a time: the
    pages of a memory-mapped file stay resident in the process once read, and a large corpus's would add up."""
    import pyarrow as pa

    if not ds.cache_files:  # held in memory
        yield from ds.data.to_batches()
    for cache in ds.cache_files:
        with pa.OSFile(cache["filename"]) as f, pa.ipc.open_stream(f) as reader:
            yield from reader


def _smallest_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32) if vocab_size <= np.iinfo(t).max + 1))


def _pack(ids: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, data_args: DataArgs, seed: int,
          out: Path) -> dict:
    """Cut the token stream into rows of [CLS] + seq_len-2 tokens + [SEP] (the last partial row dropped), hold out
    ``val_fraction`` of them (at least one) chosen by ``seed``, and write ``train.npy``/``val.npy`` into ``out`` in
    the smallest integer type the vocabulary allows, one Arrow record batch at a time."""
    import pyarrow.compute as pc

    total = int(pc.sum(pc.list_value_length(ids.data.column("ids"))).as_py() or 0)
    width = data_args.seq_len - 2
    n = total // width
    if n < 2:
        raise DataError(f"{data_args.corpus or 'built-in corpus'}: {total} tokens make {n} sequences of "
                        f"seq_len={data_args.seq_len}; at least 2 are needed (one for validation)")
    n_val = min(n - 1, max(1, round(data_args.val_fraction * n)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng([seed, _SPLIT]).choice(n, n_val, replace=False)] = True
    dtype = _smallest_dtype(len(tokenizer))
    files = {}
    for split, rows in (("train", n - n_val), ("val", n_val)):  # .npy files written front to back, never mapped
        files[split] = open(out / f"{split}.npy", "wb")  # noqa: SIM115 - closed below
        np.lib.format.write_array_header_1_0(files[split], {"descr": np.lib.format.dtype_to_descr(dtype),
                                                            "fortran_order": False, "shape": (rows, data_args.seq_len)})
    row, carry = 0, np.zeros(0, dtype=np.int64)
    try:
        for batch in _record_batches(ids):
            if row == n:
                break
            stream = np.concatenate([carry, pc.list_flatten(batch.column("ids")).to_numpy(zero_copy_only=False)])
            k = min(len(stream) // width, n - row)
            rows = np.empty((k, data_args.seq_len), dtype=dtype)
            rows[:, 0], rows[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
            rows[:, 1:-1] = stream[: k * width].reshape(k, width)
            sel = is_val[row:row + k]  # rows keep corpus order within each split
            files["val"].write(rows[sel].tobytes())
            files["train"].write(rows[~sel].tobytes())
            row, carry = row + k, stream[k * width:]
    finally:
        for f in files.values():
            f.close()
    special = {name: getattr(tokenizer, f"{name}_token_id") for name in ("pad", "unk", "cls", "sep", "mask")}
    return {"format": CACHE_FORMAT, "corpus": data_args.corpus, "vocab_size": len(tokenizer), "special_ids": special,
            "seq_len": data_args.seq_len, "num_train": int(n - n_val), "num_val": n_val, "num_tokens": total,
            "dtype": dtype.name, "seed": seed}


def load_packed(cache: str | Path) -> PackedCorpus:
    """The arrays of a :func:`prepare_corpus` cache, memory-mapped read-only."""
    cache = Path(cache)
    if not (cache / "meta.json").is_file():
        raise DataError(f"{cache}: not a packed-corpus cache (no meta.json); run prepare_corpus first")
    meta = json.loads((cache / "meta.json").read_text())
    train, val = (np.load(cache / f"{split}.npy", mmap_mode="r") for split in ("train", "val"))
    return PackedCorpus(train=train, val=val, vocab_size=meta["vocab_size"], special_ids=meta["special_ids"], meta=meta)


# ---- masking ----------------------------------------------------------------------------------------------------

class MLMMasker:
    """BERT's masked-LM corruption, a pure function of (seed, sample index, epoch): a sample is masked identically
    whatever the world size, batch composition or resume point, and anew in every epoch (BERT used 10 masks per
    sequence; RoBERTa re-masks every epoch). Epoch 0's masks, and validation's, do not depend on the epoch.

    Per row, round(p * #non-special tokens) tokens (at least one) are chosen; with ``whole_word_mask``, whole
    words (a start token plus the continuation pieces after it) up to that many tokens; of those 80% become
    [MASK], 10% a random non-special token, 10% stay. Labels are the original ids there, -100 elsewhere.
    ``continuation_ids`` is a boolean array over the vocabulary (see :func:`continuation_mask`).
    """

    def __init__(self, mask_id: int, vocab_size: int, special_ids: Sequence[int], mlm_probability: float = 0.15,
                 whole_word_mask: bool = False, continuation_ids: np.ndarray | None = None) -> None:
        if whole_word_mask and continuation_ids is None:
            raise ValueError("whole_word_mask needs continuation_ids (see continuation_mask)")
        self.mask_id, self.p = mask_id, mlm_probability
        self.is_special = np.zeros(vocab_size, dtype=bool)
        self.is_special[list(special_ids)] = True
        self.normal_ids = np.flatnonzero(~self.is_special)
        self.continuation = np.asarray(continuation_ids, dtype=bool) if whole_word_mask else None

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerFast, mlm_probability: float = 0.15,
                       whole_word_mask: bool = False) -> "MLMMasker":
        return cls(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids, mlm_probability,
                   whole_word_mask, continuation_mask(tokenizer) if whole_word_mask else None)

    def _mask_row(self, row: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        out, labels = row.copy(), np.full_like(row, IGNORE_INDEX)
        cand = ~self.is_special[row]
        starts = cand.copy()
        if self.continuation is not None:  # a piece continues the word of a candidate just before it
            starts[1:] &= ~(self.continuation[row[1:]] & cand[:-1])
        n_units = int(starts.sum())
        if n_units == 0:
            return out, labels
        unit = np.cumsum(starts) - 1
        sizes = np.bincount(unit[cand], minlength=n_units)
        order = rng.permutation(n_units)
        take = np.cumsum(sizes[order]) <= max(1, round(self.p * int(cand.sum())))
        take[0] = True
        chosen_units = np.zeros(n_units, dtype=bool)
        chosen_units[order[take]] = True
        pos = np.flatnonzero(cand & chosen_units[unit])
        r = rng.random(len(pos))
        random_tokens = self.normal_ids[rng.integers(len(self.normal_ids), size=len(pos))]
        labels[pos] = row[pos]
        out[pos[r < 0.8]] = self.mask_id
        swap = (r >= 0.8) & (r < 0.9)
        out[pos[swap]] = random_tokens[swap]
        return out, labels

    def __call__(self, input_ids: torch.Tensor, sample_indices: torch.Tensor | np.ndarray, seed: int,
                 epochs: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = input_ids.cpu().numpy()
        epochs = np.zeros(len(rows), dtype=np.int64) if epochs is None else np.asarray(epochs)
        pairs = [self._mask_row(row, np.random.default_rng([seed, _MASK, int(i)] + ([int(e)] if e else [])))
                 for row, i, e in zip(rows, np.asarray(sample_indices), epochs)]
        return (torch.from_numpy(np.stack([p[0] for p in pairs])).long(),
                torch.from_numpy(np.stack([p[1] for p in pairs])).long())


def collate(packed: np.ndarray, indices: np.ndarray, masker: MLMMasker, seed: int,
            epochs: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """A masked micro-batch of the packed rows ``indices`` seen in ``epochs`` (default 0); no padding: the attention
    mask is all ones."""
    indices = np.asarray(indices, dtype=np.int64)
    ids = torch.from_numpy(np.asarray(packed[indices], dtype=np.int64))
    masked, labels = masker(ids, indices, seed, epochs)
    return {"input_ids": masked, "attention_mask": torch.ones_like(masked), "labels": labels,
            "masked_positions": mlm_positions(labels), "sample_idx": torch.from_numpy(indices)}


# ---- sampling ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _ORDER, epoch]).permutation(num_samples)


class ShardedBatches:
    """The sample order of a data-parallel run, and its position for checkpoints.

    An endless stream of epochs, each a permutation of ``range(num_samples)`` drawn from ``(seed, epoch)``; every
    optimizer step takes the next ``micro * accum * world`` indices, and rank ``r`` the ``r``-th contiguous slice
    of them, as ``grad_accum`` micro-batches. The state is the number of samples consumed, so a resume continues
    exactly, and a resume on another world size with the same global batch sees the same samples per step.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, grad_accum: int, world_size: int, rank: int,
                 seed: int) -> None:
        if num_samples < 1 or micro_batch_size < 1 or grad_accum < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedBatches: bad arguments num_samples={num_samples}, micro={micro_batch_size}, "
                             f"accum={grad_accum}, world_size={world_size}, rank={rank}")
        self.num_samples, self.micro, self.accum = num_samples, micro_batch_size, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.consumed = 0

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_samples

    def _stream(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.arange(start, stop)
        epochs = pos // self.num_samples
        out = np.empty(len(pos), dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = _epoch_order(self.num_samples, self.seed, int(e))[pos[sel] % self.num_samples]
        return out, epochs

    def next_step_epochs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's ``grad_accum`` micro-batches for the next optimizer step: (sample indices, the epoch each
        one is drawn in), the epoch being what masking needs to mask a sample anew every time it comes round."""
        start = self.consumed + self.rank * self.micro * self.accum
        mine, epochs = self._stream(start, start + self.micro * self.accum)
        self.consumed += self.global_batch
        return list(zip(np.split(mine, self.accum), np.split(epochs, self.accum)))

    def next_step(self) -> list[np.ndarray]:
        """This rank's ``grad_accum`` micro-batches of sample indices for the next optimizer step."""
        return [idx for idx, _ in self.next_step_epochs()]

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])


def val_batches(packed_val: np.ndarray, micro_batch_size: int, num_batches: int, world_size: int, rank: int,
                masker: MLMMasker, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The first ``num_batches`` validation micro-batches of this rank (fewer if the set is small, the same number
    on every rank), in file order and masked with a fixed ``seed``, so validation losses are comparable across
    evaluations and runs. Global batch ``b`` is rows ``[b*M*W, (b+1)*M*W)`` with rank r's slice the ``r``-th;
    a set smaller than one global batch wraps around."""
    per_batch = micro_batch_size * world_size
    n = min(num_batches, max(1, len(packed_val) // per_batch))
    rows = np.arange(n * per_batch).reshape(n, world_size, micro_batch_size)[:, rank] % len(packed_val)
    return [collate(packed_val, idx, masker, seed) for idx in rows]


def tokenizer_for(data_args: DataArgs) -> PreTrainedTokenizerFast:
    """The run's tokenizer: ``data_args.tokenizer`` if given, else a WordPiece vocabulary trained on the corpus,
    cached beside the packed corpora (keyed by the corpus identity and vocabulary size) so it is trained once."""
    if data_args.tokenizer:
        return load_tokenizer(data_args.tokenizer)
    key = {"corpus": _corpus_identity(data_args.corpus), "text_column": data_args.text_column,
           "vocab_size": data_args.vocab_size}
    path = _cache_entry(data_args, "wordpiece", key)
    if not (path / "tokenizer.json").is_file():
        logger.info("training a %d-word WordPiece vocabulary on the corpus", data_args.vocab_size)
        with atomic_directory(path, replace=False) as tmp:
            corpus = load_corpus(data_args.corpus, data_args.text_column, work_dir=tmp / "work")
            tok = train_wordpiece(corpus, data_args.vocab_size)
            del corpus
            shutil.rmtree(tmp / "work", ignore_errors=True)
            tok.save_pretrained(tmp)
    return load_tokenizer(path)
