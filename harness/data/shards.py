"""Token shards on disk, one directory per prepared corpus:

- `train.bin`, `val.bin`: every document's tokens followed by EOS, concatenated, raw
  uint16 (vocab <= 65536) or uint32, read back as np.memmap;
- `train.idx.npy`, `val.idx.npy`: int64 document boundaries, documents + 1 of them
  (document d is tokens[idx[d]:idx[d + 1]], EOS last);
- `tokenizer.model` and `manifest.json` (counts, dtype, hashes, fingerprint).

Every training rank opens the shards: opening reads the manifest and checks sizes and
endpoints against it (stat and a few bytes), never the token data, which stays memory-mapped.
The full scans (token ids < vocab_size, increasing document offsets) are `verify=True`, run by
`harness prepare-data`; the trainer checks token ids batch by batch instead, on the few
thousand tokens it uses.

Training reads its samples with pread(2) on a descriptor opened with the map (Sequences), not
through the map: a random read then pulls only its own pages into the page cache (a fault in a
map pulls in the whole read-around window, 128 kB to megabytes: 200 random 4 kB samples once
pulled 392 MB with 8 MB readahead), and a file cut shorter under the run gives a short read, an
error naming the file, where a read through the map past the new end kills the process with
SIGBUS. So no stat per batch is needed to find the cut. The maps themselves are advised
MADV_RANDOM (`random_access`, the default) for the other readers that pick scattered samples
(the evaluator's set), and left to the kernel's readahead for whole-split scans.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from array import array
from pathlib import Path
from typing import Sequence

import numpy as np

from harness.common.errors import HarnessError
from harness.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ShardWriter:
    """Appends tokenized documents to the split files of `directory` (a fresh temp dir).

    Memory does not grow with the documents: each split's offsets go to a raw int64 file
    beside it (`.{split}.idx.raw`) through a buffer of OFFSETS_BUFFER, and `finish` turns it
    into the .npy index by writing the header and copying the bytes (8 B per document read
    once). A Python list of offsets took ~48 B per document at its peak: 48 GB for 1e9."""

    OFFSETS_BUFFER = 8192  # int64 offsets held per split before they are written (64 kB)

    def __init__(self, directory: Path, tokenizer: Tokenizer):
        self.directory = directory
        self.tokenizer = tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self._files = {s: open(directory / f"{s}.bin", "wb") for s in SPLITS}
        self._raw = {s: open(self._raw_path(s), "wb") for s in SPLITS}
        self._pending = {s: array("q", [0]) for s in SPLITS}  # offsets not yet written
        self._tokens = {s: 0 for s in SPLITS}
        self._documents = {s: 0 for s in SPLITS}

    def _raw_path(self, split: str) -> Path:
        return self.directory / f".{split}.idx.raw"

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        for f in [*self._files.values(), *self._raw.values()]:
            f.close()

    def add(self, split: str, tokens: np.ndarray) -> None:
        """`tokens`: one document, EOS included."""
        self._files[split].write(tokens.astype(self.dtype, copy=False).tobytes())
        self._tokens[split] += len(tokens)
        self._documents[split] += 1
        pending = self._pending[split]
        pending.append(self._tokens[split])
        if len(pending) >= self.OFFSETS_BUFFER:
            self._flush(split)

    def _flush(self, split: str) -> None:
        self._raw[split].write(self._pending[split].tobytes())
        self._pending[split] = array("q")

    def _write_index(self, split: str) -> None:
        """{split}.idx.npy from the raw offsets: an .npy header, then the int64 bytes."""
        count = self._documents[split] + 1
        with open(self.directory / f"{split}.idx.npy", "wb") as out, \
                open(self._raw_path(split), "rb") as raw:
            np.lib.format.write_array_header_1_0(
                out, {"descr": np.dtype(np.int64).str, "fortran_order": False, "shape": (count,)})
            shutil.copyfileobj(raw, out, 1 << 20)
        self._raw_path(split).unlink()

    def finish(self, **extra) -> dict:
        """Close the files, write the indexes and the manifest (with `extra` keys); return it."""
        for s in SPLITS:
            self._flush(s)
        self.__exit__()
        splits = {}
        for s in SPLITS:
            self._write_index(s)
            splits[s] = {"file": f"{s}.bin", "index": f"{s}.idx.npy",
                         "tokens": self._tokens[s], "documents": self._documents[s]}
        manifest = {"format_version": FORMAT_VERSION, **extra,
                    "tokenizer": {"file": TOKENIZER_FILE, "sha256": self.tokenizer.sha256},
                    "vocab_size": self.tokenizer.vocab_size, "eos_id": self.tokenizer.eos_id,
                    "dtype": self.dtype.name, "splits": splits}
        (self.directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest


class Sequences:
    """Fixed-length samples: sample i is tokens[i*L : i*L + L + 1], inputs plus the shifted
    targets, so consecutive samples share one boundary token.

    With `path` (the file `tokens` maps), samples are read from it with pread: a short read is
    a file cut under the run, an error, never a SIGBUS (module docstring). With `vocab_size`,
    every batch is checked for token ids out of range (a corrupt shard) before it reaches the
    embedding, where a GPU would only report a device-side assert."""

    def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int | None = None,
                 path: Path | None = None):
        self.tokens = tokens
        self.seq_len = seq_len
        self.vocab_size, self.path = vocab_size, path
        self.num_sequences = max(0, (len(tokens) - 1) // seq_len)
        # the file as it is now: replaced later, this descriptor keeps reading the one mapped
        self._file = open(path, "rb", buffering=0) if path is not None and len(tokens) else None

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.num_sequences})")
        start = i * self.seq_len
        if self._file is None:
            return self.tokens[start:start + self.seq_len + 1].astype(np.int64)
        size = self.tokens.dtype.itemsize
        want = (self.seq_len + 1) * size
        got = os.pread(self._file.fileno(), want, start * size)
        if len(got) < want:
            raise _corrupt(self.path, f"{os.fstat(self._file.fileno()).st_size} bytes, "
                                      f"{self.tokens.nbytes} when this run opened it: it was "
                                      "cut while training read it")
        return np.frombuffer(got, self.tokens.dtype).astype(np.int64)

    def batch(self, indices: Sequence[int]) -> np.ndarray:
        """int64 array [len(indices), seq_len + 1]."""
        rows = np.stack([self[int(i)] for i in indices])
        if self.vocab_size is not None and rows.size and int(rows.max()) >= self.vocab_size:
            what = (f"token id {int(rows.max())} >= vocab_size {self.vocab_size} in sequences "
                    f"{[int(i) for i in indices]}")
            raise _corrupt(self.path, what) if self.path else HarnessError(what)
        return rows


class TokenShards:
    """A prepared directory, validated on open: use `TokenShards.open(out_dir)`."""

    def __init__(self, directory: Path, manifest: dict, train: np.ndarray, val: np.ndarray):
        self.directory = directory
        self.manifest = manifest
        self.train = train
        self.val = val
        self.fingerprint: str = manifest["fingerprint"]
        self.vocab_size: int = manifest["vocab_size"]
        self.eos_id: int = manifest["eos_id"]
        self.tokenizer_path = directory / manifest["tokenizer"]["file"]

    @classmethod
    def open(cls, directory: str | Path, verify: bool = False,
             random_access: bool = True) -> TokenShards:
        """Checks against the manifest without reading the token data; `verify` also scans
        every token and offset (one process's job: prepare-data, not each training rank).
        `random_access`: the maps are advised MADV_RANDOM (scattered samples), else left to
        readahead (a scan of a whole split). The manifest's parse is shared with the checks
        that read it before (read_manifest)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        try:
            _check_tokenizer(directory, manifest)
            dtype = np.dtype(manifest["dtype"])
            tokens = {s: _open_split(directory, manifest, s, dtype, verify,
                                     random_access and not verify) for s in SPLITS}
            return cls(directory, manifest, tokens["train"], tokens["val"])
        except (KeyError, TypeError) as e:
            raise HarnessError(f"{directory / MANIFEST} lacks or mistypes {e}; delete "
                               f"{directory} and run `harness prepare-data` again") from None

    def offsets(self, split: str) -> np.ndarray:
        """Document boundaries of `split`: document d is tokens[o[d]:o[d + 1]]."""
        return np.load(self.directory / self.manifest["splits"][split]["index"], mmap_mode="r")

    def sequences(self, split: str, seq_len: int) -> Sequences:
        seqs = Sequences(getattr(self, split), seq_len, self.vocab_size,
                         self.directory / self.manifest["splits"][split]["file"])
        if not seqs.num_sequences:
            raise HarnessError(
                f"{self.directory}: the {split} split has {len(seqs.tokens)} tokens, too few for "
                f"one sequence of {seq_len} + 1; use a shorter sequence or more data "
                "(data.sources, data.val_fraction)")
        return seqs


# the last manifest parsed, by path and file identity: a start reads it in several checks
# (run_dir.check_paths, out_dir.check_prepared_from, TokenShards.open), and a manifest of a
# large corpus is megabytes to gigabytes of JSON; parsed once per process while unchanged
_last_parsed: tuple[str, tuple, dict] | None = None


def read_manifest(directory: Path) -> dict:
    """The manifest of `directory`, checked to be ours. Shared, not copied: read-only (a caller
    that rewrites the manifest parses its own copy, as out_dir.record_sources_checked does)."""
    global _last_parsed
    path = directory / MANIFEST
    try:
        st = path.stat() if path.is_file() else None
    except OSError:
        st = None
    if st is None:
        raise HarnessError(f"{path} not found: {directory} holds no prepared data; run "
                           f"`harness prepare-data` with data.out_dir={directory}")
    where, identity = str(path.absolute()), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if _last_parsed is not None and _last_parsed[:2] == (where, identity):
        return _last_parsed[2]
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())[:100]
        raise HarnessError(f"{path} is not valid JSON ({reason}): run `harness prepare-data` "
                           f"into another data.out_dir") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        # perhaps not ours at all (a web app's manifest.json): nothing here suggests deleting
        raise HarnessError(f"{path} is not a format {FORMAT_VERSION} manifest of token shards: "
                           f"run `harness prepare-data` into another data.out_dir")
    _last_parsed = (where, identity, manifest)
    return manifest


