"""`harness prepare-data`: corpus -> tokenizer -> token shards, written atomically.

The corpus is tokenized in slices that survive a kill (slices.py: a rerun resumes from the
completed ones), then the output is assembled in a temp directory beside `out_dir` and
renamed into place, so a crash never leaves a half-written `out_dir`. An existing `out_dir` is
reused when it was prepared from the same inputs and settings, and is never overwritten when
it was not.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import shutil
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from harness.common import lease
from harness.common.durable import fsync_path
from harness.common.errors import HarnessError
from harness.config.data import DataConfig
from harness.data.cores import available_cores
from harness.data.corpus import Source, iter_documents, scan_sources, skipped_summary, source_files
from harness.data.out_dir import (TMP_INFIX, absolute, builtin_slice, check_out_dir,
                                  check_toy_corpus, clean_stale_temp_dirs, mismatch_error,
                                  owner_tag, prep_settings, record_sources_checked, sha256,
                                  source_keys, stat_sample, unwritable, up_to_date)
from harness.data.shards import TOKENIZER_FILE, ShardWriter, TokenShards, token_dtype
from harness.data.slices import Work, remove_other_work, work_dir
from harness.data.source_list import SOURCES_FILE, source_summary, write_source_list
from harness.data.tokenizer import Tokenizer, train_tokenizer
from harness.data.val_split import MIN_HELD_OUT_DOCUMENTS, doc_hash, one_each_side, threshold

log = logging.getLogger("harness")

# manifest["val_split"] when the validation split is the tail of each document (a small corpus)
TOKEN_SPLIT = "tokens"
# below this, starting workers (each imports numpy and sentencepiece) costs more than it saves
PARALLEL_MIN_BYTES = 8 << 20
# a task for a tokenizer worker: documents up to this much text, or this many; 8 documents
# per task cost the parent a third of the CPU on short documents (bench/bench_prepare.py)
ENCODE_CHUNK_BYTES, ENCODE_CHUNK_DOCS = 1 << 20, 1024
OTHER = {"train": "val", "val": "train"}


def prepare_data(cfg: DataConfig, progress: bool = True) -> Path:
    """Prepare `cfg.out_dir` (a no-op when it is up to date) and return it."""
    return _prepare(cfg, progress)[0]


def main(cfg: DataConfig) -> int:
    start = time.perf_counter()
    # no progress bar into a log file (a Slurm batch script runs this before its job step)
    out_dir, built = _prepare(cfg, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    m = TokenShards.open(out_dir).manifest
    train, val = m["splits"]["train"], m["splits"]["val"]
    summary = source_summary(m)
    docs = summary["documents"]
    # the built-in corpus's skipped files are a few empty __init__.py: not news
    skipped = _skipped(out_dir, summary) if m.get("sources_given") else ""
    held = (" (the last tokens of each document: a small corpus)"
            if m.get("val_split") == TOKEN_SPLIT else "")
    counts = (f"{train['tokens']:,} train + {val['tokens']:,} val tokens{held}, "
              f"{docs:,} document{'s' * (docs != 1)}{skipped}, "
              f"vocab {m['vocab_size']}")
    if built:
        mb = m["source_bytes"] / 1e6
        print(f"prepared {out_dir}: {counts}; {mb:.1f} MB in {seconds:.1f} s "
              f"({mb / seconds:.1f} MB/s); fingerprint {m['fingerprint'][:12]}")
    else:
        print(f"{out_dir} is up to date: {counts}; fingerprint {m['fingerprint'][:12]}")
    return 0


def _skipped(out_dir: Path, summary: dict) -> str:
    """' (skipped 7 files: 5 empty, 2 not UTF-8 text; listed in OUT/sources.jsonl)', or ''."""
    counts = summary.get("skipped") or {}
    total = sum(counts.values())
    if not total:
        return ""
    reasons = ", ".join(f"{n} {reason}" for reason, n in counts.items())
    return (f" (skipped {total} file{'s' * (total != 1)}: {reasons}; listed in "
            f"{out_dir / summary.get('file', SOURCES_FILE)})")


@dataclass
class Scan:
    """What a preparation of a config reads before it writes anything: its sources, scanned
    and hashed (`inputs`: the work directory's and the manifest's key)."""
    cfg: DataConfig
    out_dir: Path
    given: Tokenizer | None
    settings: dict
    sample: list
    skipped: dict
    sources: list[Source]
    inputs: str

    def up_to_date(self) -> bool:
        """out_dir holds intact shards of these inputs (raises when it holds others)."""
        return up_to_date(self.out_dir, self.inputs,
                          lambda m: mismatch_error(self.cfg, self.out_dir, m, self.settings))


def scan(cfg: DataConfig) -> Scan | None:
    """The sources of cfg, scanned; None when out_dir holds the built-in corpus's shards with
    these settings (taken as they are)."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir)
    check_toy_corpus(cfg, out_dir)
    given = Tokenizer(cfg.tokenizer_model) if cfg.tokenizer_model else None
    settings = prep_settings(cfg, given)
    if builtin_slice(cfg, out_dir, settings):
        return None
    files = source_files(cfg.sources)
    # what the trainer will stat, taken before reading: a file edited meanwhile shows
    sample = stat_sample(cfg.sources, files)
    skipped: dict[str, list[str]] = {}
    sources = scan_sources(cfg.sources, cfg.max_bytes, files, skipped,
                           text_field=cfg.jsonl_text_field)
    if skipped:  # news in the user's corpus; in the built-in one, a few empty __init__.py
        (log.warning if cfg.sources else log.debug)(skipped_summary(skipped))
    inputs = sha256({"settings": settings, "sources": source_keys(sources)})
    return Scan(cfg, out_dir, given, settings, sample, skipped, sources, inputs)


