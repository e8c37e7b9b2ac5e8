"""`harness prepare-data`: corpus -> tokenizer -> token shards, written atomically.

The output is built in a temp directory beside `out_dir` and renamed into place, so a crash
never leaves a half-written `out_dir`. An existing `out_dir` is reused when it was prepared
from the same inputs and settings, and is never overwritten when it was not.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from harness.data.config import DataConfig
from harness.data.corpus import (Source, iter_documents, scan_sources, source_files, stat_key,
                                 stdlib_dir)
from harness.data.shards import (FORMAT_VERSION, MANIFEST, TOKENIZER_FILE, ShardWriter,
                                 TokenShards, read_manifest, token_dtype)
from harness.data.tokenizer import Tokenizer, train_tokenizer
from harness import run_lease
from harness.errors import HarnessError

log = logging.getLogger("harness")

# below this, starting workers (each imports numpy and sentencepiece) costs more than it saves
PARALLEL_MIN_BYTES = 8 << 20


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
    counts = (f"{train['tokens']:,} train + {val['tokens']:,} val tokens, "
              f"{train['documents'] + val['documents']:,} documents, vocab {m['vocab_size']}")
    if built:
        mb = m["source_bytes"] / 1e6
        print(f"prepared {out_dir}: {counts}; {mb:.1f} MB in {seconds:.1f} s "
              f"({mb / seconds:.1f} MB/s); fingerprint {m['fingerprint'][:12]}")
    else:
        print(f"{out_dir} is up to date: {counts}; fingerprint {m['fingerprint'][:12]}")
    return 0


def _prepare(cfg: DataConfig, progress: bool) -> tuple[Path, bool]:
    """(out_dir, whether it was built now)."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir)
    files = source_files(cfg.sources)
    quick = stat_key(files, cfg.max_bytes)  # before reading: a file edited meanwhile shows
    sources = scan_sources(cfg.sources, cfg.max_bytes, files)
    given = Tokenizer(cfg.tokenizer_model) if cfg.tokenizer_model else None
    settings = _settings(cfg, given)
    inputs = _sha256({"settings": settings, "sources": _source_keys(sources)})
    if out_dir.parent.is_dir():
        clean_stale_temp_dirs(out_dir)
    if _up_to_date(out_dir, inputs, lambda m: _mismatch(cfg, out_dir, m, settings)):
        _record_quick_key(out_dir, quick)
        return out_dir, False
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        lease = run_lease.take(*_lease_args(out_dir))  # one preparer at a time
    except OSError as e:
        raise _unwritable(out_dir, out_dir.parent, e) from None
    try:
        # prepared by another preparer between our check and our lease: nothing to do
        if _up_to_date(out_dir, inputs, lambda m: _mismatch(cfg, out_dir, m, settings)):
            _record_quick_key(out_dir, quick)
            return out_dir, False
        _build_out_dir(cfg, out_dir, sources, given, settings, inputs, progress, quick)
        return out_dir, True
    finally:
        lease.release()


