"""TrainData's read-ahead and pinned copy against reading each micro-batch directly
(Sequences.batch of GlobalSampler.indices)."""
import numpy as np
import pytest
import torch

from harness.common.errors import HarnessError
from harness.data.sampler import GlobalSampler
from harness.data.shards import Sequences
from harness.data.sources import TrainData

SEQ, MICRO, DP, RANK, ACCUM, SEED = 8, 2, 2, 1, 3, 4
GLOBAL = MICRO * DP * ACCUM


def _sequences(n_seq=30, vocab=100):
    tokens = np.random.default_rng(0).integers(0, vocab, n_seq * SEQ + 1).astype(np.uint16)
    return Sequences(tokens, SEQ, vocab_size=vocab)


class Counting(Sequences):
    """Counts memmap reads, to tell a served read-ahead from a direct read."""

    def __init__(self, seqs):
        super().__init__(seqs.tokens, seqs.seq_len, seqs.vocab_size)
        self.reads = 0

    def batch(self, indices):
        self.reads += 1
        return super().batch(indices)


def _direct(seqs, consumed, k):
    indices = GlobalSampler(len(seqs), SEED, MICRO, RANK, DP).indices(consumed, k)
    rows = Sequences.batch(seqs, indices)  # uncounted
    return rows[:, :-1], rows[:, 1:]


def _check(data, seqs, consumed, k):
    x, y = data.micro_batch(consumed, k)
    want_x, want_y = _direct(seqs, consumed, k)
    assert np.array_equal(x.numpy(), want_x) and np.array_equal(y.numpy(), want_y)


def _steps(data, seqs, first_step, n_steps):
    for step in range(first_step, first_step + n_steps):
        for k in range(ACCUM):
            _check(data, seqs, step * GLOBAL, k)


def test_read_ahead_serves_what_direct_reads_give_in_order_and_after_jumps():
    """The trainer's calls over several steps (30 samples, 12 a step: epochs wrap inside a
    micro-batch), then a rollback, a skip ahead and a resume on a fresh TrainData. In order,
    every micro-batch after the first is the read-ahead (one read per call); a jump costs one
    extra read, and serves what a direct read gives."""
    seqs = Counting(_sequences())
    data = TrainData(seqs, GlobalSampler(len(seqs), SEED, MICRO, RANK, DP), "cpu")
    assert not data.pin  # the CPU never pins (pin_memory raises without an accelerator)
    _steps(data, seqs, 0, 4)
    assert seqs.reads == 4 * ACCUM + 1  # each call: the read-ahead served, the next one read
    _steps(data, seqs, 1, 2)  # spike monitor rollback to step 1
    assert seqs.reads == 6 * ACCUM + 2
    _check(data, seqs, 7 * GLOBAL + 5, 0)  # a skip ahead by a window that is not a step
    _check(data, seqs, 7 * GLOBAL + 5, 2)  # micro-step 1 skipped: the read-ahead is dropped
    assert seqs.reads == 6 * ACCUM + 2 + 4
    resumed = TrainData(seqs, GlobalSampler(len(seqs), SEED, MICRO, RANK, DP), "cpu")
    _steps(resumed, seqs, 9, 2)


def test_a_bad_batch_raises_when_asked_for_not_when_read_ahead():
    """An out-of-range token in micro-step 1's samples: serving micro-step 0 reads it ahead
    and must not raise; asking for micro-step 1 raises the shard error."""
    seqs = _sequences(vocab=100)
    bad = int(GlobalSampler(len(seqs), SEED, MICRO, RANK, DP).indices(0, 1)[0])
    tokens = seqs.tokens.copy()
    tokens[bad * SEQ + 1] = 200
    seqs = Sequences(tokens, SEQ, vocab_size=100)
    data = TrainData(seqs, GlobalSampler(len(seqs), SEED, MICRO, RANK, DP), "cpu")
    _check(data, seqs, 0, 0)
    assert data.ahead is None
    with pytest.raises(HarnessError, match="token id 200 >= vocab_size 100"):
        data.micro_batch(0, 1)


def test_cuda_branch_pins_each_host_batch_before_its_copy(monkeypatch):
    """The CUDA branch (pin, then the non-blocking copy) driven on the CPU: pin_memory is
    replaced by a recording copy, since on this CPU-only torch it raises. What stays unproven
    until a GPU runs it: a real pinned buffer, the copy's ordering on the current stream, and
    the time it saves."""
    with pytest.raises(RuntimeError):
        torch.zeros(1).pin_memory()  # why the branch is driven with a stand-in
    pinned = []

    def fake_pin(self):
        pinned.append(self.clone())
        return pinned[-1]

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    seqs = _sequences()
    data = TrainData(seqs, GlobalSampler(len(seqs), SEED, MICRO, RANK, DP), "cpu")
    data.pin = True
    _steps(data, seqs, 0, 1)
    assert len(pinned) == ACCUM + 1  # every batch read was pinned, the read-ahead included
    start, dev, host, _ = data.ahead  # the rows' sources: None without a mix
    assert host is pinned[-1]  # the entry keeps the pinned source of its pending copy alive
    assert torch.equal(dev, host)
    assert np.array_equal(dev[:, :-1].numpy(), _direct(seqs, GLOBAL, 0)[0])
