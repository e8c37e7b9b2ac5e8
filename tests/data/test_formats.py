"""Source formats (harness/data/formats.py): Parquet, gzip/zstd JSON lines and large text files,
written here for real, read back through scan_sources/iter_documents and prepare-data."""
from __future__ import annotations

import gzip
import json
import sys
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from harness.common.errors import HarnessError
from harness.config.data import DataConfig
from harness.data import formats
from harness.data import prepare as prep
from harness.data.corpus import iter_documents, scan_sources
from harness.data.shards import TokenShards
from harness.data.tokenizer import Tokenizer

DOCS = [f"doc {i}: {'αβγ 中文 🙂 ' * (i % 7)}\n\tindented\n" for i in range(60)] + ["", "\n"]


def _jsonl(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def _parquet(path, docs, field="text", row_group=13, **kw):
    table = pa.table({"id": list(range(len(docs))), field: pa.array(docs, **kw)})
    pq.write_table(table, path, row_group_size=row_group)


def _zst_frames(data: bytes) -> bytes:
    """Two zstd frames, as Dolma's files may hold: a reader must read across them."""
    half = len(data) // 2
    c = zstandard.ZstdCompressor()
    return c.compress(data[:half]) + c.compress(data[half:])


def _read(paths, field="text", max_bytes=0):
    sources = scan_sources([str(p) for p in paths], max_bytes, text_field=field)
    return sources, list(iter_documents(sources, field))


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(formats, "BATCH_ROWS", 5)  # many batches per row group and file


def test_every_format_reads_back_the_documents_written(tmp_path, small_batches):
    d = tmp_path / "corpus"
    d.mkdir()
    _parquet(d / "a.parquet", DOCS)
    _parquet(d / "b.parquet", DOCS[:7], type=pa.large_string())
    (d / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl(DOCS)))
    (d / "d.json.gz").write_bytes(gzip.compress(_jsonl(DOCS[:3])))
    (d / "e.jsonl.zst").write_bytes(_zst_frames(_jsonl(DOCS)))
    (d / "f.json.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(DOCS[5:9])))
    sources, docs = _read([d])
    assert [s.kind for s in sources] == ["parquet", "parquet", "jsonl.gz", "jsonl.gz",
                                         "jsonl.zst", "jsonl.zst"]
    assert [t for t, _ in docs] == DOCS + DOCS[:7] + DOCS + DOCS[:3] + DOCS + DOCS[5:9]
    n = len(DOCS)
    # bytes: a row's UTF-8 text (Parquet), a decompressed line (JSON lines)
    assert [b for _, b in docs[:n]] == [len(t.encode()) for t in DOCS]
    lines = _jsonl(DOCS).splitlines(keepends=True)
    assert [b for _, b in docs[n + 7:2 * n + 7]] == [len(x) for x in lines]
    assert [s.documents for s in sources] == [n, 7, n, 3, n, 4]
    assert sources[0].size == sources[0].bytes_used == sum(len(t.encode()) for t in DOCS)
    assert sources[2].size == sources[2].bytes_used == len(_jsonl(DOCS))


def test_empty_files_of_every_format_are_skipped_as_empty(tmp_path):
    for name in ("a.parquet", "b.jsonl.gz", "c.jsonl.zst", "d.json.gz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(b""))  # a stream of nothing
    _parquet(tmp_path / "f.parquet", DOCS[:2])
    skipped = {}
    sources = scan_sources([str(tmp_path)], skipped=skipped)
    assert [s.documents for s in sources] == [2]
    assert [p.rsplit("/", 1)[1] for p in skipped["empty"]] == [
        "a.parquet", "b.jsonl.gz", "c.jsonl.zst", "d.json.gz", "e.jsonl.gz"]


def test_parquet_digest_is_of_the_texts_not_the_layout(tmp_path, small_batches):
    _parquet(tmp_path / "a.parquet", DOCS, row_group=13)
    _parquet(tmp_path / "b.parquet", DOCS, row_group=1000, type=pa.large_string())
    _parquet(tmp_path / "c.parquet", DOCS[:-1] + ["x"])
    a, b, c = (scan_sources([str(tmp_path / f"{x}.parquet")])[0] for x in "abc")
    assert a.sha256 == b.sha256 != c.sha256


def test_max_bytes_cuts_parquet_and_compressed_lines_at_a_document(tmp_path, small_batches):
    _parquet(tmp_path / "a.parquet", DOCS)
    lengths = np.cumsum([len(t.encode()) for t in DOCS])
    (s,), docs = _read([tmp_path / "a.parquet"], max_bytes=int(lengths[22]) + 1)
    assert (s.documents, s.bytes_used, s.size) == (23, lengths[22], lengths[-1])
    assert [t for t, _ in docs] == DOCS[:23]
    (tmp_path / "b.jsonl.zst").write_bytes(_zst_frames(_jsonl(DOCS)))
    lines = _jsonl(DOCS).splitlines(keepends=True)
    (s,), docs = _read([tmp_path / "b.jsonl.zst"], max_bytes=len(b"".join(lines[:9])) + 5)
    assert (s.documents, s.bytes_used, s.size) == (9, len(b"".join(lines[:9])), len(_jsonl(DOCS)))
    assert [t for t, _ in docs] == DOCS[:9]


def test_parquet_and_zstd_prepare_the_same_tokens_as_jsonl(tmp_path, shards_dir):
    docs = DOCS * 3
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_bytes(_jsonl(docs))
    (tmp_path / "p").mkdir()
    _parquet(tmp_path / "p" / "a.parquet", docs)
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "a.jsonl.zst").write_bytes(_zst_frames(_jsonl(docs)))
    (tmp_path / "c").mkdir()  # The Stack's column name, named by data.jsonl_text_field
    _parquet(tmp_path / "c" / "a.parquet", docs, field="content")
    model = str(shards_dir / "tokenizer.model")
    got = []
    for name in "jpzc":
        cfg = DataConfig(sources=[str(tmp_path / name)], out_dir=str(tmp_path / f"out{name}"),
                         tokenizer_model=model, val_fraction=0.1,
                         jsonl_text_field="content" if name == "c" else "text")
        shards = TokenShards.open(prep.prepare_data(cfg, progress=False))
        got.append((shards.train.tolist(), shards.val.tolist()))
    assert got[0] == got[1] == got[2] == got[3] and len(got[0][1]) > 0


@pytest.mark.parametrize("name, data", [
    ("a.jsonl.gz", gzip.compress(_jsonl(DOCS))[:-30]),  # truncated
    ("a.json.gz", b"not gzip at all\n"),
    ("a.jsonl.zst", zstandard.ZstdCompressor().compress(_jsonl(DOCS))[:-9] + b"junk"),
    ("a.json.zst", _zst_frames(_jsonl(DOCS))[:-20]),  # ends inside its second frame
    ("a.parquet", b"PAR1 garbage PAR1"),
])
def test_a_corrupt_file_is_one_line_naming_it(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(HarnessError) as e:
        _read([tmp_path])
    msg = str(e.value)
    assert str(tmp_path / name) in msg and "\n" not in msg and "corrupt" in msg


def test_truncated_parquet_is_refused(tmp_path):
    _parquet(tmp_path / "a.parquet", DOCS)
    data = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "a.parquet").write_bytes(data[:len(data) // 2])
    with pytest.raises(HarnessError, match=r"a\.parquet .*corrupt or truncated"):
        _read([tmp_path])


def test_parquet_column_missing_or_null_is_named(tmp_path):
    _parquet(tmp_path / "a.parquet", DOCS, field="content")
    with pytest.raises(HarnessError, match="no column 'text' .*id, content.*jsonl_text_field"):
        _read([tmp_path])
    assert [t for t, _ in _read([tmp_path], field="content")[1]] == DOCS
    _parquet(tmp_path / "a.parquet", DOCS[:5] + [None] + DOCS[5:])
    with pytest.raises(HarnessError, match=r"a\.parquet: row 5 has no 'text' \(null\)"):
        _read([tmp_path])
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "a.parquet")
    with pytest.raises(HarnessError, match="column 'text' is int64, not text"):
        _read([tmp_path])


@pytest.mark.parametrize("module, name", [("pyarrow", "a.parquet"),
                                          ("zstandard", "a.jsonl.zst")])
def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch, module, name):
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(DOCS)))
    _parquet(tmp_path / "a.parquet", DOCS)
    for mod in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, mod, None)  # import fails as if not installed
    with pytest.raises(HarnessError) as e:
        _read([tmp_path / name])
    assert str(e.value) == (f"data.sources: {tmp_path / name} is "
                            f"{'Parquet' if module == 'pyarrow' else 'zstd-compressed JSON lines'}"
                            f", which needs the `data` extra: pip install 'harness[data]'")