def _build_out_dir(cfg: DataConfig, out_dir: Path, sources: list[Source], given, settings: dict,
                   inputs: str, progress: bool, quick: str) -> None:
    """Build the shards in a temp directory beside out_dir, then rename it into place."""
    tmp = out_dir.parent / f".{out_dir.name}{TMP_INFIX}{uuid.uuid4().hex[:12]}-{_owner()}"
    try:
        tmp.mkdir()  # not mkdtemp: its mode 0700 would survive the rename
    except OSError as e:
        raise _unwritable(out_dir, out_dir.parent, e) from None
    try:
        _build(cfg, sources, given, settings, inputs, tmp, progress, quick)
        _fsync_files(tmp)
        try:
            tmp.rename(out_dir)  # atomic; replaces only a missing or empty out_dir
        except OSError as e:
            # another process may have just made it
            if not _up_to_date(out_dir, inputs, lambda m: _mismatch(cfg, out_dir, m, settings)):
                raise _unwritable(out_dir, out_dir.parent, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- where the shards go -----------------------------------------------------------------
def _lease_args(out_dir: Path) -> tuple[Path, str, Path, str]:
    """The lease lies beside out_dir, not in it: out_dir is made by renaming a complete temp
    directory onto it, which only an absent or empty out_dir allows."""
    record = out_dir.parent / f".{out_dir.name}{run_lease.RUN_LEASE}"
    return (record, "data.out_dir", out_dir,
            "prepare into another data.out_dir (or run again once it is done: it will find "
            "the shards ready)")


TMP_INFIX = ".tmp-"  # .NAME.tmp-HEX-PID@HOST beside out_dir, renamed to out_dir when complete
# a temp directory of another host is only known dead when nothing in it changed for this long
# (tokenizing writes continuously; training the tokenizer on its sample takes minutes)
STALE_AFTER_S = 24 * 3600


def check_out_dir(out_dir: Path, contents: bool = False) -> None:
    """data.out_dir must be a directory or a path that can become one (never a file); with
    `contents`, one that holds shards (a manifest), or nothing yet."""
    if out_dir.exists() and not out_dir.is_dir():
        raise HarnessError(f"data.out_dir={out_dir} is a file, not a directory: choose another "
                           "data.out_dir (a new or empty directory)")
    above = out_dir.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise HarnessError(f"data.out_dir={out_dir}: {above} is a file, not a directory: "
                           "choose another data.out_dir")
    if contents and out_dir.is_dir() and not (out_dir / MANIFEST).exists() \
            and any(out_dir.iterdir()):
        raise _not_shards(out_dir)


def _not_shards(out_dir: Path) -> HarnessError:
    return HarnessError(f"data.out_dir={out_dir} holds files that are not token shards (no "
                        f"{MANIFEST}): choose another data.out_dir (a new or empty directory)")


def _unwritable(out_dir: Path, where: Path, err: OSError) -> HarnessError:
    return HarnessError(f"data.out_dir={out_dir}: cannot write in {where} "
                        f"({err.strerror or err}): choose a writable data.out_dir")


def _owner() -> str:
    host = "".join(c if c.isalnum() or c in ".-_" else "_" for c in socket.gethostname())
    return f"{os.getpid()}@{host or 'localhost'}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _newest_mtime(path: Path) -> float:
    times = [path.stat().st_mtime]
    for child in path.iterdir():
        try:
            times.append(child.stat().st_mtime)
        except OSError:
            pass
    return max(times)


def clean_stale_temp_dirs(out_dir: Path) -> None:
    """Temp directories of prepare-data runs that were killed (kill -9, a node failure) never
    reach their rename: remove those whose process is gone (same host), or that nothing has
    touched for STALE_AFTER_S (another host, or a name without an owner)."""
    here = _owner().partition("@")[2]
    for tmp in out_dir.parent.glob(f".{glob.escape(out_dir.name)}{TMP_INFIX}*"):
        rest = tmp.name[len(out_dir.name) + 1 + len(TMP_INFIX):]
        owner = rest.split("-", 1)[1] if "-" in rest else ""
        pid, _, host = owner.partition("@")
        try:
            if host == here and pid.isdigit():
                stale = not _pid_alive(int(pid))
            else:
                stale = time.time() - _newest_mtime(tmp) > STALE_AFTER_S
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("removed %s, left behind by an interrupted prepare-data", tmp)
        elif host != here:
            log.warning("%s belongs to a prepare-data on %s (pid %s): if none runs there any "
                        "more, delete it", tmp, host or "an unknown host", pid or "?")


# ---- is out_dir what the config asks for? ---------------------------------------------
def _settings(cfg: DataConfig, given: Tokenizer | None) -> dict:
    """Everything besides the source bytes that decides the tokens (max_bytes acts through
    the sources it selects)."""
    tokenizer = ({"sha256": given.sha256} if given else
                 {"type": cfg.tokenizer_type, "vocab_size": cfg.vocab_size})
    return {"format_version": FORMAT_VERSION, "tokenizer": tokenizer,
            "val_fraction": cfg.val_fraction, "seed": cfg.seed,
            "jsonl_text_field": cfg.jsonl_text_field}


def _source_keys(sources: list[Source]) -> list:
    # content, not paths: the same files moved elsewhere give the same tokens
    return [[s.kind, s.sha256, s.bytes_used] for s in sources]


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _up_to_date(out_dir: Path, inputs: str, mismatch=None) -> bool:
    """False when out_dir is missing or empty, True when it holds intact shards of `inputs`;
    raises otherwise (`mismatch(manifest)`: the error naming what differs)."""
    check_out_dir(out_dir)
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return False
    if not (out_dir / MANIFEST).exists():
        raise _not_shards(out_dir)
    manifest = read_manifest(out_dir)  # a torn one names itself and the fix
    if manifest.get("inputs_sha256") != inputs:
        raise (mismatch(manifest) if mismatch else HarnessError(
            f"data.out_dir={out_dir} was not prepared from these sources and settings: choose "
            "another data.out_dir"))
    TokenShards.open(out_dir, verify=True)  # up to date only if intact, every token read
    return True


def check_prepared_from(cfg: DataConfig, out_dir: Path, read_sources: bool = True) -> None:
    """The trainer's check that the shards in out_dir are the ones the config describes.

    With data.sources set, the shards must come from those sources with these settings, as
    prepare-data requires; a quick check of the files' paths, sizes and times decides without
    reading them, and only when it differs (files touched or moved, an older manifest) are
    the sources read and hashed. With data.sources empty the config names no corpus of its
    own: shards of the built-in corpus must have this config's tokenizer settings, and shards
    prepared from other sources (`harness prepare-data data.sources=... data.out_dir=D`, then
    `harness train data.out_dir=D`) are trained on as they are.

    `read_sources=False` (every rank, before the engine is built): only the manifest, the
    settings and that each named source exists, no walk of the source directories (64 ranks
    stat-ing a corpus of many files on a shared filesystem): a refusal is certain, a pass may
    still be refused by rank 0's full check.
    """
    manifest = read_manifest(out_dir)
    builtin = _prepared_from_builtin(manifest)
    if not cfg.sources and not builtin:
        if read_sources:
            log.info("data.out_dir=%s: shards of %s (data.sources is empty: trained on as "
                     "prepared)", out_dir, _prepared_sources(manifest))
        return
    given = Tokenizer(cfg.tokenizer_model) if cfg.tokenizer_model else None
    settings = _settings(cfg, given)
    if manifest.get("settings") != settings:
        raise _mismatch(cfg, out_dir, manifest, settings)
    if not cfg.sources:
        return  # the built-in corpus; data.max_bytes only capped how much of it was prepared
    if not read_sources:
        for raw in cfg.sources:
            if not Path(raw).expanduser().exists():
                raise HarnessError(f"data.sources: {raw} does not exist; fix or remove the path")
        return
    files = source_files(cfg.sources)
    quick = stat_key(files, cfg.max_bytes)
    if manifest.get("sources_stat") == quick:
        return
    log.info("data.sources changed on disk since %s was prepared, or it predates quick "
             "checks: reading them to compare", out_dir)
    sources = scan_sources(cfg.sources, cfg.max_bytes, files)
    if manifest.get("inputs_sha256") != _sha256({"settings": settings,
                                                 "sources": _source_keys(sources)}):
        raise _mismatch(cfg, out_dir, manifest, settings)
    _record_quick_key(out_dir, quick)


def _record_quick_key(out_dir: Path, quick: str) -> None:
    """Remember the files' quick key once their content has been found equal (best effort:
    a read-only data directory keeps being compared by content)."""
    path = out_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("sources_stat") == quick:
            return
        manifest["sources_stat"] = quick
        tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass


def _prepared_from_builtin(manifest: dict) -> bool:
    if "sources_given" in manifest:
        return not manifest["sources_given"]
    root = str(stdlib_dir())  # manifests written before sources_given: by their paths
    paths = [str(s.get("path", "")) for s in manifest.get("sources", [])]
    return bool(paths) and all(p.startswith(root + os.sep) for p in paths)


def _short_list(items: list[str], most: int = 3) -> str:
    shown = ", ".join(items[:most])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > most else ''}]"


