"""The mixture sampler (harness.data.mixture): proportions exact per block and within their
binomial error over many steps, one global stream at any data-parallel size, each source's
samples once per its own epoch, deterministic, and a reweighted phase that keeps the samples
before it. Then the sampler over real prepared shards (MixedSequences, TrainData.sources)."""
from __future__ import annotations

import numpy as np
import pytest
from mix_corpus import mix_cfg, write_sources

from harness.data.mix_prepare import MixShards, prepare_mix
from harness.data.mixture import BLOCK, MixtureSampler, slots
from harness.data.sources import TrainData

NAMES, COUNTS, SHARES = ("web", "code", "math"), [5000, 1237, 91], [0.6, 0.3, 0.1]
SEED, MICRO = 1234, 4


def _sampler(shares=SHARES, rank=0, dp=1, block=BLOCK, phases=None, seed=SEED, counts=COUNTS):
    return MixtureSampler(NAMES, counts, phases or [(0, shares)], seed, MICRO, rank, dp, block)


def test_slots_are_the_largest_remainder_rounding():
    for shares in ([0.6, 0.3, 0.1], [1, 1, 1], [0.001, 0.999], [5, 3, 2, 1e-4]):
        exact = np.asarray(shares) / np.sum(shares) * BLOCK
        n = slots(shares)
        assert n.sum() == BLOCK and np.all(np.abs(n - exact) < 1)
        assert np.all(n >= np.floor(exact))  # only the largest remainders round up
    assert slots([1, 1, 1], 8).tolist() == [3, 3, 2]  # ties to the earlier source


def test_proportions_are_exact_over_every_block():
    s = _sampler()
    for b in (0, 1, 7):
        source, _ = s.draws(np.arange(b * BLOCK, (b + 1) * BLOCK))
        assert np.bincount(source, minlength=3).tolist() == slots(SHARES).tolist()


def test_proportions_within_binomial_error_over_many_steps():
    """Every window of 200 steps x 64 samples, anywhere in the stream: each source's share
    within 3 binomial sigmas (draws within a block are without replacement: less spread)."""
    s, batch, steps = _sampler(), 64, 200
    for start in (0, 40_000, 3 * BLOCK + 123):
        source, _ = s.draws(np.arange(start, start + batch * steps))
        total = batch * steps
        for c, p in enumerate(SHARES):
            count = int(np.sum(source == c))
            assert abs(count - total * p) <= 3 * np.sqrt(total * p * (1 - p)), (start, c, count)


def test_same_global_stream_at_dp_1_2_and_4():
    """A global batch of 16: micro-step k of rank r holds positions consumed + (k dp + r) m."""
    whole = _sampler(dp=1)
    for consumed in (0, 16 * 7, BLOCK - 8, 5 * BLOCK + 32):
        expected = whole.samples(np.arange(consumed, consumed + 16))
        expected_src = whole.draws(np.arange(consumed, consumed + 16))[0]
        for dp in (1, 2, 4):
            accum = 16 // (MICRO * dp)
            ranks = [_sampler(rank=r, dp=dp) for r in range(dp)]
            got = np.concatenate([ranks[r].indices(consumed, k)
                                  for k in range(accum) for r in range(dp)])
            src = np.concatenate([ranks[r].sources(consumed, k)
                                  for k in range(accum) for r in range(dp)])
            assert got.tolist() == expected.tolist() and src.tolist() == expected_src.tolist()


def test_each_source_draws_its_samples_once_per_its_epoch():
    """A small block so that every source passes several epochs: ordered by draw number, each
    run of N_c draws of source c is a permutation of its samples, and epochs differ."""
    counts = [50, 37, 11]
    s = _sampler(block=64, counts=counts)
    pos = np.arange(64 * 40)
    source, draw = s.draws(pos)
    ids = s.samples(pos)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for c, n in enumerate(counts):
        mine = source == c
        order = np.argsort(draw[mine])
        assert draw[mine][order].tolist() == list(range(mine.sum()))  # every draw, once
        local = ids[mine][order] - offsets[c]
        epochs = [local[e * n:(e + 1) * n] for e in range(mine.sum() // n)]
        assert len(epochs) >= 3
        for epoch in epochs:
            assert sorted(epoch.tolist()) == list(range(n))
        assert epochs[0].tolist() != epochs[1].tolist()  # a new permutation per epoch


def test_deterministic_and_seeded():
    pos = np.arange(3000, 3400)
    assert _sampler().samples(pos).tolist() == _sampler().samples(pos).tolist()
    assert _sampler().samples(pos).tolist() != _sampler(seed=SEED + 1).samples(pos).tolist()


def test_a_new_phase_keeps_the_samples_before_it_and_continues_each_source():
    """Reweighted at position 1000 (a resume with data.mix_reweight=true): positions before it
    unchanged; after it, the new shares per block; no draw of a source is taken twice."""
    switch, new = 1000, [0.2, 0.2, 0.6]
    old, s = _sampler(), _sampler(phases=[(0, SHARES), (switch, new)])
    before = np.arange(switch)
    assert s.samples(before).tolist() == old.samples(before).tolist()
    source, _ = s.draws(np.arange(switch, switch + BLOCK))
    assert np.bincount(source, minlength=3).tolist() == slots(new).tolist()
    src, draw = s.draws(np.arange(0, switch + 2 * BLOCK))
    for c in range(3):
        assert len(set(draw[src == c].tolist())) == int(np.sum(src == c))
    # draws counted exactly, phases included
    assert s.drawn_by(switch + 2 * BLOCK).tolist() == np.bincount(src, minlength=3).tolist()


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    write_sources(root)
    cfg = mix_cfg(root, "model.block_size=64")
    prepare_mix(cfg.data, progress=False)
    return cfg, MixShards(cfg.data)


def test_mixed_batches_come_from_the_sources_train_sequences(mix):
    """Over real shards: each row of a micro-batch is its source's own sample, and
    TrainData.sources names the source of each row."""
    cfg, shards = mix
    seqs = shards.sequences("train", 64)
    parts = [p.sequences("train", 64) for p in shards.parts]
    sampler = MixtureSampler(shards.names, [len(p) for p in parts], [(0, cfg.data.mix_shares())],
                             SEED, 8, 0, 1)
    data = TrainData(seqs, sampler, "cpu")
    assert data.source_names == ("web", "code")
    seen = set()
    for k in range(6):
        x, y = data.micro_batch(16 * k, 0)
        ids, src = sampler.indices(16 * k, 0), data.sources(16 * k, 0)
        assert src.tolist() == seqs.source_of(ids).tolist()
        for row, (i, c) in enumerate(zip(ids.tolist(), src.tolist())):
            want = parts[c][i - int(seqs.offsets[c])]
            assert x[row].tolist() == want[:-1].tolist() and y[row].tolist() == want[1:].tolist()
            seen.add(c)
    assert seen == {0, 1}


def test_without_a_mix_train_data_has_no_sources(shards_dir):
    from harness.data.sampler import GlobalSampler
    from harness.data.shards import TokenShards

    seqs = TokenShards.open(shards_dir).sequences("train", 64)
    data = TrainData(seqs, GlobalSampler(len(seqs), SEED, 4, 0, 1), "cpu")
    assert data.source_names == () and data.sources(0, 0) is None
