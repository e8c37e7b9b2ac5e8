"""A seeded global order of fixed-length samples, split across data-parallel ranks.

Position p in the stream is sample perm_e[p % n] with e = p // n (one permutation per
epoch). The optimizer step that starts at `consumed` samples takes positions
[consumed, consumed + global_batch); micro-step k of rank r takes the m positions starting
at consumed + (k * dp + r) * m. The set of samples in a global batch therefore depends only
on `consumed`, never on how many ranks share it, so a resume at another world size sees the
same data.
"""
from __future__ import annotations

import numpy as np


class GlobalSampler:
    def __init__(self, n_samples: int, seed: int, micro_batch: int, dp_rank: int, dp_size: int):
        if n_samples < 1:
            raise ValueError("no samples to draw from")
        self.n, self.seed = n_samples, seed
        self.micro, self.rank, self.dp = micro_batch, dp_rank, dp_size
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def positions(self, consumed: int, micro_step: int) -> np.ndarray:
        start = consumed + (micro_step * self.dp + self.rank) * self.micro
        return np.arange(start, start + self.micro, dtype=np.int64)

    def indices(self, consumed: int, micro_step: int) -> np.ndarray:
        pos = self.positions(consumed, micro_step)
        return np.array([self._permutation(int(p) // self.n)[p % self.n] for p in pos])
