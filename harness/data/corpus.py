"""Documents from the configured sources: text files, directories, JSONL, or the stdlib.

Two passes: `scan_sources` lists, hashes and counts the documents (the split and the manifest
need the count and hashes before tokenizing); `iter_documents` then yields them in order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from harness.common.errors import HarnessError

log = logging.getLogger("harness")

# not representative source code, or not the standard library itself
# why a file inside a source directory is left out (named explicitly, a non-text file is refused)
SKIP_REASONS = ("empty", "not UTF-8 text")
STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__",
                    "encodings", "pydoc_data"}


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # "text" (the whole file is one document) or "jsonl" (one per line)
    size: int  # bytes in the file
    bytes_used: int  # less than size only where max_bytes cut a JSONL file
    sha256: str  # of the bytes used
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
                 skipped: Optional[dict[str, list[str]]] = None) -> list[Source]:
    """Sources in reading order, stopping where `max_bytes` (0: no cap) is reached;
    `files`: source_files(paths), when the caller has it already; `skipped`, when given,
    receives the files left out by reason (SKIP_REASONS), in reading order."""
    budget = max_bytes if max_bytes > 0 else math.inf
    sources = []
    for path, explicit in (source_files(paths) if files is None else files):
        if path.suffix == ".jsonl":
            source, reason = _scan_jsonl(path, budget), None
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
            data = _read(Path(source.path))
            yield data.decode("utf-8"), len(data)
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


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise HarnessError(f"data.sources: cannot read {path} ({e.strerror or e}); fix its "
                           "permissions or remove it") from None


def _scan_text(path: Path, explicit: bool, budget: float) -> tuple[Source | None, str | None]:
    """(the source or None, why it is left out)."""
    data = _read(path)
    if not _is_text(data):
        if explicit:
            raise HarnessError(f"data.sources: {path} is not UTF-8 text; convert or remove it")
        return None, "not UTF-8 text"  # binary files inside a directory: images, archives
    if not data:
        return None, "empty"
    if len(data) > budget:
        return Source(str(path), "text", len(data), 0, "", 0), None
    digest = hashlib.sha256(data).hexdigest()
    return Source(str(path), "text", len(data), len(data), digest, 1), None


def _is_text(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _scan_jsonl(path: Path, budget: float) -> Source:
    digest, used, docs = hashlib.sha256(), 0, 0
    try:
        with path.open("rb") as f:
            for line in f:
                if used + len(line) > budget:
                    break
                digest.update(line)
                used += len(line)
                docs += bool(line.strip())
    except OSError as e:
        raise HarnessError(f"data.sources: cannot read {path} ({e.strerror or e}); fix its "
                           "permissions or remove it") from None
    return Source(str(path), "jsonl", path.stat().st_size, used, digest.hexdigest(), docs)


def _jsonl_documents(source: Source, text_field: str) -> Iterator[tuple[str, int]]:
    used = 0
    with open(source.path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            used += len(line)
            if used > source.bytes_used:
                return
            if line.strip():
                yield _jsonl_text(line, text_field, f"{source.path}:{lineno}"), len(line)


def _jsonl_text(line: bytes, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise HarnessError(f"{where}: not a JSON line ({e}); fix or remove the line") from None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise HarnessError(f"{where}: no string field {text_field!r}; set data.jsonl_text_field "
                           "to the key that holds the text")
    return text
