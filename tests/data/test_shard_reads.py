"""How training reads a token shard (harness.data.shards.Sequences): with pread, so random
samples pull only their own pages into the page cache (the map's read-around window pulls
megabytes each: bench/bench_page_cache.py), with no stat per batch, and a file cut under the
run is an error (tests/data/test_data_prep.py), never SIGBUS."""
import os

import numpy as np
import pytest
from bench_page_cache import WAYS, drop, measure, resident_bytes

from harness.data.shards import Sequences


def test_random_samples_pull_only_their_own_pages(tmp_path):
    probe = tmp_path / "probe.bin"
    probe.write_bytes(b"x" * (1 << 20))
    drop(probe)
    if resident_bytes(probe) > 0:  # tmpfs, or a kernel that keeps the pages
        pytest.skip("the page cache cannot be dropped on this filesystem")
    got = measure(tmp_path, mb=16, samples=40, seq=2048)
    wanted = got["wanted"]  # 40 x 4098 bytes: each sample spans 2 or 3 pages of 4 kB
    default, advised, pread = (got[how][0] for how in WAYS)
    assert advised <= 2.5 * wanted and pread <= 2.5 * wanted, got
    assert default >= pread  # the map's read-around: 8 MB per fault with this VM's readahead


def test_no_stat_per_batch(tmp_path, monkeypatch):
    path = tmp_path / "train.bin"
    np.arange(16 * 50 + 1, dtype=np.uint16).tofile(path)
    seqs = Sequences(np.memmap(path, np.uint16, mode="r"), 16, 1000, path)
    calls = []
    for name in ("stat", "fstat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, real=real, **k: calls.append(a) or real(*a, **k))
    rows = [seqs.batch([i, (i * 7) % 50]) for i in range(50)]
    assert not calls
    assert np.array_equal(rows[3][0], np.arange(48, 65))  # sample i: tokens [16i, 16i + 16]
