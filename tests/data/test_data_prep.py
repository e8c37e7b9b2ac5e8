"""Data preparation: lossless tokenizer, shard layout, validation errors, atomic output."""
from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from harness.common.errors import HarnessError
from harness.config.data import DataConfig
from harness.data import out_dir as data_out_dir
from harness.data import prepare as prep
from harness.data.corpus import iter_documents, scan_sources, stdlib_dir
from harness.data.shards import ShardWriter, TokenShards, token_dtype
from harness.data.source_list import read_source_list
from harness.data.tokenizer import Tokenizer, train_tokenizer
from val_reference import reference_flags

TRICKY = ["def f(x):\n\tif x:\n\t\treturn  x \n    pass\n", "é 中文 🙂", "  leading\r\n\n\n",
          "trailing   \t", "\u2581 literal mark\u2581\u2581", "", "\x00\x7f\u00a0\u3000"]


def _stdlib_texts(n: int) -> list[str]:
    """The first n standard library files under 20 kB: real code, kept small for speed."""
    small = [s for s in scan_sources([], 2_000_000) if s.size < 20_000][:n]
    return [t for t, _ in iter_documents(small, "text")]


@pytest.fixture(scope="module", autouse=True)
def _split_by_documents():
    """These corpora of a few documents are split by documents (val_split's
    MIN_HELD_OUT_DOCUMENTS lowered): the small-corpus token split is test_small_corpus.py's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prep, "MIN_HELD_OUT_DOCUMENTS", 0)
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A directory of distinct documents: code, unicode prose, JSONL, and files to skip."""
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(_stdlib_texts(12)):
        (root / f"code{i:02d}.py").write_text(text + f"\n# doc {i}\n")
    (root / "prose.txt").write_text("Ünïcödé prose: é 中文 🙂\n\tindented\n" * 20)
    rows = [{"text": f"record {i}: {'αβγ ' * i}\n  end", "id": i} for i in range(6)]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (root / "image.bin").write_bytes(bytes(range(256)))  # binary: skipped
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: skipped
    return root


def _cfg(corpus: Path, out: Path, **kw) -> DataConfig:
    return DataConfig(**{"sources": [str(corpus)], "out_dir": str(out), "vocab_size": 400,
                         "val_fraction": 0.2, **kw})


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    return prep.prepare_data(_cfg(corpus, tmp_path_factory.mktemp("p") / "out"), progress=False)


def _snapshot(d: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.iterdir())}


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_round_trip_is_lossless(tmp_path, kind):
    texts = _stdlib_texts(6) + TRICKY
    tok = train_tokenizer(iter(texts), tmp_path / "t.model", kind, 400, 10**6)
    assert tok.vocab_size == 400 and tok.eos_id >= 0 and len(tok.sha256) == 64
    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in [*range(0, 0x250), *range(0x2500, 0x2600), 0x3000, 0x4E2D,
                                 0x1F642, 0x10FFFF]]
    fuzz = ["".join(rng.choice(alphabet, 40)) for _ in range(100)]
    for text in texts + fuzz + ["unseen ☃ ✓ 𝔘 characters"]:
        assert tok.decode(tok.encode(text)) == text
    assert Tokenizer(tmp_path / "t.model").encode(texts[0]) == tok.encode(texts[0])


def test_shards_hold_each_document_then_eos(prepared, corpus):
    shards = TokenShards.open(prepared)
    tok = Tokenizer(shards.tokenizer_path)
    sources = scan_sources([str(corpus)])
    texts = [t for t, _ in iter_documents(sources, "text")]
    assert len(texts) == 12 + 1 + 6
    got = {}
    for split in ("train", "val"):
        tokens, idx = getattr(shards, split), shards.offsets(split)
        docs = [tokens[a:b].tolist() for a, b in zip(idx[:-1], idx[1:])]
        got[split] = [tok.decode(d[:-1]) for d in docs]
        for d, text in zip(docs, got[split]):
            assert d == tok.encode(text) + [tok.eos_id]
        # each split keeps corpus order
        assert got[split] == [t for t in texts if t in set(got[split])]
    assert sorted(got["train"] + got["val"]) == sorted(texts)
    # held out: the documents whose text hashes below 0.2 (val_reference.py)
    want = [t for t, held in zip(texts, reference_flags(texts, 0.2, 1234)) if held]
    assert got["val"] == want and 0 < len(want) < len(texts)
    m = shards.manifest
    assert m["dtype"] == "uint16" and m["vocab_size"] == 400
    assert m["splits"]["train"]["tokens"] == len(shards.train)
    rows = read_source_list(prepared, m)
    used = {Path(s["path"]).name for s in rows if "skipped" not in s}
    assert used >= {"prose.txt", "rows.jsonl"} and not {"image.bin", "HEAD"} & used


