"""Read a wandb ``.wandb`` run file without a server, so tests (and users) can check what was really logged.

wandb >= 0.2x no longer ships a Python reader (``wandb sync --view`` and ``wandb.sdk.internal.datastore`` are
gone); the file is written by the Go core. Its layout (checked against wandb 0.31's output): a 7-byte header
``<4sHB`` = ``b":W&B"``, magic ``0xBEE1``, version ``0``, then a LevelDB-log record stream in 32 KiB blocks
(the header counts towards the first block). Each chunk has a 7-byte header ``<IHB`` = CRC-32 (zlib/IEEE, over the
type byte and the data), data length, type (FULL=1, FIRST=2, MIDDLE=3, LAST=4); a block tail shorter than a chunk
header is zero padding. Reassembled records are ``wandb.proto.wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_IDENT, _MAGIC, _VERSION = b":W&B", 0xBEE1, 0
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[pb.Record]:
    """Every record in file order. A chunk cut short at the end (the writer was killed) ends the stream quietly;
    a checksum mismatch or an unknown chunk type raises ``ValueError``."""
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size or _FILE_HEADER.unpack_from(data) != (_IDENT, _MAGIC, _VERSION):
        raise ValueError(f"{path}: not a wandb run file (header {data[:_FILE_HEADER.size]!r})")
    pos, pending = _FILE_HEADER.size, bytearray()
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:
            pos += left
            continue
        if pos + _CHUNK_HEADER.size > len(data):
            return
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start, end = pos + _CHUNK_HEADER.size, pos + _CHUNK_HEADER.size + length
        if end > len(data):
            return
        chunk = data[start:end]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: checksum mismatch in the chunk at byte {pos}")
        if kind in (_FULL, _FIRST):
            pending = bytearray(chunk)
        elif kind in (_MIDDLE, _LAST):
            pending += chunk
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
        pos = end
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(bytes(pending))
            yield record


def _apply(target: dict[str, Any], items: Iterable[Any]) -> dict[str, Any]:
    """Apply wandb's ``key``/``nested_key`` + ``value_json`` items; nested keys become nested dicts."""
    for item in items:
        *parents, last = list(item.nested_key) or [item.key]
        node = target
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = json.loads(item.value_json)
    return target


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """History rows in order: ``_step``, the logged keys (JSON-decoded) and wandb's ``_timestamp``/``_runtime``."""
    return [_apply({}, r.history.item) for r in iter_records(path) if r.HasField("history")]


def read_summary(path: str | Path) -> dict[str, Any]:
    """The run summary as wandb would show it: every summary update and removal applied in order."""
    summary: dict[str, Any] = {}
    for r in iter_records(path):
        if r.HasField("summary"):
            _apply(summary, r.summary.update)
            for item in r.summary.remove:
                *parents, last = list(item.nested_key) or [item.key]
                node = summary
                for p in parents:
                    node = node.get(p, {})
                node.pop(last, None)
    return summary


def read_config(path: str | Path) -> dict[str, Any]:
    """The run config (from the run record and later config updates), without wandb's internal ``_wandb`` key."""
    config: dict[str, Any] = {}
    for r in iter_records(path):
        if r.HasField("run"):
            _apply(config, r.run.config.update)
        elif r.HasField("config"):
            _apply(config, r.config.update)
            for item in r.config.remove:
                config.pop(item.key, None)
    config.pop("_wandb", None)
    return config