def _prepared_sources(manifest: dict) -> str:
    if _prepared_from_builtin(manifest):
        return "the built-in corpus (data.sources=[])"
    if "sources_given" in manifest:
        return f"data.sources={_short_list(manifest['sources_given'])}"
    return f"the files {_short_list([s.get('path', '?') for s in manifest.get('sources', [])])}"


def _absolute(paths: list[str]) -> list[str]:
    return [os.path.abspath(os.path.expanduser(p)) for p in paths]


def _mismatch(cfg: DataConfig, out_dir: Path, manifest: dict, settings: dict) -> HarnessError:
    """One line: what the config says, what out_dir holds, and the two ways out."""
    fix = ("run `harness prepare-data` with these data settings into another data.out_dir "
           "and train on that, or")
    saved = manifest.get("settings") or {}
    if saved.get("format_version") != settings["format_version"]:
        return HarnessError(f"data.out_dir={out_dir} was prepared by another version of the "
                            f"harness: run `harness prepare-data` into another data.out_dir")
    ours, theirs = settings["tokenizer"], saved.get("tokenizer") or {}
    if ours != theirs:
        if "sha256" in theirs and "sha256" not in ours:
            return HarnessError(
                f"data.tokenizer_model is unset, but data.out_dir={out_dir} was prepared with a "
                f"given tokenizer model (sha256 {str(theirs['sha256'])[:12]}): {fix} set "
                f"data.tokenizer_model to that .model file ({out_dir}/{TOKENIZER_FILE})")
        if "sha256" in ours:
            what = (f"a trained {theirs.get('type')} tokenizer of {theirs.get('vocab_size')} "
                    f"pieces" if "type" in theirs else "another tokenizer model")
            return HarnessError(
                f"data.tokenizer_model={cfg.tokenizer_model} but data.out_dir={out_dir} was "
                f"prepared with {what}: {fix} unset data.tokenizer_model")
        for key, name in (("type", "tokenizer_type"), ("vocab_size", "vocab_size")):
            if ours.get(key) != theirs.get(key):
                return _setting_differs(name, ours.get(key), theirs.get(key), out_dir, fix)
    for key in ("val_fraction", "seed", "jsonl_text_field"):
        if settings[key] != saved.get(key):
            return _setting_differs(key, settings[key], saved.get(key), out_dir, fix)
    prepared = _prepared_sources(manifest)
    given = manifest.get("sources_given")
    if given is not None and _absolute(given) == _absolute(cfg.sources):
        if manifest.get("max_bytes", cfg.max_bytes) != cfg.max_bytes:
            return _setting_differs("max_bytes", cfg.max_bytes, manifest["max_bytes"], out_dir, fix)
        return HarnessError(
            f"the files of data.sources={_short_list(cfg.sources)} changed since "
            f"data.out_dir={out_dir} was prepared from them: run `harness prepare-data` "
            f"into another data.out_dir and train on that, or restore the files")
    return HarnessError(
        f"data.sources={_short_list(cfg.sources)} but data.out_dir={out_dir} holds shards of "
        f"{prepared}: run `harness prepare-data` with these data.sources into another "
        f"data.out_dir and train on that, or point data.sources back")


