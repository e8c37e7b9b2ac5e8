"""The validation split's rule written plainly (Python integers, one document at a time): the
reference that harness/data/val_split.py's vectorised hashing is checked against."""
from __future__ import annotations

import hashlib

MASK = 2**64 - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def doc_hash(seed: int, source, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{source.sha256}:{source.kind}".encode()).digest()
    return splitmix64((int.from_bytes(digest[:8], "little") + index) & MASK)


def reference_flags(sources, fraction: float, seed: int) -> list[bool]:
    """Held out or not, per document in corpus order (a corpus with both sides non-empty;
    the threshold's adjustment for an empty side is tested on its own)."""
    threshold = int(fraction * 2.0**64)
    return [doc_hash(seed, s, i) < threshold for s in sources for i in range(s.documents)]
