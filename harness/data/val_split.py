"""Which documents go to the validation split: each by a hash of its text, never a permutation.

A document is held out when blake2b-64(its UTF-8 text, keyed by data.seed) < val_fraction x
2^64. The hash is taken where the document is tokenized (one more pass over its bytes, ~1 GB/s
against a few MB/s of tokenizing), so memory and time per document are constant and nothing
is drawn over the whole corpus. A document's side depends on its text and the seed only: not
on the other documents (adding a file moves none of the others), its file, its position or its
format (the same text from .jsonl, Parquet or .zst falls on the same side), and exact
duplicates never straddle train and validation. When val_fraction > 0 and the hashes leave a
side empty (a corpus of a few documents), the document of the lowest hash is held out, or the
one of the highest kept (`one_each_side`).

A small corpus, one whose held-out share is expected to be fewer than MIN_HELD_OUT_DOCUMENTS
documents (documents x val_fraction), has every document split by its tokens instead: the last
val_fraction of each is held out (prepare.py's TOKEN_SPLIT). A handful of whole documents is
no validation set: the built-in corpus (147 files) held out 2 of them, 243 tokens, one
sequence; split by tokens it holds out 1% of every file, ~22k tokens, spread over all of them.
"""
from __future__ import annotations

import hashlib

# fewer documents expected on the held-out side than this: split every document by its tokens
MIN_HELD_OUT_DOCUMENTS = 100


def doc_hash(text: str, seed: int) -> int:
    key = seed.to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                                          key=key).digest(), "little")


def threshold(fraction: float) -> int:
    """Held out: hash < threshold."""
    return min(int(fraction * 2.0**64), 2**64 - 1)


def one_each_side(counts: dict[str, int], lowest_kept, highest_held) -> tuple | None:
    """The document to move so that neither side is empty: `lowest_kept()` (the kept document
    of the lowest hash) when none is held out, `highest_held()` when none is kept; None when
    both sides have documents. `counts`: documents per split ("train", "val")."""
    if counts["val"] == 0 and counts["train"] >= 2:
        return lowest_kept()
    if counts["train"] == 0 and counts["val"] >= 2:
        return highest_held()
    return None