def _setting_differs(name: str, ours, theirs, out_dir: Path, fix: str) -> HarnessError:
    return HarnessError(f"data.{name}={ours} but data.out_dir={out_dir} was prepared with "
                        f"data.{name}={theirs}: {fix} set data.{name}={theirs}")


def _build(cfg: DataConfig, sources: list[Source], given: Tokenizer | None, settings: dict,
           inputs: str, tmp: Path, progress: bool, quick: str) -> None:
    total = sum(s.bytes_used for s in sources)
    is_val = _val_mask(sum(s.documents for s in sources), cfg.val_fraction, cfg.seed)
    model_path = tmp / TOKENIZER_FILE
    if given:
        shutil.copyfile(given.path, model_path)
        tokenizer = Tokenizer(model_path)
    else:
        texts = (text for text, _ in iter_documents(sources, cfg.jsonl_text_field))
        tokenizer = train_tokenizer(texts, model_path, cfg.tokenizer_type, cfg.vocab_size, total)
    encoded = _encode_all(tokenizer, sources, cfg.jsonl_text_field, _num_workers(cfg, total))
    with ShardWriter(tmp, tokenizer) as writer, \
            tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress,
                 leave=False) as bar:
        for i, (tokens, nbytes) in enumerate(encoded):
            writer.add("val" if is_val[i] else "train", tokens)
            bar.update(nbytes)
        fingerprint = _sha256({"tokenizer_sha256": tokenizer.sha256, "settings": settings,
                               "sources": _source_keys(sources)})
        writer.finish(fingerprint=fingerprint, inputs_sha256=inputs, settings=settings,
                      source_bytes=total, sources=[asdict(s) for s in sources],
                      sources_given=_absolute(cfg.sources), max_bytes=cfg.max_bytes,
                      sources_stat=quick)


def _num_workers(cfg: DataConfig, total_bytes: int) -> int:
    if total_bytes < PARALLEL_MIN_BYTES:
        return 1
    return cfg.num_workers or min(os.cpu_count() or 1, 4)


def _val_mask(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    """Which documents go to the validation split: round(n * fraction), at least one."""
    mask = np.zeros(n_docs, bool)
    if fraction == 0:
        return mask
    if n_docs < 2:
        raise HarnessError(f"data.val_fraction={fraction} needs at least 2 documents, the "
                           "corpus has 1; add documents or set data.val_fraction=0")
    n_val = min(n_docs - 1, max(1, round(n_docs * fraction)))
    # legacy RandomState: its stream is frozen across numpy versions
    mask[np.random.RandomState(seed).choice(n_docs, n_val, replace=False)] = True
    return mask


def _encode_all(tokenizer: Tokenizer, sources: list[Source], text_field: str,
                workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens with EOS, source bytes) per document, in corpus order."""
    docs = iter_documents(sources, text_field)
    init = (str(tokenizer.path), token_dtype(tokenizer.vocab_size).str)
    if workers == 1:
        _init_worker(*init)  # the same code path as the workers, in this process
        yield from map(_encode, docs)
        return
    # spawn: forking a parent that may hold torch threads can deadlock the children
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, _init_worker, init) as pool:
        yield from pool.imap(_encode, docs, chunksize=8)


_worker: dict = {}  # per process: the tokenizer and token dtype set by _init_worker


def _init_worker(model_path: str, dtype: str) -> None:
    _worker["tokenizer"] = Tokenizer(model_path)
    _worker["dtype"] = np.dtype(dtype)


def _encode(doc: tuple[str, int]) -> tuple[np.ndarray, int]:
    text, nbytes = doc
    tokenizer = _worker["tokenizer"]
    return np.array(tokenizer.encode(text) + [tokenizer.eos_id], _worker["dtype"]), nbytes


def _fsync_files(directory: Path) -> None:
    """Flush to disk before the rename, which could otherwise persist before the data."""
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
