"""Validation documents chosen by a hash of their id (issue 30 item 3, issue 26 item 5): the
same documents as the plain reference (val_reference.py), a share within its binomial error, a
document's side independent of the rest of the corpus, duplicates on one side, both sides
non-empty; skipped files counted in the manifest, listed in sources.jsonl and named on
prepare-data's closing line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from val_reference import reference_flags, splitmix64

from harness.config.data import DataConfig
from harness.data import prepare as prep
from harness.data import val_split
from harness.data.corpus import Source, iter_documents, scan_sources
from harness.data.shards import TokenShards
from harness.data.source_list import read_source_list
from harness.data.tokenizer import Tokenizer


def _rows(path: Path, lines: int, tag: str) -> Path:
    path.write_text("".join(json.dumps({"text": f"{tag} {i}: " + f"w{i % 31} " * (1 + i % 5)})
                            + "\n" for i in range(lines)))
    return path


def _cfg(sources, out, **kw) -> DataConfig:
    return DataConfig(**{"sources": [str(s) for s in sources], "out_dir": str(out),
                         "vocab_size": 300, "val_fraction": 0.1, **kw})


def _split_texts(out: Path) -> dict[str, list[str]]:
    shards = TokenShards.open(out)
    tok = Tokenizer(shards.tokenizer_path)
    texts = {}
    for split in ("train", "val"):
        tokens, idx = getattr(shards, split), shards.offsets(split)
        texts[split] = [tok.decode(tokens[a:b - 1]) for a, b in zip(idx[:-1], idx[1:])]
    return texts


def test_splitmix64_known_answers():
    """SplitMix64's published first outputs from state 0 (x = k x gamma, then the mix)."""
    gamma = 0x9E3779B97F4A7C15
    want = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    got = val_split.splitmix64(np.array([0, gamma, 2 * gamma % 2**64], np.uint64))
    assert [int(x) for x in got] == want
    assert [splitmix64((k * gamma) % 2**64) for k in range(3)] == want


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    _rows(root / "a.jsonl", 1500, "a")
    _rows(root / "b.jsonl", 500, "b")
    return root


def test_held_out_documents_are_the_references(two_files, tmp_path):
    out = prep.prepare_data(_cfg([two_files / "a.jsonl", two_files / "b.jsonl"], tmp_path / "o"),
                            progress=False)
    sources = scan_sources([str(two_files / "a.jsonl"), str(two_files / "b.jsonl")])
    texts = [t for t, _ in iter_documents(sources, "text")]
    flags = reference_flags(sources, 0.1, 1234)
    got = _split_texts(out)
    assert got["val"] == [t for t, f in zip(texts, flags) if f]
    assert got["train"] == [t for t, f in zip(texts, flags) if not f]
    n, p = len(texts), 0.1
    assert abs(len(got["val"]) - n * p) < 4 * math.sqrt(n * p * (1 - p))


def test_a_documents_side_does_not_depend_on_the_other_files(two_files, tmp_path):
    """Adding b.jsonl to a corpus of a.jsonl moves none of a's documents (a permutation of
    all documents would reshuffle them)."""
    alone = _split_texts(prep.prepare_data(_cfg([two_files / "a.jsonl"], tmp_path / "a"),
                                           progress=False))
    both = _split_texts(prep.prepare_data(
        _cfg([two_files / "a.jsonl", two_files / "b.jsonl"], tmp_path / "ab"), progress=False))
    for split in ("train", "val"):
        assert [t for t in both[split] if t.startswith("a ")] == alone[split]
    assert alone["val"] and alone["train"]


def _source(sha: str, docs: int) -> Source:
    return Source(f"/{sha}.jsonl", "jsonl", 100, 100, sha, docs)


def test_duplicated_files_fall_on_one_side():
    sources = [_source("aa", 50), _source("bb", 50), _source("aa", 50)]
    split = val_split.ValSplit.of(sources, 0.3, 7)
    flags = [list(split.flags(s)) for s in sources]
    assert flags[0] == flags[2] != flags[1] and any(flags[0]) and not all(flags[0])


@pytest.mark.parametrize("fraction, docs", [(0.001, 3), (0.999, 3), (0.5, 2)])
def test_both_sides_keep_a_document(fraction, docs):
    """Hashes that leave a side empty move the threshold: the lowest hash held out, or the
    highest kept (checked against the reference hashes)."""
    from val_reference import doc_hash

    source = _source("cc", docs)
    flags = list(val_split.ValSplit.of([source], fraction, 1).flags(source))
    assert 0 < sum(flags) < docs
    hashes = [doc_hash(1, source, i) for i in range(docs)]
    raw = sum(h < fraction * 2**64 for h in hashes)
    if raw == 0:
        assert flags == [h == min(hashes) for h in hashes]
    elif raw == docs:
        assert flags == [h != max(hashes) for h in hashes]
    else:
        assert flags == [h < fraction * 2**64 for h in hashes]


def test_chunks_hash_like_one_pass(monkeypatch):
    source = _source("dd", 1000)
    whole = np.concatenate(list(val_split.doc_hashes(5, source)))
    monkeypatch.setattr(val_split, "CHUNK", 64)
    assert np.array_equal(np.concatenate(list(val_split.doc_hashes(5, source))), whole)


def test_skipped_files_are_counted_listed_and_named_on_the_closing_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _rows(src / "keep.jsonl", 200, "k")
    for i in range(3):
        (src / f"empty{i}.txt").write_text("")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    out = tmp_path / "out"
    for _ in range(2):  # built, then up to date: the same counts
        assert prep.main(_cfg([src], out)) == 0
        line = capsys.readouterr().out
        assert (f"200 documents (skipped 4 files: 3 empty, 1 not UTF-8 text; listed in "
                f"{out}/sources.jsonl), vocab 300") in line
    manifest = TokenShards.open(out).manifest
    assert manifest["sources"]["skipped"] == {"empty": 3, "not UTF-8 text": 1}
    rows = [r for r in read_source_list(out, manifest) if "skipped" in r]
    assert rows == [{"path": f"{src}/empty{i}.txt", "skipped": "empty"} for i in range(3)] + \
        [{"path": f"{src}/latin1.txt", "skipped": "not UTF-8 text"}]
