"""Reads what a W&B offline run wrote, so tests can check it without the network.

wandb (0.31) has no public reader for `offline-run-*/run-<id>.wandb`. The file is a LevelDB
log: a 7-byte header (b":W&B", a 2-byte magic, a 1-byte version), then 32 KiB blocks of
chunks, each with a 7-byte header (crc32 of type byte + payload, payload length, type).
A chunk never crosses a block; a block tail under 7 bytes is padding. A record is one FULL
chunk or FIRST, MIDDLE..., LAST. Each record is a serialized
`wandb.proto.wandb_internal_pb2.Record`; we keep the history, config, summary and run ones.

wandb's finish() can return before its service has flushed the file (measured: 98,304 of
104,417 bytes, the rest a moment later), so read_run waits for the closing `exit` record.
"""
from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

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
        if start + length > len(data):  # still being written
            return
        payload = data[start:start + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"bad checksum in chunk at byte {pos}: file truncated or corrupt")
        yield kind, payload
        pos += CHUNK_HEADER.size + length


def records(data: bytes) -> tuple[list[pb.Record], bool]:
    """The complete records in a file's bytes, and whether a record is still unfinished."""
    ident, _magic, _version = FILE_HEADER.unpack_from(data)
    if ident != b":W&B":
        raise ValueError(f"not a W&B run file (header {ident!r})")
    out: list[pb.Record] = []
    parts: list[bytes] = []
    for kind, payload in chunks(data):
        if kind in (FULL, FIRST):
            parts = []
        parts.append(payload)
        if kind in (FULL, LAST):
            out.append(pb.Record.FromString(b"".join(parts)))
            parts = []
    return out, bool(parts)


def _finished(path: Path, timeout: float) -> tuple[list[pb.Record], bool]:
    deadline = time.monotonic() + timeout
    while True:
        recs, dangling = records(Path(path).read_bytes())
        done = bool(recs) and recs[-1].WhichOneof("record_type") == "exit" and not dangling
        if done or time.monotonic() > deadline:
            return recs, done
        time.sleep(0.05)


def _items(items) -> dict[str, Any]:
    return {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in items}


@dataclass
class OfflineRun:
    run_id: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    alerts: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False  # the run's exit record was found

    def rows(self, key: str) -> list[dict[str, Any]]:
        """History rows holding `key`, without W&B's own `_`-prefixed columns."""
        return [{k: v for k, v in row.items() if not k.startswith("_")}
                for row in self.history if key in row]


def read_run(path: Path, timeout: float = 30.0) -> OfflineRun:
    """Parses the run file once it ends in an `exit` record (or timeout s have passed)."""
    recs, complete = _finished(path, timeout)
    run = OfflineRun(complete=complete)
    for rec in recs:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.run_id = rec.run.run_id
            run.config.update(_items(rec.run.config.update))
        elif kind == "config":
            run.config.update(_items(rec.config.update))
        elif kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
        elif kind == "alert":
            run.alerts.append((rec.alert.title, rec.alert.text))
    run.config = {k: v for k, v in run.config.items() if not k.startswith("_")}  # not _wandb
    return run


def run_files(root: Path, run_id: str = "*") -> list[Path]:
    """Every offline run file under root (e.g. RUN_DIR/wandb), oldest first."""
    return sorted(Path(root).rglob(f"offline-run-*/run-{run_id}.wandb"))
