"""Durable writes: a file's data, or a directory's entries (a rename into it), flushed to disk
before anything relies on them (a checkpoint's `latest`, shards renamed into place)."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path) -> None:
    """fsync a file, or a directory (its entries: a rename into it). Some filesystems refuse
    fsync on a directory: not an error, there is nothing more to do there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """Every file under root, then each directory's entries."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def write_atomic(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """`path` holds `data` whole or is as it was: written to `tmp` (beside it; by default
    .NAME.PID.tmp), flushed, then renamed over it."""
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    fsync_path(tmp)
    os.replace(tmp, path)