def _prepare(cfg: DataConfig, progress: bool) -> tuple[Path, bool]:
    """(out_dir, whether it was built now)."""
    found = scan(cfg)
    if found is None:
        return Path(cfg.out_dir), False
    out_dir = found.out_dir
    if out_dir.parent.is_dir():
        clean_stale_temp_dirs(out_dir)
    if found.up_to_date():
        record_sources_checked(out_dir, found.sample, cfg.sources)
        remove_other_work(out_dir)
        return out_dir, False
    held = take_lease(out_dir)  # one preparer at a time
    try:
        # prepared by another preparer between our check and our lease: nothing to do
        if found.up_to_date():
            record_sources_checked(out_dir, found.sample, cfg.sources)
            return out_dir, False
        _build_out_dir(cfg, out_dir, found.sources, found.skipped, found.given,
                       found.settings, found.inputs, progress, found.sample)
        return out_dir, True
    finally:
        held.release()


def take_lease(out_dir: Path) -> lease.Lease:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return lease.take(*_lease_args(out_dir))
    except OSError as e:
        raise unwritable(out_dir, out_dir.parent, e) from None


def _build_out_dir(cfg: DataConfig, out_dir: Path, sources: list[Source], skipped: dict,
                   given, settings: dict, inputs: str, progress: bool, sample: list) -> None:
    """Tokenize the slices not done yet (slices.py), assemble the shards in a temp directory
    beside out_dir, then rename it into place and drop the slices."""
    work_path = work_dir(out_dir, inputs)
    remove_other_work(out_dir, work_path)
    tmp = out_dir.parent / f".{out_dir.name}{TMP_INFIX}{uuid.uuid4().hex[:12]}-{owner_tag()}"
    try:
        work = Work(work_path, sources)
        tmp.mkdir()  # not mkdtemp: its mode 0700 would survive the rename
    except OSError as e:
        raise unwritable(out_dir, out_dir.parent, e) from None
    try:
        _build(cfg, sources, skipped, given, settings, inputs, work, tmp, progress, sample)
        # flushed before the rename, which could otherwise persist before the data
        for path in tmp.iterdir():
            fsync_path(path)
        try:
            tmp.rename(out_dir)  # atomic; replaces only a missing or empty out_dir
        except OSError as e:
            # another process may have just made it
            if not up_to_date(out_dir, inputs, lambda m: mismatch_error(cfg, out_dir, m, settings)):
                raise unwritable(out_dir, out_dir.parent, e) from None
        fsync_path(out_dir.parent)  # the rename itself, on disk
        work.remove()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- where the shards go -----------------------------------------------------------------
