"""The seam between data and training: fixed-length samples plus a rank-aware sampler.

The trainer asks `TrainData.micro_batch(consumed, k)` for its tensors; the samples come
from harness.data.shards.Sequences (memory-mapped token shards, or any token array).
"""
from __future__ import annotations

import torch

from harness.data.sampler import GlobalSampler
from harness.data.shards import Sequences


class TrainData:
    def __init__(self, sequences: Sequences, sampler: GlobalSampler, device):
        self.sequences, self.sampler, self.device = sequences, sampler, device

    def micro_batch(self, consumed: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.sequences.batch(self.sampler.indices(consumed, micro_step))
        batch = torch.from_numpy(rows).to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]
