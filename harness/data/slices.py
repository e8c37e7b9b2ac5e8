"""Resumable preparation: the corpus is tokenized in slices of whole source files, each into its
own files in a work directory beside data.out_dir, so that a preparation killed mid-way (a
time limit, a node failure, kill -9) resumes from its completed slices rather than from zero.

    .NAME.work-INPUTS/          INPUTS: the first 16 hex digits of the inputs' sha256 (settings
                                and source contents): other inputs never meet these slices
        plan.json               the slices as [first, end) source indexes, fixed at the start
        tokenizer.model         trained once, written by rename: complete or absent
        slice-00000/            a completed slice: {train,val}.bin, {train,val}.len.npy and
        slice-00001/            .hash.npy (each document's token count and val_split hash),
                                meta.json (counts, tokenizer sha256)
        slice-00002.part-PID@HOST/  one being written: renamed to slice-00002 when complete

Nothing half-written is ever read: a slice becomes visible by the rename of its directory,
after its files are fsynced, and a completed slice is checked against its meta.json (sizes,
counts, the tokenizer) before it is used; one that fails is tokenized again. The final
directory is assembled from the slices in order, so an interrupted and an uninterrupted
preparation give the same bytes. One preparer works in a work directory under prepare-data's
lease on data.out_dir, or several parts at once (prepare_part.py: `--part I/N`, a Slurm job
array), each on its own slices, k % N == I, never touching another's. The slices stay until
out_dir is in place, so the tokens need twice their size on disk while the final directory is
assembled.
"""
from __future__ import annotations

import array
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from harness.common.durable import fsync_path, write_atomic
from harness.data.corpus import Source
from harness.data.out_dir import owner_tag
from harness.data.tokenizer import Tokenizer

log = logging.getLogger("harness")

WORK_INFIX = ".work-"
SLICE_BYTES = 128 << 20  # source bytes per slice (at least one whole file): what a kill loses
READ_TOKENS = 1 << 20  # tokens read back at a time when the shards are assembled
PLAN = "plan.json"
TOKENIZER = "tokenizer.model"
META = "meta.json"
SPLITS = ("train", "val")


def work_dir(out_dir: Path, inputs: str) -> Path:
    return out_dir.parent / f".{out_dir.name}{WORK_INFIX}{inputs[:16]}"


def remove_other_work(out_dir: Path, keep: Path | None = None) -> None:
    """Slices of other inputs (sources or settings changed since a preparation was cut
    short) can never be used for out_dir: removed, with a line. Called under the lease, or
    with `keep` None once out_dir is complete (nothing beside it is of use any more: a
    preparation killed between its rename and its clean-up left it)."""
    for other in out_dir.parent.glob(f".{out_dir.name}{WORK_INFIX}*"):
        if other != keep and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
            if keep is None:
                log.info("removed %s, left beside the finished %s", other, out_dir)
            else:
                log.warning("removed %s: the slices of an interrupted prepare-data of other "
                            "sources or settings", other)


def plan_slices(sources: list[Source], slice_bytes: int) -> list[list[int]]:
    """Consecutive sources, cut where a slice reaches slice_bytes: [first, end) pairs."""
    slices, first, size = [], 0, 0
    for i, source in enumerate(sources):
        size += source.bytes_used
        if size >= slice_bytes or i == len(sources) - 1:
            slices.append([first, i + 1])
            first, size = i + 1, 0
    return slices


