"""The seam between data and training: a table of fixed-length samples plus a sampler.

`TokenSequences` cuts a flat token array into samples of seq_len + 1 tokens (inputs and
shifted targets). The trainer asks `TrainData.micro_batch(consumed, k)` for its tensors.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch

from harness.data.sampler import GlobalSampler


class TokenSequences:
    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)


class TrainData:
    def __init__(self, sequences: TokenSequences, sampler: GlobalSampler, device: str):
        self.sequences, self.sampler, self.device = sequences, sampler, device

    def micro_batch(self, consumed: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.sequences[i] for i in self.sampler.indices(consumed, micro_step)])
        batch = torch.from_numpy(rows).to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]


def stdlib_bytes(max_bytes: int = 2_000_000) -> np.ndarray:
    """Byte-level stand-in corpus: the running Python's standard library sources (no download)."""
    out, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return np.frombuffer(b"".join(out)[:max_bytes], dtype=np.uint8)
