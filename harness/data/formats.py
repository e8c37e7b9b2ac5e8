"""How a source file's bytes become documents, one reader per format, each streamed: memory is
bounded by a part, a line or a batch, never by the file.

- text: a file of at most TEXT_PART_BYTES is one document (as it always was); a larger one is
  read in parts of at most that size, each ending at its last blank line (else its last line
  break, else a character boundary), and each part is a document.
- JSON lines: .jsonl, and compressed .jsonl.gz / .json.gz (gzip) or .jsonl.zst / .json.zst
  (zstandard, the `data` extra): one document per non-blank line, its data.jsonl_text_field.
- Parquet (.parquet, pyarrow, the `data` extra): one document per row of the string column
  data.jsonl_text_field, read BATCH_ROWS rows at a time.

A missing optional package, a corrupt file or a missing text column is one HarnessError line
naming the file and the fix.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from harness.common.errors import HarnessError

# a text file larger than this is several documents: bounds the memory of one document's text
# and tokens (~36 B per token as a Python list while encoding: ~80 MB at 8 MiB of text)
TEXT_PART_BYTES = 8 << 20
BATCH_ROWS = 1024  # Parquet rows per batch: ~3 MB of web text
READ_BUFFER = 1 << 20  # Parquet: read column pages through a buffer, not a whole row group
# kind of a file by the end of its name; anything else is a text file
SUFFIX_KINDS = ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl.gz"), (".json.gz", "jsonl.gz"),
                (".jsonl.zst", "jsonl.zst"), (".json.zst", "jsonl.zst"), (".parquet", "parquet"))
LINE_KINDS = ("jsonl", "jsonl.gz", "jsonl.zst")
EXTRA = "pip install 'harness[data]'"


def kind_of(path: Path) -> str:
    for suffix, kind in SUFFIX_KINDS:
        if path.name.endswith(suffix):
            return kind
    return "text"


# ---- text ------------------------------------------------------------------------------------
def text_parts(f: BinaryIO) -> Iterator[bytes]:
    """The stream in parts of at most TEXT_PART_BYTES; a stream that fits is one part."""
    part, buf = TEXT_PART_BYTES, b""
    while True:
        buf += f.read(part + 1 - len(buf))
        if len(buf) <= part:  # the end of the stream
            if buf:
                yield buf
            return
        cut = _cut(buf, part)
        yield buf[:cut]
        buf = buf[cut:]


def _cut(buf: bytes, part: int) -> int:
    """Where a part of buf[:part] ends: after its last blank line, else its last line break,
    else before the last character that starts within it (UTF-8 continuation bytes are
    10xxxxxx; a part of invalid UTF-8 is refused anyway)."""
    for sep in (b"\n\n", b"\n"):
        at = buf.rfind(sep, 0, part)
        if at >= 0:
            return at + len(sep)
    cut = part
    while cut > part - 3 and buf[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut


def is_text(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---- JSON lines -------------------------------------------------------------------------------
@contextlib.contextmanager
def open_lines(path: Path, kind: str) -> Iterator[Iterator[bytes]]:
    """The lines of a JSON-lines file, decompressed; a corrupt stream raises HarnessError."""
    with open(path, "rb") as raw:
        if kind == "jsonl":
            yield raw
        elif kind == "jsonl.gz":
            with gzip.GzipFile(fileobj=raw) as f:
                yield _guarded(f, path, "gzip", ())
        else:
            zstd = _import("zstandard", path, "zstd-compressed JSON lines")
            with io.BufferedReader(_ZstdFrames(raw, zstd), READ_BUFFER) as f:
                yield _guarded(f, path, "zstd", (zstd.ZstdError,))


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every frame in a zstd file (Dolma's and the Pile's may hold
    several); a file that ends inside a frame raises (zstandard's stream_reader would just
    stop, losing the documents without a word)."""

    def __init__(self, raw: BinaryIO, zstd):
        self.raw, self.dctx, self.zstd = raw, zstd.ZstdDecompressor(), zstd
        self.frame, self.fed, self.out = self.dctx.decompressobj(), False, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.out:
            chunk = self.raw.read(READ_BUFFER)
            if not chunk:
                if self.fed:
                    raise self.zstd.ZstdError("the file ends inside a frame")
                return 0
            while chunk:
                self.out += self.frame.decompress(chunk)
                self.fed, chunk = True, b""
                if self.frame.eof:  # the next frame starts in what is left
                    chunk = self.frame.unused_data
                    self.frame, self.fed = self.dctx.decompressobj(), False
        n = min(len(buffer), len(self.out))
        buffer[:n] = self.out[:n]
        self.out = self.out[n:]
        return n


