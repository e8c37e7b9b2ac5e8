"""The tokenizer's training sample: sized from the vocabulary and bounded in memory
(harness/data/tokenizer.py: train_sample_bytes, TRAIN_MEMORY_BYTES)."""
from __future__ import annotations

import math

import pytest

from harness.common.errors import HarnessError
from harness.data import tokenizer as tk
from harness.data.corpus import iter_documents, scan_sources


def test_sample_grows_with_the_vocabulary_up_to_the_memory_bound():
    # small vocabularies keep the sample they always had: their tokenizers are unchanged
    assert tk.train_sample_bytes("bpe", 512) == 8 << 20
    assert tk.train_sample_bytes("unigram", 512) == 1 << 20
    assert tk.train_sample_bytes("unigram", 32000) == 32000 * 256  # 1 MiB failed at 32k
    assert tk.train_sample_bytes("bpe", 50257) == 50257 * 1024
    cap = tk.TRAIN_MEMORY_BYTES // tk.TRAINER_BYTES_PER_BYTE
    assert tk.train_sample_bytes("bpe", 2**20) == tk.train_sample_bytes("unigram", 2**22) == cap
    assert cap * tk.TRAINER_BYTES_PER_BYTE <= 2 << 30


def test_the_sample_is_strided_and_never_passes_the_memory_bound(monkeypatch):
    chunks = [f"chunk {i:04d} " + "é" * (i % 50) for i in range(1000)]
    assert list(tk._catching(iter(chunks), 3, [])) == chunks[::3]
    monkeypatch.setattr(tk, "TRAIN_MEMORY_BYTES", 24 * 5000)  # room for 5000 bytes
    held = list(tk._catching(iter(chunks), 3, []))
    size = sum(len(c.encode()) for c in held)
    assert held == chunks[:3 * len(held):3] and 5000 - 100 < size <= 5000


@pytest.mark.slow
def test_unigram_asks_for_more_pieces_than_a_megabyte_holds(tmp_path):
    """Unigram 16000 on the ~10 MB built-in corpus: a 1 MiB sample holds ~14k pieces (the old
    fixed sample failed: 'too large for this little text'); the sample sized from the
    vocabulary (4 MiB) trains (~20 s alone on this machine)."""
    sources = scan_sources([])
    total = sum(s.bytes_used for s in sources)
    assert total > 8e6
    texts = lambda: (t for t, _ in iter_documents(sources, "text"))  # noqa: E731
    tok = tk.train_tokenizer(texts(), tmp_path / "a.model", "unigram", 16000, total)
    assert tok.vocab_size == 16000
    assert math.ceil(total / tk.train_sample_bytes("unigram", 16000)) == 3
    # a corpus 4x as large for the same sample size: the stride leaves ~1 MiB, as before
    with pytest.raises(HarnessError, match="too large for this little text"):
        tk.train_tokenizer(texts(), tmp_path / "b.model", "unigram", 16000, total * 4)