def _lease_args(out_dir: Path) -> tuple[Path, str, Path, str]:
    """The lease lies beside out_dir, not in it: out_dir is made by renaming a complete temp
    directory onto it, which only an absent or empty out_dir allows."""
    record = out_dir.parent / f".{out_dir.name}{lease.RUN_LEASE}"
    return (record, "data.out_dir", out_dir,
            "prepare into another data.out_dir (or run again once it is done: it will find "
            "the shards ready)")


def _build(cfg: DataConfig, sources: list[Source], skipped: dict, given: Tokenizer | None,
           settings: dict, inputs: str, work: Work, tmp: Path, progress: bool,
           sample: list) -> None:
    total = sum(s.bytes_used for s in sources)
    by_tokens = split_by_tokens(cfg, sources)
    tokenizer = work_tokenizer(cfg, sources, given, work)
    tokenize_slices(cfg, sources, work, tokenizer, by_tokens, progress)
    shutil.copyfile(tokenizer.path, tmp / TOKENIZER_FILE)
    dtype = token_dtype(tokenizer.vocab_size)
    moved = None if by_tokens or cfg.val_fraction == 0 else _one_each_side(work)
    with ShardWriter(tmp, Tokenizer(tmp / TOKENIZER_FILE)) as writer:
        for k in range(len(work.slices)):
            for split, i, tokens in work.documents(k, dtype):
                writer.add(OTHER[split] if (k, split, i) == moved else split, tokens)
        keys = source_keys(sources)
        fingerprint = sha256({"tokenizer_sha256": tokenizer.sha256, "settings": settings,
                              "sources": keys})
        summary = write_source_list(tmp, sources, skipped, sha256(keys))
        writer.finish(fingerprint=fingerprint, inputs_sha256=inputs, settings=settings,
                      source_bytes=total, sources=summary,
                      sources_given=absolute(cfg.sources), max_bytes=cfg.max_bytes,
                      stat_sample=sample,
                      val_split=TOKEN_SPLIT if by_tokens else "documents")


def split_by_tokens(cfg: DataConfig, sources: list[Source]) -> bool:
    """A small corpus has each document's tokens split (_pieces), any other its documents."""
    documents = sum(s.documents for s in sources)
    return 0 < cfg.val_fraction and documents * cfg.val_fraction < MIN_HELD_OUT_DOCUMENTS


def work_tokenizer(cfg: DataConfig, sources: list[Source], given: Tokenizer | None,
                   work: Work) -> Tokenizer:
    """The work directory's tokenizer: data.tokenizer_model's copy, or trained once."""
    if given:
        return work.tokenizer(lambda path: shutil.copyfile(given.path, path) and Tokenizer(path))
    total = sum(s.bytes_used for s in sources)
    texts = (text for text, _ in iter_documents(sources, cfg.jsonl_text_field))
    return work.tokenizer(lambda path: train_tokenizer(
        texts, path, cfg.tokenizer_type, cfg.vocab_size, total, cfg.tokenizer_threads))


def _one_each_side(work: Work) -> tuple[int, str, int] | None:
    """(slice, split, index) of the document that moves so that both splits have one."""
    counts = {s: sum(work.counts(k)[s] for k in range(len(work.slices))) for s in OTHER}

    def extreme(split: str, pick) -> tuple[int, str, int]:
        found = []  # (hash, slice, index) of each slice's extreme
        for k in range(len(work.slices)):
            hashes = work.hashes(k, split)
            if len(hashes):
                i = int(hashes.argmin() if pick is min else hashes.argmax())
                found.append((int(hashes[i]), k, i))
        _, k, i = pick(found)
        return k, split, i

    return one_each_side(counts, lambda: extreme("train", min), lambda: extreme("val", max))