def test_token_dtype_and_uint32_shards(tmp_path):
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    model = tmp_path / "tokenizer.model"
    model.write_bytes(b"stand-in")
    sha = hashlib.sha256(b"stand-in").hexdigest()
    fake = SimpleNamespace(vocab_size=70000, eos_id=1, sha256=sha)
    with ShardWriter(tmp_path, fake) as w:
        w.add("train", np.array([69999, 5, 1]))
        w.add("val", np.array([7, 1]))
        w.finish(fingerprint="f")
    shards = TokenShards.open(tmp_path)
    assert shards.train.dtype == np.uint32 and shards.train.tolist() == [69999, 5, 1]
    assert shards.offsets("val").tolist() == [0, 2]


def test_sequences_are_shifted_windows(prepared):
    shards = TokenShards.open(prepared)
    seqs = shards.sequences("train", 16)
    assert len(seqs) == (len(shards.train) - 1) // 16
    assert seqs[2].tolist() == shards.train[32:49].tolist()
    last = len(seqs) - 1
    assert seqs.batch([0, last]).shape == (2, 17)
    assert seqs.batch([last])[0, -1] == shards.train[last * 16 + 16]
    with pytest.raises(HarnessError, match="val split"):
        shards.sequences("val", len(shards.val))


def test_builtin_corpus_is_deterministic_python_source():
    a = scan_sources([], 300_000)
    assert a == scan_sources([], 300_000)
    assert sum(s.documents for s in a) >= 5 and sum(s.bytes_used for s in a) <= 300_000
    for s in a:
        rel = Path(s.path).relative_to(stdlib_dir())
        assert rel.suffix == ".py" and not {"site-packages", "test"} & set(rel.parts)


def test_identical_prepare_is_a_noop(prepared, corpus):
    before = _snapshot(prepared)
    assert prep.prepare_data(_cfg(corpus, prepared), progress=False) == prepared
    assert _snapshot(prepared) == before