class Work:
    """The work directory of one preparation (made if missing)."""

    def __init__(self, path: Path, sources: list[Source], slice_bytes: int | None = None,
                 own: Callable[[int], bool] | None = None):
        """`slice_bytes` (SLICE_BYTES when None) cuts the plan when none is written yet; `own`:
        the slices this caller writes, when others write the rest at the same time (a part)."""
        self.path = path
        path.mkdir(exist_ok=True)
        plan = path / PLAN
        if plan.is_file():
            self.slices = json.loads(plan.read_text())["slices"]
        else:
            self.slices = plan_slices(sources, slice_bytes or SLICE_BYTES)
            write_atomic(plan, json.dumps({"slices": self.slices}).encode(), _part(plan))
        for part in path.glob("*.part-*"):  # a writer that was killed
            if own is None or _owned(part.name, own):  # not another part's, maybe alive
                shutil.rmtree(part, ignore_errors=True)

    def tokenizer(self, make: Callable[[Path], Tokenizer]) -> Tokenizer:
        """The work's tokenizer: made by `make(path)` once, then read back."""
        path = self.path / TOKENIZER
        if path.is_file():
            return Tokenizer(path)
        part = _part(self.path / TOKENIZER)
        made = make(part)
        fsync_path(part)
        os.replace(part, path)
        fsync_path(self.path)
        return Tokenizer(path) if made.path != path else made

    def _slice(self, k: int) -> Path:
        return self.path / f"slice-{k:05d}"

    def done(self, k: int, tokenizer: Tokenizer, dtype: np.dtype) -> bool:
        """Whether slice k is complete and intact; a damaged one is removed (and redone)."""
        path = self._slice(k)
        if not path.is_dir():
            return False
        try:
            meta = json.loads((path / META).read_text())
            ok = meta["tokenizer_sha256"] == tokenizer.sha256 and all(
                _intact(path, s, meta["splits"][s], dtype) for s in SPLITS)
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            log.warning("%s is damaged: tokenizing its sources again", path)
            shutil.rmtree(path, ignore_errors=True)
        return ok

    def writer(self, k: int, tokenizer: Tokenizer, dtype: np.dtype) -> SliceWriter:
        return SliceWriter(self._slice(k), tokenizer.sha256, dtype)

    def counts(self, k: int) -> dict[str, int]:
        """Documents per split in slice k."""
        meta = json.loads((self._slice(k) / META).read_text())
        return {s: meta["splits"][s]["documents"] for s in SPLITS}

    def hashes(self, k: int, split: str) -> np.ndarray:
        return np.load(self._slice(k) / f"{split}.hash.npy")

    def documents(self, k: int, dtype: np.dtype) -> Iterator[tuple[str, int, np.ndarray]]:
        """(split, index in the split's part of the slice, tokens) of slice k's documents: its
        training documents in order, then its validation documents."""
        path = self._slice(k)
        for split in SPLITS:
            lengths = np.load(path / f"{split}.len.npy")
            ends = np.cumsum(lengths)
            starts = ends - lengths
            # whole documents, READ_TOKENS at a time: memory bounded by that, not the slice
            with open(path / f"{split}.bin", "rb") as f:
                i = 0
                while i < len(lengths):
                    j = max(i + 1, int(np.searchsorted(ends, starts[i] + READ_TOKENS, "right")))
                    block = np.fromfile(f, dtype, count=int(ends[j - 1] - starts[i]))
                    base = starts[i]
                    for d in range(i, j):
                        yield split, d, block[starts[d] - base:ends[d] - base]
                    i = j

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class SliceWriter:
    """Writes one slice in a .part directory; `with` renames it complete, or removes it when
    the body raised (a kill leaves it: the next Work removes it)."""

    def __init__(self, path: Path, tokenizer_sha256: str, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.part = _part(path)
        shutil.rmtree(self.part, ignore_errors=True)
        self.part.mkdir()
        self.meta = {"tokenizer_sha256": tokenizer_sha256}
        self._files = {s: open(self.part / f"{s}.bin", "wb") for s in SPLITS}
        # 16 bytes per document, where lists of Python ints take ~72
        self._lengths = {s: array.array("q") for s in SPLITS}
        self._hashes = {s: array.array("Q") for s in SPLITS}

    def add(self, split: str, tokens: np.ndarray, doc_hash: int) -> None:
        self._files[split].write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths[split].append(len(tokens))
        self._hashes[split].append(doc_hash)

    def __enter__(self) -> SliceWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for f in self._files.values():
            f.close()
        if exc_type is not None:
            shutil.rmtree(self.part, ignore_errors=True)
            return
        splits = {}
        for s in SPLITS:
            lengths = np.frombuffer(self._lengths[s], np.int64)
            np.save(self.part / f"{s}.len.npy", lengths)
            np.save(self.part / f"{s}.hash.npy", np.frombuffer(self._hashes[s], np.uint64))
            splits[s] = {"tokens": int(lengths.sum()), "documents": len(lengths)}
        (self.part / META).write_text(json.dumps({**self.meta, "splits": splits}) + "\n")
        for child in self.part.iterdir():
            fsync_path(child)
        try:
            os.replace(self.part, self.path)
        except OSError:
            if not self.path.is_dir():
                raise
            # another preparer completed this slice meanwhile: of the same inputs, the same bytes
            shutil.rmtree(self.part, ignore_errors=True)
            return
        fsync_path(self.path.parent)


def _intact(path: Path, split: str, counts: dict, dtype: np.dtype) -> bool:
    lengths = np.load(path / f"{split}.len.npy")
    hashes = np.load(path / f"{split}.hash.npy", mmap_mode="r")
    size = (path / f"{split}.bin").stat().st_size
    return (len(lengths) == len(hashes) == counts["documents"]
            and int(lengths.sum()) == counts["tokens"]
            and size == counts["tokens"] * dtype.itemsize)


def _part(path: Path) -> Path:
    """Where `path` is written before its rename: host and pid, as several nodes may write in
    one work directory (a pid alone is not unique across them)."""
    return path.with_name(f"{path.name}.part-{owner_tag()}")


def _owned(name: str, own: Callable[[int], bool]) -> bool:
    """Whether `name` is the .part of a slice that `own` picks (a plan's or a tokenizer's .part
    is nobody's: a part leaves it)."""
    match = re.fullmatch(r"slice-(\d+)\.part-.*", name)
    return bool(match) and own(int(match[1]))