def test_parquet_is_read_a_batch_at_a_time(tmp_path):
    """One 12 MB row group: pyarrow holds a batch, a read buffer and a dictionary page (~4 MB
    in all), not the row group."""
    rng = np.random.default_rng(0)
    docs = ["".join(map(chr, row)) for row in rng.integers(97, 123, (40_000, 300))]
    _parquet(tmp_path / "a.parquet", docs, row_group=len(docs))
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.num_row_groups == 1
    peak = n = 0
    for array in formats.parquet_batches(tmp_path / "a.parquet", "text"):
        peak, n = max(peak, pa.total_allocated_bytes()), n + len(array)
    assert n == len(docs) and 0 < peak < 12_000_000 / 2


# ---- text files in parts ----------------------------------------------------------------------
def test_a_large_text_file_is_documents_cut_at_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "TEXT_PART_BYTES", 100)
    paras = [f"paragraph {i}\n" + "line é\n" * (i % 5) for i in range(40)]
    data = "\n".join(paras).encode()
    (tmp_path / "big.txt").write_bytes(data)
    (s,), docs = _read([tmp_path / "big.txt"])
    parts = [t.encode() for t, _ in docs]
    assert b"".join(parts) == data and s.documents == len(parts) > 10
    assert [b for _, b in docs] == [len(p) for p in parts]
    assert all(len(p) <= 100 and p.endswith(b"\n\n") for p in parts[:-1])
    assert s.sha256 == __import__("hashlib").sha256(data).hexdigest()
    # max_bytes keeps whole parts
    (c,), cut = _read([tmp_path / "big.txt"], max_bytes=250)
    assert [t for t, _ in cut] == [t for t, _ in docs[:c.documents]]
    assert c.bytes_used <= 250 < c.bytes_used + len(parts[c.documents]) and c.size == len(data)


