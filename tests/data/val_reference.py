"""The validation split's rule written plainly, one document at a time: the reference that
prepare-data's workers, slices and assembly are checked against."""
from __future__ import annotations

import hashlib


def doc_hash(text: str, seed: int) -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")


def reference_flags(texts: list[str], fraction: float, seed: int) -> list[bool]:
    """Held out or not, per document (a corpus whose hashes leave both sides non-empty; the
    adjustment for an empty side is tested on its own)."""
    return [doc_hash(t, seed) < fraction * 2**64 for t in texts]
