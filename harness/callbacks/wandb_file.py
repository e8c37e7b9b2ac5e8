"""Reads the file a W&B run's service writes, `run-<id>.wandb`, without the network.

wandb (0.31) has no public reader for it. The file is a LevelDB log: a 7-byte header (b":W&B",
a 2-byte magic, a 1-byte version), then 32 KiB blocks of chunks, each with a 7-byte header
(crc32 of type byte + payload, payload length, type). A chunk never crosses a block; a block
tail under 7 bytes is padding. A record is one FULL chunk or FIRST, MIDDLE..., LAST, each a
serialized `wandb.proto.wandb_internal_pb2.Record`.

The logger reads it after W&B's service was killed (Slurm's SIGTERM reaches every process of
the job): the service keeps rows in memory and writes them in batches (measured: 5 rows still
unwritten 10 s after they were logged), so only the file says which rows survived.
Imports: the standard library and wandb's protobufs only.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32 * 1024
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = FILE_HEADER.size
    while pos + CHUNK_HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER.size:  # block trailer: skip to the next block
            pos += room
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0:  # zero-filled rest of a block (preallocated, nothing written)
            pos += room
            continue
        start = pos + CHUNK_HEADER.size
        if start + length > len(data):  # still being written, or cut off by a kill
            return
        payload = data[start:start + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"bad checksum in chunk at byte {pos}: file truncated or corrupt")
        yield kind, payload
        pos += CHUNK_HEADER.size + length


def records(data: bytes) -> tuple[list[Any], bool]:
    """The complete records in a file's bytes, and whether a record is still unfinished."""
    from wandb.proto import wandb_internal_pb2 as pb

    ident, _magic, _version = FILE_HEADER.unpack_from(data)
    if ident != b":W&B":
        raise ValueError(f"not a W&B run file (header {ident!r})")
    out: list[Any] = []
    parts: list[bytes] = []
    for kind, payload in chunks(data):
        if kind in (FULL, FIRST):
            parts = []
        parts.append(payload)
        if kind in (FULL, LAST):
            out.append(pb.Record.FromString(b"".join(parts)))
            parts = []
    return out, bool(parts)


def items(entries) -> dict[str, Any]:
    """A history, config or summary record's items as a dict of their JSON values."""
    return {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in entries}


def history_rows(path: Path) -> list[dict[str, Any]]:
    """Every history row the file holds (an unreadable or missing file holds none)."""
    try:
        recs, _ = records(Path(path).read_bytes())
    except (OSError, ValueError, struct.error):
        return []
    return [items(r.history.item) for r in recs if r.WhichOneof("record_type") == "history"]