def _guarded(f, path: Path, what: str, errors: tuple) -> Iterator[bytes]:
    try:
        yield from f
    except (OSError, EOFError, zlib.error, *errors) as e:
        raise corrupt(path, f"{what}: {e}") from None


def json_text(record, text_field: str, where: str) -> str:
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise HarnessError(f"{where}: no string field {text_field!r}; set data.jsonl_text_field "
                           "to the key that holds the text")
    return text


# ---- Parquet ----------------------------------------------------------------------------------
def parquet_batches(path: Path, column: str) -> Iterator:
    """The text column in batches of BATCH_ROWS rows (pyarrow string arrays), checked: a
    string column with no nulls."""
    pa = _import("pyarrow", path, "Parquet")
    pq = _import("pyarrow.parquet", path, "Parquet")
    try:
        # pages through a buffer: pre-buffering would hold a whole row group's column (~70 MB
        # for FineWeb's, measured 69 MB against 10 MB for a 60 MB row group)
        pf = pq.ParquetFile(path, buffer_size=READ_BUFFER, pre_buffer=False)
    except (OSError, pa.ArrowException) as e:
        raise corrupt(path, e) from None
    names = pf.schema_arrow.names
    if column not in names:
        raise HarnessError(f"{path}: no column {column!r} (it has {', '.join(names)}); set "
                           "data.jsonl_text_field to the column that holds the text")
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise HarnessError(f"{path}: column {column!r} is {kind}, not text; set "
                           "data.jsonl_text_field to the column that holds the text")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[column]):
            array = batch.column(0)
            if array.null_count:
                first = row + int(np.flatnonzero(array.is_null().to_numpy(False))[0])
                raise HarnessError(f"{path}: row {first} has no {column!r} (null); drop "
                                   "such rows or remove the file")
            row += len(array)
            yield array
    except (OSError, pa.ArrowException) as e:
        raise corrupt(path, e) from None


def string_offsets(array) -> np.ndarray:
    """The len + 1 byte offsets of a pyarrow string array's values in its data buffer."""
    width = np.int64 if array.type.id == _large_string_id() else np.int32
    offsets = np.frombuffer(array.buffers()[1], width)
    return offsets[array.offset:array.offset + len(array) + 1].astype(np.int64)


def string_data(array, offsets: np.ndarray) -> memoryview:
    """The UTF-8 bytes of all the values, concatenated."""
    data = array.buffers()[2]
    if data is None:  # all values empty
        return memoryview(b"")
    return memoryview(data)[offsets[0]:offsets[-1]]


class TextDigest:
    """sha256 over documents' UTF-8 bytes and their lengths (so that the same texts give the
    same digest however they are batched, compressed or laid out in the file)."""

    def __init__(self):
        self.lengths, self.data = hashlib.sha256(), hashlib.sha256()

    def update(self, lengths: np.ndarray, data) -> None:
        self.lengths.update(lengths.astype("<i8").tobytes())
        self.data.update(data)

    def hexdigest(self) -> str:
        return hashlib.sha256(self.lengths.digest() + self.data.digest()).hexdigest()


def _large_string_id():
    import pyarrow

    return pyarrow.large_string().id


# ---- errors -----------------------------------------------------------------------------------
def corrupt(path: Path, why) -> HarnessError:
    return HarnessError(f"data.sources: cannot read {path} ({why}); it is corrupt or truncated: "
                        "replace or remove it")


def _import(module: str, path: Path, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise HarnessError(f"data.sources: {path} is {what}, which needs the `data` extra: "
                           f"{EXTRA}") from None
