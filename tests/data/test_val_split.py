"""Validation documents chosen by a hash of their text (issue 30 item 3, issue 26 item 5): the
same documents as the plain reference (val_reference.py), a share within its binomial error, a
document's side independent of the rest of the corpus, duplicates on one side, both sides
non-empty; skipped files counted in the manifest, listed in sources.jsonl and named on
prepare-data's closing line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from val_reference import doc_hash, reference_flags

from harness.config.data import DataConfig
from harness.data import prepare as prep
from harness.data import slices
from harness.data.shards import TokenShards
from harness.data.source_list import read_source_list
from harness.data.tokenizer import Tokenizer


def _texts(lines: int, tag: str) -> list[str]:
    return [f"{tag} {i}: " + f"w{i % 31} " * (1 + i % 5) for i in range(lines)]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
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


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    _jsonl(root / "a.jsonl", _texts(1500, "a"))
    _jsonl(root / "b.jsonl", _texts(500, "b"))
    return root


def test_held_out_documents_are_the_references(two_files, tmp_path):
    out = prep.prepare_data(_cfg([two_files / "a.jsonl", two_files / "b.jsonl"], tmp_path / "o"),
                            progress=False)
    texts = _texts(1500, "a") + _texts(500, "b")
    flags = reference_flags(texts, 0.1, 1234)
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


def test_duplicates_fall_on_one_side(tmp_path):
    """The same text twice (another file, another format, another position) is held out or
    kept as one: no validation document is also trained on."""
    texts = _texts(300, "d")
    _jsonl(tmp_path / "one.jsonl", texts)
    (tmp_path / "two.txt").write_text(texts[7])
    _jsonl(tmp_path / "three.jsonl", texts[::-1])
    got = _split_texts(prep.prepare_data(
        _cfg([tmp_path / "one.jsonl", tmp_path / "two.txt", tmp_path / "three.jsonl"],
             tmp_path / "o", val_fraction=0.3), progress=False))
    assert got["val"] and not set(got["val"]) & set(got["train"])
    assert len(got["val"]) + len(got["train"]) == 601


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_both_sides_keep_a_document(tmp_path, monkeypatch, fraction):
    """Hashes that leave a side empty: the document of the lowest hash is held out, or the
    one of the highest kept, wherever it lies (one file per slice here)."""
    monkeypatch.setattr(slices, "SLICE_BYTES", 1)
    monkeypatch.setattr(prep, "MIN_HELD_OUT_DOCUMENTS", 0)  # the split by documents, on 5
    texts = [f"document {i}: " + "text " * (3 + i) for i in range(5)]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    hashes = [doc_hash(t, 1234) for t in texts]
    assert not any(reference_flags(texts, 0.001, 1234)) and all(reference_flags(texts, 0.999,
                                                                                 1234))
    got = _split_texts(prep.prepare_data(
        _cfg([tmp_path / f"{i}.txt" for i in range(5)], tmp_path / "o", val_fraction=fraction),
        progress=False))
    if fraction < 0.5:
        assert got["val"] == [texts[hashes.index(min(hashes))]]
    else:
        assert got["train"] == [texts[hashes.index(max(hashes))]]
    assert len(got["val"]) + len(got["train"]) == 5


def test_skipped_files_are_counted_listed_and_named_on_the_closing_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(src / "keep.jsonl", _texts(200, "k"))
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
