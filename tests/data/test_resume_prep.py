"""Preparation resumes from its completed slices (issue 30 item 2): a preparation cut short (an
exception, a damaged slice, a real SIGKILL) and run again finishes with shards byte-identical
to an uninterrupted preparation, tokenizing again only what was not complete, and never
reading a half-written slice. Small corpora cut into slices of a few kB."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.config.data import DataConfig
from harness.data import prepare as prep
from harness.data import slices

SLICE = 3000  # bytes: ~2 files of the corpus below per slice
REAL_ENCODE = prep._encode


def _corpus(root: Path, files: int = 24) -> Path:
    root.mkdir()
    for i in range(files):
        (root / f"doc{i:03d}.txt").write_text(
            "".join(f"line {j} of {i}: w{(i * j) % 41} x{j % 7}\n" for j in range(40 + i)))
    return root


def _cfg(src: Path, out: Path) -> DataConfig:
    return DataConfig(sources=[str(src)], out_dir=str(out), vocab_size=300, val_fraction=0.2)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("c") / "src")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted preparation in one slice: the bytes every other must give."""
    out = prep.prepare_data(_cfg(corpus, tmp_path_factory.mktemp("ref") / "out"), False)
    return _files(out)


def _counting_encode(monkeypatch, fail_after: int | None = None) -> list:
    seen, real = [], REAL_ENCODE

    def encode(doc):
        if fail_after is not None and len(seen) == fail_after:
            raise RuntimeError("simulated crash")
        seen.append(doc[1])
        return real(doc)

    monkeypatch.setattr(prep, "_encode", encode)
    return seen


def _work(out: Path) -> Path:
    (work,) = out.parent.glob(f".{out.name}{slices.WORK_INFIX}*")
    return work


def test_a_crash_resumes_from_the_completed_slices(corpus, reference, tmp_path, monkeypatch,
                                                   caplog):
    monkeypatch.setattr(slices, "SLICE_BYTES", SLICE)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        _counting_encode(monkeypatch, fail_after=11)
        prep.prepare_data(_cfg(corpus, out), progress=False)
    done = sorted(p.name for p in _work(out).glob("slice-*"))
    assert len(done) >= 3 and not (out.exists() and list(out.iterdir()))
    plan = json.loads((_work(out) / "plan.json").read_text())["slices"]  # [first, end) files
    cut = next(first for first, end in plan if first <= 11 < end)  # one document per file
    seen = _counting_encode(monkeypatch)
    with caplog.at_level(logging.INFO, logger="harness"):
        prep.prepare_data(_cfg(corpus, out), progress=False)
    assert _files(out) == reference  # as if never interrupted, and sliced alike or not
    assert len(seen) == 24 - cut  # only the documents of the slice cut and those after
    assert any(f"resuming with {len(done)} of" in r.getMessage() for r in caplog.records)
    assert not list(tmp_path.glob(".out.*"))  # the work directory goes once out_dir is there


def test_half_written_and_damaged_slices_are_never_read(corpus, reference, tmp_path,
                                                         monkeypatch):
    monkeypatch.setattr(slices, "SLICE_BYTES", SLICE)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        _counting_encode(monkeypatch, fail_after=15)
        prep.prepare_data(_cfg(corpus, out), progress=False)
    work = _work(out)
    # a killed writer's part (garbage) and a completed slice cut short on disk
    part = work / "slice-00007.part-1"
    part.mkdir()
    (part / "train.bin").write_bytes(b"\xff" * 64)
    first = work / "slice-00000" / "train.bin"
    first.write_bytes(first.read_bytes()[:-2])
    seen = _counting_encode(monkeypatch)
    prep.prepare_data(_cfg(corpus, out), progress=False)
    assert _files(out) == reference
    assert len(seen) > 24 - 15  # slice 0 again, too


def test_slices_of_other_inputs_are_removed(corpus, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(slices, "SLICE_BYTES", SLICE)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        _counting_encode(monkeypatch, fail_after=5)
        prep.prepare_data(_cfg(corpus, out), progress=False)
    stale = _work(out)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="harness"):
        prep.prepare_data(DataConfig(**{**_cfg(corpus, out).__dict__, "seed": 5}), False)
    assert not stale.exists()
    assert any("interrupted prepare-data of other sources or settings" in r.getMessage()
               for r in caplog.records)


KILLED = """
import sys, time
from harness.config.data import DataConfig
from harness.data import prepare, slices
slices.SLICE_BYTES = {slice}
real = slices.SliceWriter.__exit__
def slow_exit(self, *exc):  # a slow corpus: time to be killed between slices
    real(self, *exc)
    time.sleep(0.15)
slices.SliceWriter.__exit__ = slow_exit
prepare.prepare_data(DataConfig(sources=[{src!r}], out_dir={out!r}, vocab_size=300,
                                val_fraction=0.2), progress=False)
"""


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_bytes(corpus, reference, tmp_path, monkeypatch):
    """A real kill -9 mid-way: the rerun (in this process) resumes and matches the
    uninterrupted preparation byte for byte."""
    out = tmp_path / "out"
    script = KILLED.format(slice=SLICE, src=str(corpus), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        works = list(tmp_path.glob(f".out{slices.WORK_INFIX}*"))
        if works and len(list(works[0].glob("slice-?????"))) >= 3:
            break
        time.sleep(0.02)
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    done = len(list(_work(out).glob("slice-?????")))
    plan = json.loads((_work(out) / "plan.json").read_text())["slices"]
    assert 3 <= done < len(plan) and not out.exists()
    monkeypatch.setattr(slices, "SLICE_BYTES", SLICE)
    seen = _counting_encode(monkeypatch)
    prep.prepare_data(_cfg(corpus, out), progress=False)  # takes over the dead one's lease
    assert _files(out) == reference
    assert 0 < len(seen) < 24


@pytest.mark.parametrize("read_tokens", [1, 700])
def test_assembly_reads_back_in_blocks_alike(corpus, reference, tmp_path, monkeypatch,
                                             read_tokens):
    """Slices are read back a block of whole documents at a time (a document longer than the
    block is read whole): the same bytes as one read."""
    monkeypatch.setattr(slices, "SLICE_BYTES", SLICE)
    monkeypatch.setattr(slices, "READ_TOKENS", read_tokens)
    assert _files(prep.prepare_data(_cfg(corpus, tmp_path / "out"), False)) == reference


def test_a_work_directory_left_beside_finished_shards_goes(corpus, reference, tmp_path,
                                                           monkeypatch):
    """Killed between its rename and its clean-up, a preparation leaves its slices beside
    the finished out_dir: the next prepare-data, finding out_dir up to date, removes them."""
    monkeypatch.setattr(slices.Work, "remove", lambda self: None)  # the kill, at that point
    out = prep.prepare_data(_cfg(corpus, tmp_path / "out"), False)
    assert _work(out).is_dir()
    monkeypatch.undo()
    prep.prepare_data(_cfg(corpus, out), False)
    assert not list(tmp_path.glob(".out.*")) and _files(out) == reference
