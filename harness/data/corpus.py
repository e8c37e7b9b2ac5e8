"""Documents from the configured sources: text files, JSON lines (plain, gzip, zstd), Parquet,
directories of them, or the stdlib (the formats and their readers: harness/data/formats.py).

Two passes: `scan_sources` lists, hashes and counts the documents (the split and the manifest
need the count and hashes before tokenizing); `iter_documents` then yields them in order. Both
stream every file (a part, a line or a batch at a time).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from harness.common.errors import HarnessError
from harness.data import formats
from harness.data.formats import LINE_KINDS, TextDigest, kind_of

log = logging.getLogger("harness")

# not representative source code, or not the standard library itself
# why a file inside a source directory is left out (named explicitly, a non-text file is refused)
SKIP_REASONS = ("empty", "not UTF-8 text")
STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__",
                    "encodings", "pydoc_data"}


@dataclass(frozen=True)
class Source:
    path: str
    # "text" (one document, or one per part of a file over formats.TEXT_PART_BYTES), "jsonl",
    # "jsonl.gz", "jsonl.zst" (one per line) or "parquet" (one per row)
    kind: str
    # bytes the documents come from: the file's (text, .jsonl), decompressed (.gz, .zst), the
    # text column's UTF-8 (Parquet)
    size: int
    bytes_used: int  # less than size only where max_bytes cut the file
    sha256: str  # of the bytes used (Parquet: of the texts and their lengths, formats.TextDigest)
    documents: int


def source_files(paths: list[str]) -> list[tuple[Path, bool]]:
    """(file, named explicitly) for every file the sources name, in reading order; reads no
    file. Directories are walked in sorted order; what is not a regular file inside them (a
    FIFO would block the reader for ever, a socket or device is no text) is skipped with a
    warning, and refused when named explicitly."""
    return list(_files(paths))


def stat_key(files: list[tuple[Path, bool]], max_bytes: int) -> str:
    """What the files look like without reading them (path, size, modification time): equal
    keys mean the same sources as far as a quick check can tell (make's and rsync's rule)."""
    rows = []
    for path, _ in files:
        try:
            st = path.stat()
        except OSError:
            rows.append([os.path.abspath(path), -1, -1])
            continue
        rows.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"max_bytes": max_bytes, "files": rows}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def scan_sources(paths: list[str], max_bytes: int = 0,
                 files: Optional[list[tuple[Path, bool]]] = None,
                 skipped: Optional[dict[str, list[str]]] = None,
                 text_field: str = "text") -> list[Source]:
    """Sources in reading order, stopping where `max_bytes` (0: no cap) is reached;
    `files`: source_files(paths), when the caller has it already; `skipped`, when given,
    receives the files left out by reason (SKIP_REASONS), in reading order; `text_field`: the
    Parquet column of the text (data.jsonl_text_field), checked here."""
    budget = max_bytes if max_bytes > 0 else math.inf
    sources = []
    for path, explicit in (source_files(paths) if files is None else files):
        kind = kind_of(path)
        if kind in LINE_KINDS:
            source, reason = _scan_jsonl(path, kind, budget), None
        elif kind == "parquet":
            source, reason = _scan_parquet(path, text_field, budget), None
        else:
            source, reason = _scan_text(path, explicit, budget)
        if source is not None and not source.documents and source.bytes_used == source.size:
            reason = "empty"  # a JSONL file of blank lines
        if reason and skipped is not None:
            skipped.setdefault(reason, []).append(str(path))
        if source is None:
            continue
        if source.documents:
            sources.append(source)
        budget -= source.bytes_used
        if source.bytes_used < source.size:
            break  # the cap keeps a prefix of the corpus: stop at the first file it cuts
    if not sum(s.documents for s in sources):
        where = ", ".join(paths) if paths else "the built-in corpus"
        raise HarnessError(f"data.sources: no documents found in {where}; add text files "
                           "or raise data.max_bytes")
    return sources


def skipped_summary(skipped: dict[str, list[str]], most: int = 3) -> str:
    """One line: how many files were left out, why, and the first few names of each reason;
    empty when none was."""
    if not skipped:
        return ""
    parts = []
    for reason in SKIP_REASONS:
        names = skipped.get(reason, [])
        if names:
            more = ", ..." if len(names) > most else ""
            parts.append(f"{len(names)} {reason} ({', '.join(names[:most])}{more})")
    total = sum(len(v) for v in skipped.values())
    return f"data.sources: skipped {total} file{'s' if total > 1 else ''}: {'; '.join(parts)}"


def iter_documents(sources: list[Source], text_field: str) -> Iterator[tuple[str, int]]:
    """(text, source bytes) for every document of `sources`, in order."""
    for source in sources:
        if source.kind == "text":
            yield from _text_documents(source)
        elif source.kind == "parquet":
            yield from _parquet_documents(source, text_field)
        else:
            yield from _jsonl_documents(source, text_field)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(paths: list[str]) -> Iterator[tuple[Path, bool]]:
    """(file, named explicitly) pairs; directories are walked in sorted order."""
    if not paths:
        yield from ((p, False) for p in _walk(stdlib_dir(), STDLIB_SKIP_DIRS) if p.suffix == ".py")
        return
    for raw in paths:  # check them all first: a typo should not wait for the cap
        path = Path(raw).expanduser()
        if not path.exists():
            raise HarnessError(f"data.sources: {raw} does not exist; fix or remove the path")
        if not path.is_dir() and not path.is_file():
            raise HarnessError(f"data.sources: {raw} is {_kind(path)}, not a file or a "
                               "directory: give text or JSONL files, or directories of them")
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            yield from ((p, False) for p in _walk(path, set()))
        else:
            yield path, True


def _walk(root: Path, skip: set[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # sorting in place fixes the order os.walk descends in
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_file():  # follows links; False for FIFOs, sockets, devices, dead links
                yield path
            else:
                log.warning("data.sources: skipping %s: %s, not a regular file", path,
                            _kind(path))


def _kind(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken link" if path.is_symlink() else "unreadable"
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _unreadable(path, e: OSError) -> HarnessError:
    return HarnessError(f"data.sources: cannot read {path} ({e.strerror or e}); fix its "
                        "permissions or remove it")


def _scan_text(path: Path, explicit: bool, budget: float) -> tuple[Source | None, str | None]:
    """(the source or None, why it is left out). Read a part at a time: a file of at most
    formats.TEXT_PART_BYTES is one document, as it always was."""
    digest, used, docs = hashlib.sha256(), 0, 0
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            for part in formats.text_parts(f):
                if not formats.is_text(part):
                    if explicit:
                        raise HarnessError(f"data.sources: {path} is not UTF-8 text; convert "
                                           "or remove it")
                    return None, "not UTF-8 text"  # binary files in a directory: images, ...
                if used + len(part) > budget:
                    break
                digest.update(part)
                used += len(part)
                docs += 1
    except OSError as e:
        raise _unreadable(path, e) from None
    if not size:
        return None, "empty"
    return Source(str(path), "text", size, used, digest.hexdigest() if docs else "", docs), None


def _text_documents(source: Source) -> Iterator[tuple[str, int]]:
    try:
        with open(source.path, "rb") as f:
            for part in itertools.islice(formats.text_parts(f), source.documents):
                yield part.decode("utf-8"), len(part)
    except OSError as e:
        raise _unreadable(source.path, e) from None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise _unreadable(path, e) from None


def _scan_jsonl(path: Path, kind: str, budget: float) -> Source:
    digest, used, docs, size = hashlib.sha256(), 0, 0, 0
    try:
        with formats.open_lines(path, kind) as lines:
            for line in lines:
                if used + len(line) > budget:
                    if kind == "jsonl":
                        break
                    size += len(line)  # decompressed: count the rest for `size`
                    budget = -1
                    continue
                digest.update(line)
                used += len(line)
                docs += bool(line.strip())
        size = path.stat().st_size if kind == "jsonl" else used + size
    except OSError as e:
        raise _unreadable(path, e) from None
    return Source(str(path), kind, size, used, digest.hexdigest(), docs)


def _jsonl_documents(source: Source, text_field: str) -> Iterator[tuple[str, int]]:
    used = 0
    try:
        with formats.open_lines(Path(source.path), source.kind) as lines:
            for lineno, line in enumerate(lines, 1):
                used += len(line)
                if used > source.bytes_used:
                    return
                if line.strip():
                    yield _jsonl_text(line, text_field, f"{source.path}:{lineno}"), len(line)
    except OSError as e:
        raise _unreadable(source.path, e) from None


def _jsonl_text(line: bytes, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise HarnessError(f"{where}: not a JSON line ({e}); fix or remove the line") from None
    return formats.json_text(record, text_field, where)


def _scan_parquet(path: Path, column: str, budget: float) -> Source:
    """Reads the text column once: its byte count, digest and rows (a null or a corrupt page
    is found here, before any tokenizing)."""
    digest, used, docs, size = TextDigest(), 0, 0, 0
    if _size(path) == 0:  # an empty file, skipped as any other (no Parquet footer to read)
        return Source(str(path), "parquet", 0, 0, digest.hexdigest(), 0)
    for array in formats.parquet_batches(path, column):
        offsets = formats.string_offsets(array)
        lengths = np.diff(offsets)
        size += int(offsets[-1] - offsets[0])
        if budget < 0:
            continue  # cut already: count the rest for `size`
        fits = int(np.searchsorted(np.cumsum(lengths), budget - used, side="right"))
        digest.update(lengths[:fits], formats.string_data(array, offsets[:fits + 1]))
        used += int(lengths[:fits].sum())
        docs += fits
        if fits < len(array):
            budget = -1
    return Source(str(path), "parquet", size, used, digest.hexdigest(), docs)


def _parquet_documents(source: Source, column: str) -> Iterator[tuple[str, int]]:
    left = source.documents
    for array in formats.parquet_batches(Path(source.path), column):
        if left <= 0:
            return
        array = array.slice(0, left)
        left -= len(array)
        lengths = np.diff(formats.string_offsets(array)).tolist()
        yield from zip(array.to_pylist(), lengths)