def test_differing_out_dir_is_never_overwritten(prepared, corpus, tmp_path):
    before = _snapshot(prepared)
    with pytest.raises(HarnessError, match=re.escape(f"data.seed=7 but data.out_dir={prepared} "
                                                     "was prepared with data.seed=1234")):
        prep.prepare_data(_cfg(corpus, prepared, seed=7), progress=False)
    assert _snapshot(prepared) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(HarnessError, match="not token shards .* choose another data.out_dir") \
            as err:
        prep.prepare_data(_cfg(corpus, foreign), progress=False)
    assert "delete" not in str(err.value)  # never suggests destroying what it did not make
    assert [p.name for p in tmp_path.iterdir()] == ["foreign"]  # no temp dir left behind
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("sources, match", [
    (["missing.txt"], "missing.txt does not exist"),
    ([], "no documents found"),  # an empty directory, filled in below
    (["bad.jsonl"], r"bad.jsonl:2: not a JSON line"),
])
def test_bad_sources_name_the_path(tmp_path, sources, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    paths = [str(tmp_path / s) for s in sources] or [str(tmp_path / "empty")]
    out = tmp_path / "out"
    with pytest.raises(HarnessError, match=match):
        prep.prepare_data(DataConfig(sources=paths, out_dir=str(out), vocab_size=400),
                          progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bad_config_names_the_key():
    with pytest.raises(HarnessError, match="data.tokenizer_type"):
        DataConfig(tokenizer_type="wordpiece").validate()
    with pytest.raises(HarnessError, match="data.val_fraction"):
        DataConfig(val_fraction=1.0).validate()
    with pytest.raises(HarnessError, match="data.vocab_size"):
        DataConfig(vocab_size=100).validate()


@pytest.mark.parametrize("vocab, match", [(260, "data.vocab_size >= 2"),
                                          (5000, "data.vocab_size <= ")])
def test_vocab_size_misfit_says_what_fits(tmp_path, vocab, match):
    with pytest.raises(HarnessError, match=match):
        train_tokenizer(iter(["abc é 中文 🙂 " * 50]), tmp_path / "t.model", "bpe", vocab, 10**3)


def _copy(prepared: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in prepared.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_corrupt_shards_are_refused(prepared, tmp_path):
    d = _copy(prepared, tmp_path / "trunc")
    (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-2])
    with pytest.raises(HarnessError, match="train.bin: .*truncated or corrupt"):
        TokenShards.open(d)

    d = _copy(prepared, tmp_path / "range")
    tokens = np.memmap(d / "train.bin", np.uint16, mode="r+")
    tokens[3] = 450
    tokens.flush()
    del tokens
    # prepare-data's full check reads every token; the trainer's, the batch that holds it
    with pytest.raises(HarnessError, match="train.bin: token id 450 >= vocab_size 400"):
        TokenShards.open(d, verify=True)
    seqs = TokenShards.open(d).sequences("train", 16)
    seqs.batch([1, 2])  # tokens 16-48: intact
    with pytest.raises(HarnessError, match=r"train.bin: token id 450 >= vocab_size 400 in "
                                           r"sequences \[2, 0\]; .*truncated or corrupt"):
        seqs.batch([2, 0])

    d = _copy(prepared, tmp_path / "json")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(HarnessError, match="manifest.json is not valid JSON"):
        TokenShards.open(d)

    (d / "manifest.json").unlink()
    with pytest.raises(HarnessError, match="manifest.json not found"):
        TokenShards.open(d)


def test_training_ranks_open_without_reading_the_tokens(prepared, tmp_path, monkeypatch):
    """Every rank opens the shards: only the manifest, sizes and endpoints are read, never
    the token data or all of the index (corruption deep inside is found by verify=True,
    which prepare-data runs, and by the batches that touch it)."""
    d = _copy(prepared, tmp_path / "deep")
    tokens = np.memmap(d / "train.bin", np.uint16, mode="r+")
    tokens[-5] = 999  # near the end of the file, far from where any open would look
    tokens.flush()
    del tokens
    idx = np.load(d / "train.idx.npy")
    idx[len(idx) // 2] = idx[len(idx) // 2 + 1]  # a document of zero length, mid-index
    np.save(d / "train.idx.npy", idx)
    scans = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **kw: scans.append(kw.get("mmap_mode")) or
                        real_load(*a, **kw))
    shards = TokenShards.open(d)
    assert scans == ["r", "r"]  # both indexes memory-mapped, not read whole
    assert isinstance(shards.train, np.memmap)
    with pytest.raises(HarnessError, match="train.bin: token id 999"):
        TokenShards.open(d, verify=True)
    tokens = np.memmap(d / "train.bin", np.uint16, mode="r+")
    tokens[-5] = 1
    tokens.flush()
    del tokens
    with pytest.raises(HarnessError, match="train.idx.npy: not .* increasing offsets"):
        TokenShards.open(d, verify=True)
    # prepare-data finds the damage when it checks whether out_dir is up to date
    with pytest.raises(HarnessError, match="train.idx.npy: not .* increasing offsets"):
        data_out_dir.up_to_date(d, TokenShards.open(d).manifest["inputs_sha256"])


def test_workers_give_the_same_tokens(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "PARALLEL_MIN_BYTES", 0)
    one = TokenShards.open(prep.prepare_data(_cfg(corpus, tmp_path / "w1", num_workers=1), False))
    two = TokenShards.open(prep.prepare_data(_cfg(corpus, tmp_path / "w2", num_workers=2), False))
    assert one.fingerprint == two.fingerprint
    assert np.array_equal(one.train, two.train) and np.array_equal(one.val, two.val)


def test_a_tokenizer_worker_that_dies_is_one_error_not_a_hang(prepared):
    """SIGKILL to the workers mid-corpus (the OOM killer): multiprocessing.Pool would start new
    ones and wait forever for the lost chunks; prepare-data stops with one line."""
    import multiprocessing
    import signal

    def docs():
        for i in range(100_000):
            if i == 5 * prep.ENCODE_CHUNK_DOCS:  # the workers start with the first task
                for child in multiprocessing.active_children():
                    os.kill(child.pid, signal.SIGKILL)
            yield f"document {i}", 12

    tokenizer = Tokenizer(prepared / "tokenizer.model")
    with pytest.raises(HarnessError, match="a tokenizer worker died .* run it again"):
        with prep._encoder(tokenizer, 1234, 2) as encode:
            for _ in encode(docs()):
                pass


def test_given_tokenizer_is_reused(prepared, corpus, tmp_path):
    model = str(prepared / "tokenizer.model")
    reused = TokenShards.open(prep.prepare_data(
        _cfg(corpus, tmp_path / "r", tokenizer_model=model), progress=False))
    assert np.array_equal(reused.train, TokenShards.open(prepared).train)
    with pytest.raises(HarnessError, match="data.tokenizer_model: .*prose.txt is not a sentence"):
        prep.prepare_data(_cfg(corpus, tmp_path / "x", tokenizer_model=str(corpus / "prose.txt")),
                          progress=False)


def test_max_bytes_keeps_a_prefix_of_documents(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": f"line {i}"}) + "\n" for i in range(10)))
    line = len(json.dumps({"body": "line 0"})) + 1
    (source,) = scan_sources([str(rows)], max_bytes=int(3.5 * line))
    assert (source.documents, source.bytes_used, source.size) == (3, 3 * line, 10 * line)
    assert [t for t, _ in iter_documents([source], "body")] == ["line 0", "line 1", "line 2"]


def test_crash_while_writing_leaves_out_dir_untouched(corpus, tmp_path, monkeypatch):
    def boom(doc):
        raise RuntimeError("simulated crash")

    out = tmp_path / "out"
    out.mkdir()  # an empty out_dir may be filled, but only by a complete result
    monkeypatch.setattr(prep, "_encode", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        prep.prepare_data(_cfg(corpus, out), progress=False)
    assert not list(out.iterdir())
    # beside it only the work directory a rerun resumes from (tests/data/test_resume_prep.py):
    # no temp directory, and no slice of the crashed writer left where a rerun would read it
    (work,) = [p for p in tmp_path.iterdir() if p != out]
    assert work.name.startswith(".out.work-")
    assert sorted(p.name for p in work.iterdir()) == ["plan.json", "tokenizer.model"]


# ---- what the trainer checks, and faults around the files -----------------------------------
def test_fifo_socket_and_dead_link_in_a_source_directory_are_skipped(tmp_path, caplog):
    import signal
    import socket

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("some text\n" * 50)
    os.mkfifo(src / "pipe")  # opening it for reading would wait for a writer for ever
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "sock"))
    os.symlink("nowhere", src / "dead")
    signal.alarm(60)  # a regression hangs on the FIFO: fail instead
    try:
        with caplog.at_level("WARNING", logger="harness"):
            sources = scan_sources([str(src)])
        assert [Path(s.path).name for s in sources] == ["a.txt"]
        assert {"pipe", "sock", "dead"} <= {Path(r.args[0]).name for r in caplog.records}
        with pytest.raises(HarnessError, match=r"pipe is a FIFO, not a file or a directory"):
            scan_sources([str(src / "pipe")])
    finally:
        signal.alarm(0)


def test_stale_temp_dirs_of_killed_runs_are_removed(tmp_path):
    import subprocess
    import sys
    import time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = data_out_dir.owner_tag().partition("@")[2]
    out = tmp_path / "shards"
    made = {}
    old = 2 * data_out_dir.STALE_AFTER_S
    for key, owner, age in [("dead", f"{dead.pid}@{host}", 0), ("live", f"{os.getpid()}@{host}", 0),
                            ("elsewhere", "1@node-7", 0), ("old", "1@node-7", old),
                            ("legacy", "", old)]:
        d = tmp_path / f".shards{data_out_dir.TMP_INFIX}{key:0>12}" if not owner else \
            tmp_path / f".shards{data_out_dir.TMP_INFIX}{key:0>12}-{owner}"
        (d / "train.bin").parent.mkdir()
        (d / "train.bin").write_bytes(b"\0" * 8)
        if age:
            then = time.time() - age
            os.utime(d / "train.bin", (then, then))
            os.utime(d, (then, then))
        made[key] = d
    (tmp_path / ".other.tmp-000000000000-1@x").mkdir()  # another out_dir's: not looked at
    data_out_dir.clean_stale_temp_dirs(out)
    assert {k for k, d in made.items() if d.exists()} == {"live", "elsewhere"}
    assert (tmp_path / ".other.tmp-000000000000-1@x").exists()


def _words_cfg(tmp_path, **kw) -> DataConfig:
    text = tmp_path / "words.txt"
    if not text.exists():
        text.write_text("".join(f"word{i % 97} line{i % 13}\n" for i in range(5000)))
    return DataConfig(**{"sources": [str(text)], "out_dir": str(tmp_path / "shards"),
                         "vocab_size": 300, "val_fraction": 0.0, **kw})


def test_train_check_reads_no_source_while_the_files_look_the_same(tmp_path, monkeypatch):
    """The trainer trusts the manifest and stats a bounded sample; reading the sources to
    compare them by content is prepare-data's job (moved there from the trainer's rank 0:
    issue 30 item 1): touched files are refused by the trainer until prepare-data has found
    them equal and recorded them; other bytes are refused by both."""
    cfg = _words_cfg(tmp_path)
    out = prep.prepare_data(cfg, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources_given"] == [str(tmp_path / "words.txt")]
    real_open = io.open

    def no_source(file, *a, **kw):
        assert "words.txt" not in str(file), "read the sources"
        return real_open(file, *a, **kw)

    monkeypatch.setattr(io, "open", no_source)  # Path.open and read_bytes go through it
    monkeypatch.setattr(builtins, "open", no_source)
    data_out_dir.check_prepared_from(cfg, out)  # paths, sizes and times as recorded: no reading
    monkeypatch.undo()
    # the same bytes touched (a copy, a checkout): the trainer refuses without reading,
    # prepare-data reads them once, finds them equal and remembers; then the trainer goes on
    os.utime(tmp_path / "words.txt", (1, 1))
    with pytest.raises(HarnessError, match=r"words.txt\] changed since .* \(size or time\): run "
                                           r"`harness prepare-data` with the same config"):
        data_out_dir.check_prepared_from(cfg, out)
    reads = []
    real_scan = prep.scan_sources
    monkeypatch.setattr(prep, "scan_sources", lambda *a, **kw: reads.append(1) or
                        real_scan(*a, **kw))
    prep.prepare_data(cfg, progress=False)
    data_out_dir.check_prepared_from(cfg, out)
    data_out_dir.check_prepared_from(cfg, out)
    assert reads == [1]
    after = json.loads((out / "manifest.json").read_text())
    assert after.pop("stat_sample") != manifest.pop("stat_sample") and after == manifest
    # other bytes: refused by the trainer (sizes differ) and by prepare-data, which names
    # the files and both ways out
    (tmp_path / "words.txt").write_text("other text\n" * 3000)
    with pytest.raises(HarnessError, match=r"words.txt\] changed since .* \(size or time\)"):
        data_out_dir.check_prepared_from(cfg, out)
    with pytest.raises(HarnessError, match=r"files of data.sources=.*words.txt\] changed since "
                                           r"data.out_dir=.* was prepared .*prepare-data"):
        prep.prepare_data(cfg, progress=False)


def test_train_check_names_both_sources_and_settings(tmp_path):
    cfg = _words_cfg(tmp_path)
    out = prep.prepare_data(cfg, progress=False)
    other = tmp_path / "other.txt"
    other.write_text("x y z\n" * 100)
    with pytest.raises(HarnessError) as err:
        data_out_dir.check_prepared_from(_words_cfg(tmp_path, sources=[str(other)]), out)
    msg = str(err.value)
    assert f"data.sources=[{other}]" in msg and "words.txt" in msg and "prepare-data" in msg
    with pytest.raises(HarnessError, match=r"data.vocab_size=400 but .* prepared with "
                                           r"data.vocab_size=300: .*set data.vocab_size=300"):
        data_out_dir.check_prepared_from(_words_cfg(tmp_path, vocab_size=400), out,
                                         read_sources=False)
    # no data.sources: the shards of a corpus prepared before are trained on as they are
    # (docs/data.md: `prepare-data data.sources=... data.out_dir=D`, then `train data.out_dir=D`)
    data_out_dir.check_prepared_from(DataConfig(out_dir=str(out), vocab_size=512), out)


def test_builtin_shards_must_have_the_configured_tokenizer(tmp_path):
    out = tmp_path / "stdlib"
    prep.prepare_data(DataConfig(out_dir=str(out), max_bytes=100_000, vocab_size=512), False)
    data_out_dir.check_prepared_from(DataConfig(out_dir=str(out), max_bytes=4_000_000),
                                     out)  # cap: ok
    with pytest.raises(HarnessError, match="data.tokenizer_type=unigram but"):
        data_out_dir.check_prepared_from(DataConfig(out_dir=str(out), tokenizer_type="unigram"),
                                         out)


def test_a_shard_cut_under_a_running_reader_is_an_error_not_sigbus(prepared, tmp_path):
    d = _copy(prepared, tmp_path / "cut")
    seqs = TokenShards.open(d).sequences("train", 16)
    seqs.batch([0, 1])
    size = (d / "train.bin").stat().st_size
    os.truncate(d / "train.bin", size // 4)  # reading the far pages now would raise SIGBUS
    with pytest.raises(HarnessError, match=r"train.bin: \d+ bytes, \d+ when this run opened it: "
                                           r"it was cut while training read it"):
        seqs.batch([len(seqs) - 1])
