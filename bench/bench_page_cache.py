"""What random training reads pull into the page cache: a token shard read through its memory
map (the kernel's read-around window per fault), through the map advised MADV_RANDOM, and with
pread as harness.data.shards.Sequences reads it now.

    .venv/bin/python bench/bench_page_cache.py [--quick] [--mb 256] [--samples 200] [--out F]

Each variant starts from a file dropped from the page cache (fsync, POSIX_FADV_DONTNEED),
reads the same random samples of --seq + 1 tokens, and counts the file's resident pages
(mincore on a fresh map of it): "MB pulled" against "MB wanted" (the samples' bytes). Needs
Linux and a disk-backed filesystem (on tmpfs every page is always resident).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path
import tempfile

import numpy as np
from common import MB, bench_parser, print_table, save_json

from harness.data.shards import Sequences, _advise_random

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


def resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache now (mincore over a map that touches nothing)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        try:
            addr = np.frombuffer(m, np.uint8).ctypes.data
            vec = (ctypes.c_ubyte * -(-size // PAGE))()
            if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(b & 1 for b in vec) * PAGE
        finally:
            del addr
            m.close()


def drop(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def write_shard(path: Path, mb: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(rng.integers(0, 50000, MB // 2, dtype=np.uint16).tobytes())
        f.flush()
        os.fsync(f.fileno())


def pulled(path: Path, seq: int, starts: np.ndarray, how: str) -> tuple[int, float]:
    """(bytes the reads pulled into the page cache, seconds) for one way of reading."""
    drop(path)
    tokens = np.memmap(path, np.uint16, mode="r")
    if how == "map, MADV_RANDOM":
        _advise_random(tokens)
    t0 = time.perf_counter()
    if how == "pread (Sequences)":
        Sequences(tokens, seq, path=path).batch(starts)
    else:
        np.stack([tokens[i * seq:(i + 1) * seq + 1].astype(np.int64) for i in starts])
    seconds = time.perf_counter() - t0
    del tokens
    return resident_bytes(path), seconds


WAYS = ("map (default readahead)", "map, MADV_RANDOM", "pread (Sequences)")


def measure(directory: Path, mb: int, samples: int, seq: int) -> dict:
    path = directory / "train.bin"
    write_shard(path, mb)
    n = (mb * MB // 2 - 1) // seq
    starts = np.random.default_rng(1).choice(n, samples, replace=False)
    wanted = samples * (seq + 1) * 2
    return {"wanted": wanted, "file": mb * MB,
            **{how: pulled(path, seq, starts, how) for how in WAYS}}


def main() -> None:
    parser = bench_parser(__doc__, "a 32 MB shard, 50 samples")
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    mb, samples = (32, 50) if args.quick else (args.mb, args.samples)
    with tempfile.TemporaryDirectory(dir=".") as tmp:  # the disk, not a tmpfs /tmp
        result = measure(Path(tmp), mb, samples, args.seq)
    wanted = result["wanted"]
    rows = [[how, f"{result[how][0] / MB:.2f}", f"{result[how][0] / wanted:.1f}",
             f"{result[how][1] * 1e3:.1f}"] for how in WAYS]
    print_table(["read", "MB pulled", "pulled / wanted", "ms"], rows,
                title=f"{samples} random samples of {args.seq + 1} tokens from a {mb} MB "
                      f"shard: {wanted / MB:.2f} MB wanted")
    save_json(args.out, result)


if __name__ == "__main__":
    main()