def test_prepare_data_takes_a_large_text_file_as_its_parts(tmp_path, monkeypatch, shards_dir):
    monkeypatch.setattr(formats, "TEXT_PART_BYTES", 600)
    text = "".join(f"para {i}\n" + "words é 中文\n" * (i % 9) + "\n" for i in range(300))
    (tmp_path / "big.txt").write_text(text)
    cfg = DataConfig(sources=[str(tmp_path / "big.txt")], out_dir=str(tmp_path / "out"),
                     tokenizer_model=str(shards_dir / "tokenizer.model"), val_fraction=0)
    shards = TokenShards.open(prep.prepare_data(cfg, progress=False))
    parts = [t for t, _ in _read([tmp_path / "big.txt"])[1]]
    assert "".join(parts) == text and len(parts) > 20
    tok = Tokenizer(shards.tokenizer_path)
    tokens, idx = shards.train, shards.offsets("train")  # each part a document, with its EOS
    got = [tokens[a:b].tolist() for a, b in zip(idx[:-1], idx[1:])]
    assert got == [tok.encode(p) + [tok.eos_id] for p in parts]


def test_text_without_line_breaks_is_cut_between_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "TEXT_PART_BYTES", 64)
    text = "中文🙂é" * 50  # 3, 3, 4 and 2 byte characters
    (tmp_path / "a.txt").write_text(text)
    (s,), docs = _read([tmp_path / "a.txt"])
    assert "".join(t for t, _ in docs) == text and all(b <= 64 for _, b in docs)
    assert s.documents == len(docs) >= len(text.encode()) // 64


def test_a_text_file_that_fits_is_one_document(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "TEXT_PART_BYTES", 100)
    (tmp_path / "a.txt").write_bytes(b"x\n\n" * 33 + b"y")  # exactly 100 bytes
    (s,), docs = _read([tmp_path / "a.txt"])
    assert s.documents == 1 and docs == [("x\n\n" * 33 + "y", 100)]


def test_a_text_file_is_read_a_part_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "TEXT_PART_BYTES", 64 << 10)
    (tmp_path / "a.txt").write_bytes(b"some words on a line\n" * 200_000)  # 4.2 MB
    tracemalloc.start()
    try:
        sources = scan_sources([str(tmp_path / "a.txt")])
        n = sum(len(t) for t, _ in iter_documents(sources, "text"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 4_200_000 and peak < 1_000_000
