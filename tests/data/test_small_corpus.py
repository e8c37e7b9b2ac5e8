"""A small corpus (one document, or too few to hold out whole ones) is split by tokens (the last
val_fraction of each document held out), and the files
a source directory leaves out are named at prepare time: one line, how many, why, the first
few names. Tiny synthetic corpora, prepared in-process (each well under a second)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from harness.config.data import DataConfig
from harness.data import prepare as prep
from harness.data.shards import TokenShards
from harness.data.tokenizer import Tokenizer


def _words(lines: int = 6000) -> str:
    return "".join(f"word{i % 97} line{i % 13} {'x' * (i % 7)}\n" for i in range(lines))


def _cfg(sources, out, **kw) -> DataConfig:
    return DataConfig(**{"sources": [str(s) for s in sources], "out_dir": str(out),
                         "vocab_size": 300, **kw})


def _tokens(out, split: str) -> np.ndarray:
    return np.asarray(getattr(TokenShards.open(out), split))


@pytest.fixture(scope="module")
def one_doc(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    (root / "book.txt").write_text(_words())
    return root / "book.txt"


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_one_document_holds_out_its_last_tokens(one_doc, tmp_path, fraction):
    """Train and val are disjoint and together the whole document: the tokenizer's encoding
    of its text plus EOS (the reference), cut where round(n x val_fraction) tokens remain."""
    out = prep.prepare_data(_cfg([one_doc], tmp_path / "out", val_fraction=fraction),
                            progress=False)
    whole = Tokenizer(out / "tokenizer.model")
    want = np.array(whole.encode(one_doc.read_text()) + [whole.eos_id])
    n_val = round(len(want) * fraction)
    train, val = _tokens(out, "train"), _tokens(out, "val")
    assert len(val) == n_val > 0
    np.testing.assert_array_equal(np.concatenate([train, val]), want)
    manifest = TokenShards.open(out).manifest
    assert manifest["val_split"] == prep.TOKEN_SPLIT
    assert manifest["splits"]["val"]["documents"] == manifest["splits"]["train"]["documents"] == 1


def test_the_token_split_is_the_same_at_every_run(one_doc, tmp_path):
    a = prep.prepare_data(_cfg([one_doc], tmp_path / "a"), progress=False)
    b = prep.prepare_data(_cfg([one_doc], tmp_path / "b"), progress=False)
    for name in ("train.bin", "val.bin", "train.idx.npy", "val.idx.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert TokenShards.open(a).fingerprint == TokenShards.open(b).fingerprint


def test_prepare_data_says_what_it_held_out(one_doc, tmp_path, capsys):
    assert prep.main(_cfg([one_doc], tmp_path / "out")) == 0
    line = capsys.readouterr().out
    assert "val tokens (the last tokens of each document: a small corpus), 1 document," in line


def test_val_fraction_zero_holds_nothing_and_a_small_corpus_splits_each_document(tmp_path):
    """Two documents at val_fraction 0.01 (0.02 expected held out, far below
    val_split.MIN_HELD_OUT_DOCUMENTS): each gives its last 1% of tokens, the reference being
    each document's own encoding cut as for one document."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text(_words(3000))
    (tmp_path / "src" / "b.txt").write_text(_words(2000))
    none = prep.prepare_data(_cfg([tmp_path / "src" / "a.txt"], tmp_path / "zero",
                                  val_fraction=0.0), progress=False)
    assert TokenShards.open(none).manifest["splits"]["val"]["tokens"] == 0
    out = prep.prepare_data(_cfg([tmp_path / "src"], tmp_path / "two"), progress=False)
    two = TokenShards.open(out).manifest
    assert two["val_split"] == prep.TOKEN_SPLIT
    assert two["splits"]["val"]["documents"] == two["splits"]["train"]["documents"] == 2
    tok = Tokenizer(out / "tokenizer.model")
    val = []
    for name in ("a.txt", "b.txt"):
        want = tok.encode((tmp_path / "src" / name).read_text()) + [tok.eos_id]
        val += want[len(want) - round(len(want) * 0.01):]
    np.testing.assert_array_equal(_tokens(out, "val"), val)


def test_skipped_files_are_named_in_one_line(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep.txt").write_text(_words(2000))
    for i in range(4):
        (src / f"empty{i}.txt").write_text("")
    (src / "blank.jsonl").write_text("\n\n")
    (src / "image.png").write_bytes(bytes(range(256)))
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with caplog.at_level(logging.INFO, logger="harness"):
        prep.prepare_data(_cfg([src], tmp_path / "out", val_fraction=0.0), progress=False)
    lines = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    msg = lines[0].getMessage()
    assert msg.startswith("data.sources: skipped 7 files: 5 empty (")
    # sorted reading order; the first three names, then "..."
    assert f"{src}/blank.jsonl, {src}/empty0.txt, {src}/empty1.txt, ...)" in msg
    assert f"2 not UTF-8 text ({src}/image.png, {src}/latin1.txt)" in msg


def test_nothing_skipped_says_nothing(one_doc, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="harness"):
        prep.prepare_data(_cfg([one_doc], tmp_path / "out"), progress=False)
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]
