"""The seam between data and training: fixed-length samples plus a rank-aware sampler.

The trainer asks `TrainData.micro_batch(consumed, k)` for its tensors; the samples come
from harness.data.shards.Sequences (memory-mapped token shards, or any token array), or, for a
weighted mixture (data.mix), from harness.data.mixture's MixedSequences and MixtureSampler:
then `source_names` names the mixture's sources and `sources(consumed, k)` says which source
each row of a micro-batch came from (per-source metrics).

On CUDA the host batch is pinned before its non-blocking copy: from pageable memory the copy
is synchronous with the host, which then waits for the GPU at every micro-step instead of
running ahead of it. Each call also reads the NEXT micro-batch (the positions right after the
ones served: micro-step k + 1, which for the last k is micro-step 0 of the next step, see
harness.data.sampler) and starts its copy, so the memmap read and the copy are issued while the
GPU still runs the work already queued. The read-ahead is keyed by its first stream position;
a call for anything else (resume, rollback, skip) drops it and reads what was asked: results
never depend on the guess. It stays on on the CPU too, where it gains nothing but costs one
micro-batch of memory and one extra read per miss: one code path, and the CPU tests run it.

The copy goes on the current stream, so it is ordered before the kernels that later read the
batch on that stream without any sync (the trainer calls from one stream). The pending entry
holds the pinned host tensor; once it is served, torch's pinned-memory allocator keeps the
block until the copy has run (it records an event on the copy's stream).
"""
from __future__ import annotations

import numpy as np
import torch

from harness.common.errors import HarnessError
from harness.data.mixture import MixedSequences, MixtureSampler
from harness.data.sampler import GlobalSampler
from harness.data.shards import Sequences


class TrainData:
    def __init__(self, sequences: Sequences | MixedSequences,
                 sampler: GlobalSampler | MixtureSampler, device):
        self.sequences, self.sampler, self.device = sequences, sampler, torch.device(device)
        # the mixture's sources, in data.mix's order; empty without a mix
        self.source_names: tuple[str, ...] = tuple(getattr(sequences, "names", ()))
        self.pin = self.device.type == "cuda"  # pin_memory() needs an accelerator
        # the read-ahead batch: (start, on the device, host, its rows' sources or None)
        self.ahead: tuple[int, torch.Tensor, torch.Tensor, np.ndarray | None] | None = None
        self.served: tuple[int, np.ndarray | None] = (-1, None)  # (start, sources) last served

    def micro_batch(self, consumed: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self._start(consumed, micro_step)
        ahead, self.ahead = self.ahead, None
        loaded = ahead[1:] if ahead and ahead[0] == start else self._load(consumed, micro_step)
        batch, self.served = loaded[0], (start, loaded[2])
        try:  # a bad batch raises when asked for, not when guessed (it may never be asked for)
            self.ahead = (self._start(consumed, micro_step + 1),
                          *self._load(consumed, micro_step + 1))
        except HarnessError:
            pass
        return batch[:, :-1], batch[:, 1:]

    def sources(self, consumed: int, micro_step: int) -> np.ndarray | None:
        """The source index (into source_names) of each row of that micro-batch, in row order;
        None without a mix. The batch just served kept its own (from its sample ids, read
        once with them); any other is computed from its sample ids: no data is read."""
        if not self.source_names:
            return None
        if self.served[0] == self._start(consumed, micro_step):
            return self.served[1]
        return self.sequences.source_of(self.sampler.indices(consumed, micro_step))

    def _start(self, consumed: int, micro_step: int) -> int:
        """The first stream position of a micro-batch: it determines the batch."""
        return int(self.sampler.positions(consumed, micro_step)[0])

    def _load(self, consumed: int, micro_step: int
              ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
        """(on the device, host, the rows' sources: None without a mix)."""
        ids = self.sampler.indices(consumed, micro_step)
        host = torch.from_numpy(self.sequences.batch(ids))
        if self.pin:
            host = host.pin_memory()
        rows = self.sequences.source_of(ids) if self.source_names else None
        return host.to(self.device, non_blocking=True), host, rows