def tokenize_slices(cfg: DataConfig, sources: list[Source], work: Work, tokenizer: Tokenizer,
                    by_tokens: bool, progress: bool, mine: list[int] | None = None) -> list[int]:
    """Each slice not done yet (of `mine`; None: all), in order, through one pool of workers;
    returns those it tokenized."""
    dtype = token_dtype(tokenizer.vocab_size)
    mine = list(range(len(work.slices))) if mine is None else mine
    todo = [k for k in mine if not work.done(k, tokenizer, dtype)]
    if len(todo) < len(mine):
        log.info("prepare-data: resuming with %d of %d slices already tokenized",
                 len(mine) - len(todo), len(mine))
    if not todo:
        return todo
    total = sum(s.bytes_used for a, b in (work.slices[k] for k in mine) for s in sources[a:b])
    left = [sources[a:b] for a, b in (work.slices[k] for k in todo)]
    cut = threshold(cfg.val_fraction)
    with _encoder(tokenizer, cfg.seed, _num_workers(cfg, total)) as encode, \
            tqdm(total=total, initial=total - sum(s.bytes_used for part in left for s in part),
                 unit="B", unit_scale=True, desc="tokenize", disable=not progress,
                 leave=False) as bar:
        for k, part in zip(todo, left):
            with work.writer(k, tokenizer, dtype) as writer:
                for tokens, nbytes, h in encode(iter_documents(part, cfg.jsonl_text_field)):
                    for name, piece in _pieces(tokens, None if by_tokens else h < cut,
                                               cfg.val_fraction):
                        writer.add(name, piece, h)
                    bar.update(nbytes)
    return todo


def _num_workers(cfg: DataConfig, total_bytes: int) -> int:
    if total_bytes < PARALLEL_MIN_BYTES:
        return 1
    return cfg.num_workers or available_cores()


def _pieces(tokens: np.ndarray, is_val: bool | None,
            fraction: float) -> list[tuple[str, np.ndarray]]:
    """(split, tokens) for one document. is_val None (a small corpus): the last
    round(n * fraction) tokens (at least 1, at most n - 1) are held out, the rest trained on,
    as nanoGPT splits its one-file Shakespeare: disjoint, and the same at every run. The
    training part has no EOS (the text goes on); the held-out part keeps the document's."""
    if is_val is not None:
        return [("val" if is_val else "train", tokens)]
    n_val = min(len(tokens) - 1, max(1, round(len(tokens) * fraction)))
    cut = len(tokens) - n_val
    return [(name, part) for name, part in (("train", tokens[:cut]), ("val", tokens[cut:]))
            if len(part)]


@contextlib.contextmanager
def _encoder(tokenizer: Tokenizer, seed: int, workers: int) -> Iterator[Callable]:
    """A map from documents to (tokens with EOS, source bytes, val_split hash), in order."""
    init = (str(tokenizer.path), token_dtype(tokenizer.vocab_size).str, seed)
    if workers == 1:
        _init_worker(*init)  # the same code path as the workers, in this process
        yield lambda docs: map(_encode, docs)
        return
    # spawn: forking a parent that may hold torch threads can deadlock the children. An
    # executor, not multiprocessing.Pool: a Pool replaces a worker that died (the OOM killer)
    # and waits forever for its lost chunk; the executor raises BrokenProcessPool
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, ctx, _init_worker, init) as pool:
        yield lambda docs: _in_order(pool, docs, ahead=4 * workers)


def _in_order(pool: ProcessPoolExecutor, docs, ahead: int) -> Iterator[tuple]:
    """pool.map's results, with at most `ahead` chunks of documents in flight (pool.map would
    read the whole corpus before the first result)."""
    pending: collections.deque = collections.deque()
    try:
        for chunk in _chunks(docs):
            pending.append(pool.submit(_encode_chunk, chunk))
            if len(pending) >= ahead:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except BrokenProcessPool:
        raise HarnessError("prepare-data: a tokenizer worker died (killed, or out of memory: "
                           "fewer data.num_workers use less); run it again, it resumes from "
                           "the slices already done") from None


def _chunks(docs) -> Iterator[list[tuple[str, int]]]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += doc[1]
        if size >= ENCODE_CHUNK_BYTES or len(chunk) >= ENCODE_CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_chunk(docs: list[tuple[str, int]]) -> list[tuple[np.ndarray, int, int]]:
    return [_encode(doc) for doc in docs]


_worker: dict = {}  # per process: the tokenizer and token dtype set by _init_worker


def _init_worker(model_path: str, dtype: str, seed: int) -> None:
    _worker["tokenizer"] = Tokenizer(model_path)
    _worker["dtype"] = np.dtype(dtype)
    _worker["seed"] = seed


def _encode(doc: tuple[str, int]) -> tuple[np.ndarray, int, int]:
    text, nbytes = doc
    tokenizer = _worker["tokenizer"]
    tokens = np.array(tokenizer.encode(text) + [tokenizer.eos_id], _worker["dtype"])
    return tokens, nbytes, doc_hash(text, _worker["seed"])