def _corrupt(path: Path, what: str) -> HarnessError:
    return HarnessError(f"{path}: {what}; the file is truncated or corrupt: delete "
                        f"{path.parent} and run `harness prepare-data` again")


def _check_tokenizer(directory: Path, manifest: dict) -> None:
    path = directory / manifest["tokenizer"]["file"]
    if not path.is_file():
        raise HarnessError(f"{path} not found; delete {directory} and run "
                           "`harness prepare-data` again")
    if hashlib.sha256(path.read_bytes()).hexdigest() != manifest["tokenizer"]["sha256"]:
        raise _corrupt(path, "sha256 differs from manifest.json")


def _advise_random(tokens: np.memmap) -> None:
    """MADV_RANDOM on the map: a fault reads its own page, not the read-around window
    (Linux; elsewhere, or on a numpy without the map attribute, nothing changes)."""
    advice, mapped = getattr(mmap, "MADV_RANDOM", None), getattr(tokens, "_mmap", None)
    if advice is not None and mapped is not None:
        mapped.madvise(advice)


def _open_split(directory: Path, manifest: dict, split: str, dtype: np.dtype,
                verify: bool, random_access: bool = False) -> np.ndarray:
    info = manifest["splits"][split]
    path, count = directory / info["file"], info["tokens"]
    size = path.stat().st_size if path.is_file() else -1
    if size != count * dtype.itemsize:
        raise _corrupt(path, f"{size} bytes, manifest.json says {count} tokens of "
                             f"{dtype.itemsize} bytes")
    # an empty file cannot be memory-mapped
    tokens = np.memmap(path, dtype, mode="r") if count else np.zeros(0, dtype)
    if random_access and count:
        _advise_random(tokens)
    if verify and count and int(tokens.max()) >= manifest["vocab_size"]:  # reads every token
        raise _corrupt(path, f"token id {int(tokens.max())} >= vocab_size "
                             f"{manifest['vocab_size']}")
    _check_index(directory / info["index"], count, info["documents"], verify)
    return tokens


def _check_index(path: Path, tokens: int, documents: int, verify: bool) -> None:
    try:
        idx = np.load(path, mmap_mode="r")  # the shape and two values: a few pages
    except (OSError, ValueError) as e:
        raise _corrupt(path, f"unreadable ({e})") from None
    if (idx.shape != (documents + 1,) or idx[0] != 0 or idx[-1] != tokens
            or verify and np.any(np.diff(idx) <= 0)):
        raise _corrupt(path, f"not {documents + 1} increasing offsets from 0 to {tokens}")
