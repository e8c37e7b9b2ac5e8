"""ShardWriter's memory does not grow with the documents (issue 30, item 3): the offsets are
streamed to disk, and the index it writes equals the one a list of offsets gave."""
import tracemalloc

import numpy as np
import pytest

from harness.data.shards import ShardWriter


class FakeTokenizer:  # what ShardWriter reads of a tokenizer: the manifest's fields
    vocab_size, eos_id, sha256 = 512, 1, "0" * 64


def _write(directory, docs: int) -> int:
    """Peak bytes traced while `docs` one-to-four-token documents are added."""
    tracemalloc.start()
    with ShardWriter(directory, FakeTokenizer()) as writer:
        tokens = [np.arange(1, k + 1, dtype=np.int64) for k in range(1, 5)]
        for d in range(docs):
            writer.add("val" if d % 10 == 0 else "train", tokens[d % 4])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        writer.finish(fingerprint="f")
    return peak


def test_memory_per_document_is_constant(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small, large = _write(tmp_path / "a", 20_000), _write(tmp_path / "b", 120_000)
    # a list of offsets grew ~40 B per document: 4 MB more here; the buffer is fixed
    assert (large - small) / 100_000 < 1.0, (small, large)
    assert large < 4 * 8 * ShardWriter.OFFSETS_BUFFER + 100_000


@pytest.mark.parametrize("docs", [0, 1, ShardWriter.OFFSETS_BUFFER - 1,
                                  ShardWriter.OFFSETS_BUFFER, 3 * ShardWriter.OFFSETS_BUFFER + 5])
def test_the_index_is_the_offsets(tmp_path, docs):
    rng = np.random.default_rng(docs)
    lengths = {"train": rng.integers(1, 9, docs), "val": rng.integers(1, 9, docs // 3)}
    with ShardWriter(tmp_path, FakeTokenizer()) as writer:
        for split, ls in lengths.items():
            for k in ls:
                writer.add(split, np.full(k, 7))
        manifest = writer.finish(fingerprint="f")
    for split, ls in lengths.items():
        idx = np.load(tmp_path / f"{split}.idx.npy")
        assert idx.dtype == np.int64 and np.array_equal(idx, np.concatenate([[0], np.cumsum(ls)]))
        assert manifest["splits"][split]["documents"] == len(ls)
        assert manifest["splits"][split]["tokens"] == int(np.sum(ls))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
