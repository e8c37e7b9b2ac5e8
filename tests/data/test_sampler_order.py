"""The sampler's computed order (harness.data.sampler.FeistelPermutation): a bijection of
[0, n) for every n, seeded per epoch, and constant in memory and time whatever n is (a stored
permutation of 1e9 samples would take 8 GB and ~100 s per rank)."""
import time
import tracemalloc

import numpy as np
import pytest

from harness.data.sampler import FeistelPermutation, GlobalSampler


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 97, 1000, 4096, 4097, 65521, 100003])
def test_every_index_once_per_epoch(n):
    for seed, epoch in ((0, 0), (1234, 3)):
        got = FeistelPermutation(n, seed, epoch)(np.arange(n))
        assert np.array_equal(np.sort(got), np.arange(n)), (n, seed, epoch)


def test_the_order_is_shuffled_and_keyed():
    n = 100003
    a = FeistelPermutation(n, 1234, 0)(np.arange(n))
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.02  # no trend with the position
    # a uniform shuffle's median |p(i+1) - p(i)| is (1 - 1/sqrt 2) n ~ 0.29 n
    assert np.median(np.abs(np.diff(a))) / n == pytest.approx(0.293, abs=0.02)
    for other in (FeistelPermutation(n, 1234, 1), FeistelPermutation(n, 1235, 0)):
        b = other(np.arange(n))
        assert np.mean(a == b) < 0.001  # another epoch, another seed: another order
    assert np.array_equal(a, FeistelPermutation(n, 1234, 0)(np.arange(n)))  # deterministic


def test_memory_and_time_do_not_grow_with_the_number_of_samples():
    """At n = 1e9 (1T tokens / 1024-token samples) and 1e12 a start and a few hundred
    micro-batches, across an epoch boundary, allocate a few kB and take milliseconds."""
    GlobalSampler(10, 0, 8, 0, 1).indices(0, 0)  # numpy's lazy imports, before measuring
    for n in (10**9, 10**12):
        tracemalloc.start()
        t0 = time.perf_counter()
        sampler = GlobalSampler(n, 1234, 8, 3, 4)
        seen = np.concatenate([sampler.indices(n - 64 + 32 * s, 0) for s in range(200)])
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 200_000 and seconds < 2.0, (n, peak, seconds)
        assert seen.min() >= 0 and seen.max() < n and len(set(seen.tolist())) == len(seen)
