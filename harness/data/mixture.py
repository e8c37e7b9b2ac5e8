"""Weighted mixtures of prepared sources (`data.mix`): one sample stream drawn from several.

The stream's positions are cut in blocks of BLOCK. In every block source c gets n_c slots, the
largest-remainder rounding of share_c x BLOCK, so the proportions are exact over each block;
the order of the slots within block b is a FeistelPermutation keyed by (seed, phase, b). The
j-th draw of source c (j = b x n_c + its rank among c's slots in the block) is that source's
own sample perm_e(j % N_c), with e = j // N_c and perm_e the source's own Feistel permutation of
its N_c samples for epoch e: each source goes through all its samples once per its own epoch,
and repeats independently of the others. Every position is computed on its own (O(1), nothing
stored), so a micro-batch's samples depend on its positions only, never on the data-parallel
size: the same global stream at any world size, as harness.data.sampler's GlobalSampler.

BLOCK = 2^16: a share is represented to within 0.5/BLOCK (a 0.1% source's share to within 1%
of itself, where 4096 would be 2.3%), and proportions are exact every 65,536 samples (128 steps
of a 512-sequence batch). Its permutation is a Feistel network of 2 x 8 bits: no cycle-walking.
A smaller block would only make the exact window shorter; a batch's own composition is random
either way (drawn without replacement from its block).

Phases: a resume with new weights (data.mix_reweight=true) starts a new phase at its sample
position; positions before it keep their samples. A phase's blocks count from its own start,
and each source's draws go on from the first draw after the blocks the earlier phases touched
(the unused slots of a cut block are skipped, never repeated): sources keep their epochs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from harness.common.errors import HarnessError
from harness.config.data import MIX_BLOCK
from harness.data.sampler import FeistelPermutation
from harness.data.shards import Sequences

BLOCK = MIX_BLOCK  # 2^16, said in harness/config/data.py too (shares of at least 1/BLOCK)
_BLOCK_TAG, _SOURCE_TAG = 0x6D697862, 0x6D697873  # keep blocks' and sources' keys apart


def _derived_seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0])


def _name_words(name: str) -> list[int]:
    return list(name.encode())


def slots(shares: Sequence[float], block: int = BLOCK) -> np.ndarray:
    """Each source's slots per block: largest-remainder rounding of share x block (ties go to
    the earlier source), summing to `block`."""
    exact = np.asarray(shares, dtype=np.float64) * block / float(np.sum(shares))
    n = np.floor(exact).astype(np.int64)
    order = sorted(range(len(n)), key=lambda c: (-(exact[c] - n[c]), c))
    for c in order[:block - int(n.sum())]:
        n[c] += 1
    return n


class MixedSequences:
    """The sources' Sequences side by side: global sample id g is sample g - offsets[c] of
    source c, where offsets[c] <= g < offsets[c + 1]."""

    def __init__(self, names: Sequence[str], parts: Sequence[Sequences]):
        self.names, self.parts = tuple(names), list(parts)
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])
        self.seq_len = self.parts[0].seq_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, indices: Sequence[int]) -> np.ndarray:
        """The source index of each global sample id."""
        return np.searchsorted(self.offsets[1:], np.asarray(indices, np.int64), side="right")

    def batch(self, indices: Sequence[int]) -> np.ndarray:
        """int64 [len(indices), seq_len + 1], rows in the order of `indices` (each source's
        rows read and vocabulary-checked by its own Sequences)."""
        ids = np.asarray(indices, np.int64)
        which = self.source_of(ids)
        out = np.empty((len(ids), self.seq_len + 1), np.int64)
        for c in np.unique(which):
            at = which == c
            out[at] = self.parts[c].batch(ids[at] - self.offsets[c])
        return out


class _Phase:
    """One weight vector from sample position `start` on."""

    def __init__(self, index: int, start: int, shares: Sequence[float], drawn: np.ndarray,
                 seed: int, block: int):
        self.start, self.block = start, block
        self.n = slots(shares, block)
        self.ends = np.cumsum(self.n)
        self.drawn = drawn  # each source's draws before this phase
        self.seed = _derived_seed(seed, _BLOCK_TAG, index)
        self._perm: tuple[int, FeistelPermutation] | None = None

    def permutation(self, b: int) -> FeistelPermutation:
        if self._perm is None or self._perm[0] != b:
            self._perm = (b, FeistelPermutation(self.block, self.seed, b))
        return self._perm[1]

    def draws(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, that source's draw number) of the phase's own positions q."""
        blocks, within = q // self.block, q % self.block
        slot = np.empty_like(q)
        for b in np.unique(blocks):
            at = blocks == b
            slot[at] = self.permutation(int(b))(within[at])
        source = np.searchsorted(self.ends, slot, side="right")
        rank = slot - (self.ends - self.n)[source]
        return source, self.drawn[source] + blocks * self.n[source] + rank

    def touched(self, length: int) -> np.ndarray:
        """Each source's draws reserved by the blocks that `length` positions touch."""
        return -(-length // self.block) * self.n


class MixtureSampler:
    """GlobalSampler's interface over a MixedSequences: `indices(consumed, micro_step)` are
    global sample ids; `phases` is [(start position, shares)], the first at 0."""

    def __init__(self, names: Sequence[str], counts: Sequence[int],
                 phases: Sequence[tuple[int, Sequence[float]]], seed: int, micro_batch: int,
                 dp_rank: int, dp_size: int, block: int = BLOCK):
        if not phases or phases[0][0] != 0:
            raise ValueError("the first phase starts at position 0")
        if any(n < 1 for n in counts):
            raise ValueError("every source needs at least one sample")
        self.names, self.counts = tuple(names), np.asarray(counts, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.seed, self.block = seed, block
        self.micro, self.rank, self.dp = micro_batch, dp_rank, dp_size
        self.phases: list[_Phase] = []
        drawn = np.zeros(len(counts), np.int64)
        for k, (start, shares) in enumerate(phases):
            if k:
                previous = self.phases[-1]
                if start < previous.start:
                    raise ValueError("phases must start in order")
                drawn = drawn + previous.touched(start - previous.start)
            self.phases.append(_Phase(k, start, shares, drawn, seed, block))
        self.starts = np.array([p.start for p in self.phases], np.int64)
        self.source_seeds = [_derived_seed(seed, _SOURCE_TAG, *_name_words(n)) for n in names]
        self._perms: dict[int, tuple[int, FeistelPermutation]] = {}  # source: (epoch, perm)

    def positions(self, consumed: int, micro_step: int) -> np.ndarray:
        start = consumed + (micro_step * self.dp + self.rank) * self.micro
        return np.arange(start, start + self.micro, dtype=np.int64)

    def draws(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, draw number within that source) of each stream position."""
        pos = np.asarray(pos, np.int64)
        phase = np.searchsorted(self.starts, pos, side="right") - 1
        source, draw = np.empty_like(pos), np.empty_like(pos)
        for k in np.unique(phase):
            at = phase == k
            p = self.phases[int(k)]
            source[at], draw[at] = p.draws(pos[at] - p.start)
        return source, draw

    def _permutation(self, c: int, epoch: int) -> FeistelPermutation:
        held = self._perms.get(c)
        if held is None or held[0] != epoch:
            held = (epoch, FeistelPermutation(int(self.counts[c]), self.source_seeds[c], epoch))
            self._perms[c] = held
        return held[1]

    def samples(self, pos: np.ndarray) -> np.ndarray:
        """Global sample ids of stream positions."""
        source, draw = self.draws(pos)
        out = np.empty_like(draw)
        for c in np.unique(source):
            at = source == c
            n = int(self.counts[c])
            epochs, within = draw[at] // n, draw[at] % n
            local = np.empty_like(within)
            for e in np.unique(epochs):
                sel = epochs == e
                local[sel] = self._permutation(int(c), int(e))(within[sel])
            out[at] = local + self.offsets[c]
        return out

    def indices(self, consumed: int, micro_step: int) -> np.ndarray:
        return self.samples(self.positions(consumed, micro_step))

    def sources(self, consumed: int, micro_step: int) -> np.ndarray:
        return self.draws(self.positions(consumed, micro_step))[0]

    def drawn_by(self, end: int) -> np.ndarray:
        """Each source's draws over positions [0, end), counted exactly (the last block's
        share by its permutation)."""
        total = np.zeros(len(self.counts), np.int64)
        for k, p in enumerate(self.phases):
            if p.start >= end:
                break
            stop = min(end, int(self.starts[k + 1]) if k + 1 < len(self.phases) else end)
            length = stop - p.start
            full, rest = divmod(length, self.block)
            total += full * p.n
            if rest:
                source, _ = p.draws(np.arange(full * self.block, length, dtype=np.int64))
                total += np.bincount(source, minlength=len(self.counts))
        return total


def check_repeats(names: Sequence[str], counts: Sequence[int], drawn: np.ndarray,
                  caps: Sequence[int]) -> None:
    """data.mix[i].max_repeats: the epochs of source i a run may draw (0: no cap)."""
    for i, (name, n, d, cap) in enumerate(zip(names, counts, drawn, caps)):
        if cap and d > cap * n:
            raise HarnessError(
                f"data.mix[{i}].max_repeats={cap}: this run draws {int(d):,} samples of "
                f"'{name}', {d / n:.2f} epochs of its {int(n):,}: raise "
                f"data.mix[{i}].max_repeats, lower its weight or train.max_steps, or add data")
