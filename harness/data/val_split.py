"""Which documents go to the validation split: each by a hash of its id, never a permutation.

A document's id is its source's content hash and its index in that source (the first, the
second line of a JSONL...), keyed by data.seed: h = splitmix64(key(seed, source) + index), and
the document is held out when h < val_fraction x 2^64. Memory and time per document are
constant (a few vectorised operations, in chunks), a document's fate never depends on the
other documents (adding a file to the corpus moves none of the others), and a file copied
twice into the corpus falls on one side only. At least one document is held out and at least
one kept when val_fraction > 0: a first pass over the ids (no reading) moves the threshold
when the hashes leave a side empty. One document is split by its tokens instead
(prepare.py's TOKEN_SPLIT).
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np

from harness.data.corpus import Source

CHUNK = 1 << 20  # documents hashed at a time: 8 MB of uint64
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def source_key(seed: int, source: Source) -> int:
    digest = hashlib.sha256(f"{seed}:{source.sha256}:{source.kind}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output for state x (Steele et al. 2014) on uint64, wrapping."""
    with np.errstate(over="ignore"):
        x = x + _GAMMA
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def doc_hashes(seed: int, source: Source) -> Iterator[np.ndarray]:
    """uint64 hashes of the source's documents, in order, CHUNK at a time."""
    key = np.uint64(source_key(seed, source))
    for start in range(0, source.documents, CHUNK):
        index = np.arange(start, min(start + CHUNK, source.documents), dtype=np.uint64)
        with np.errstate(over="ignore"):
            index += key
        yield splitmix64(index)


class ValSplit:
    """`flags(source)`: whether each of its documents is held out. `None` from `of` when the
    corpus is one document (split by tokens)."""

    def __init__(self, seed: int, threshold: int):
        self.seed, self.threshold = seed, threshold

    @classmethod
    def of(cls, sources: list[Source], fraction: float, seed: int) -> ValSplit | None:
        n = sum(s.documents for s in sources)
        if fraction == 0:
            return cls(seed, 0)
        if n < 2:
            return None
        threshold = min(int(fraction * 2.0**64), 2**64 - 1)
        held, low, high = 0, 2**64, -1
        for source in sources:
            for h in doc_hashes(seed, source):
                held += int(np.count_nonzero(h < np.uint64(threshold)))
                low, high = min(low, int(h.min())), max(high, int(h.max()))
        if held == 0:
            threshold = low + 1  # the document of the lowest hash
        elif held == n:
            threshold = high  # all but the document of the highest hash
        return cls(seed, threshold)

    def flags(self, source: Source) -> Iterator[bool]:
        for h in doc_hashes(self.seed, source):
            yield from (h < np.uint64(self.threshold)).tolist()
