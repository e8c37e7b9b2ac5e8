"""data.out_dir, the prepared shards' directory: is it shards at all, is it what the config asks
for (the settings and sources its manifest records, one error naming what differs and the
fix), and the temp directories an interrupted preparation left beside it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from harness.common.errors import HarnessError
from harness.config.data import DataConfig, check_corpus
from harness.data.corpus import Source, stdlib_dir
from harness.data.shards import FORMAT_VERSION, MANIFEST, TOKENIZER_FILE, TokenShards, read_manifest
from harness.data.tokenizer import Tokenizer

log = logging.getLogger("harness")


# a data.mix's data.out_dir holds this (and a directory per source: harness/data/mix_prepare.py)
MIX_RECORD = "mix.json"
TMP_INFIX = ".tmp-"  # .NAME.tmp-HEX-PID@HOST beside out_dir, renamed to out_dir when complete
# a temp directory of another host is only known dead when nothing in it changed for this long
# (tokenizing writes continuously; training the tokenizer on its sample takes minutes)
STALE_AFTER_S = 24 * 3600
# the trainer stats at most this many source files (plus the paths data.sources names), never
# the whole corpus: a start-up cost that does not grow with it
STAT_SAMPLE = 256
# what prepare-data does with the same inputs: 2 chooses validation documents by a hash of
# their text, or splits each by its tokens in a small corpus (val_split.py), where 1 drew a
# permutation; part of the settings, so shards of
# another version are never taken for these
PREP_VERSION = 2


def check_out_dir(out_dir: Path, contents: bool = False) -> None:
    """data.out_dir must be a directory or a path that can become one (never a file); with
    `contents`, one that holds shards (a manifest), a mixture's sources (MIX_RECORD), or
    nothing yet."""
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
            and not (out_dir / MIX_RECORD).exists() and any(out_dir.iterdir()):
        raise _not_shards(out_dir)


def _not_shards(out_dir: Path) -> HarnessError:
    return HarnessError(f"data.out_dir={out_dir} holds files that are not token shards (no "
                        f"{MANIFEST}): choose another data.out_dir (a new or empty directory)")


def unwritable(out_dir: Path, where: Path, err: OSError) -> HarnessError:
    return HarnessError(f"data.out_dir={out_dir}: cannot write in {where} "
                        f"({err.strerror or err}): choose a writable data.out_dir")


def owner_tag() -> str:
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
    here = owner_tag().partition("@")[2]
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
def prep_settings(cfg: DataConfig, given: Tokenizer | None) -> dict:
    """Everything besides the source bytes that decides the tokens (max_bytes acts through
    the sources it selects)."""
    tokenizer = ({"sha256": given.sha256} if given else
                 {"type": cfg.tokenizer_type, "vocab_size": cfg.vocab_size})
    return {"format_version": FORMAT_VERSION, "prep_version": PREP_VERSION,
            "tokenizer": tokenizer,
            "val_fraction": cfg.val_fraction, "seed": cfg.seed,
            "jsonl_text_field": cfg.jsonl_text_field}


def source_keys(sources: list[Source]) -> list:
    # content, not paths: the same files moved elsewhere give the same tokens
    return [[s.kind, s.sha256, s.bytes_used] for s in sources]


def sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def up_to_date(out_dir: Path, inputs: str, mismatch=None) -> bool:
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
    """The trainer's check that the shards in out_dir are the ones the config describes, at a
    cost that does not grow with the corpus: the manifest, and at most STAT_SAMPLE stats.

    With data.sources set, the shards must come from those sources (the paths prepare-data
    recorded) with these settings. The sources' content is trusted to be what prepare-data
    hashed: re-reading them here would keep every rank waiting for hours at terabytes. Only a
    fixed sample of them is looked at (sizes and times, never the bytes): when that changed,
    this refuses, and `harness prepare-data`, run with the same config, compares the files by
    content and records them again when their bytes are the same. With data.sources empty the
    config names no corpus of its own: shards of the built-in corpus must have this config's
    tokenizer settings, and shards prepared from other sources (`harness prepare-data
    data.sources=... data.out_dir=D`, then `harness train data.out_dir=D`) are trained on as
    they are.

    `read_sources=False` (every rank, before the engine is built): the manifest and that each
    named source exists, no stat of the sample (ranks on other nodes may see other times):
    a refusal is certain, a pass may still be refused by rank 0's check.
    """
    manifest = read_manifest(out_dir)
    builtin = _prepared_from_builtin(manifest)
    check_corpus(cfg, builtin)
    if not cfg.sources and not builtin:
        if read_sources:
            log.info("data.out_dir=%s: shards of %s (data.sources is empty: trained on as "
                     "prepared)", out_dir, _prepared_sources(manifest))
        return
    given = Tokenizer(cfg.tokenizer_model) if cfg.tokenizer_model else None
    settings = prep_settings(cfg, given)
    if manifest.get("settings") != settings:
        raise mismatch_error(cfg, out_dir, manifest, settings)
    if not cfg.sources:  # the built-in corpus: any slice of it (data.max_bytes) will do
        if read_sources:
            _note_slice(cfg, out_dir, manifest)
        return
    for raw in cfg.sources:
        if not Path(raw).expanduser().exists():
            raise HarnessError(f"data.sources: {raw} does not exist; fix or remove the path")
    if (manifest.get("sources_given") != absolute(cfg.sources)
            or manifest.get("max_bytes", cfg.max_bytes) != cfg.max_bytes):
        raise mismatch_error(cfg, out_dir, manifest, settings)
    if read_sources:
        _check_stat_sample(cfg, out_dir, manifest)


def stat_sample(sources_given: list[str], files: list[tuple[Path, bool]]) -> list[list]:
    """[path, size, mtime_ns] of the paths named in data.sources (a directory's time changes
    when a file is added or removed in it) and of at most STAT_SAMPLE files evenly spread over
    the corpus, first and last included: what the trainer stats instead of every file."""
    paths = [Path(p) for p in absolute(sources_given)]
    n = len(files)
    picks = sorted({round(i * (n - 1) / (STAT_SAMPLE - 1)) for i in range(STAT_SAMPLE)}) \
        if n > STAT_SAMPLE else range(n)
    paths += [Path(os.path.abspath(files[i][0])) for i in picks]
    return [_stat_row(p) for p in dict.fromkeys(paths)]  # each path once, in order


def _stat_row(path: Path) -> list:
    try:
        st = path.stat()
    except OSError:
        return [str(path), -1, -1]
    return [str(path), st.st_size, st.st_mtime_ns]


def _check_stat_sample(cfg: DataConfig, out_dir: Path, manifest: dict) -> None:
    sample = manifest.get("stat_sample")
    if not isinstance(sample, list):  # an older manifest: the whole corpus's key, not a sample
        changed = ["(the manifest predates the trainer's quick check)"]
    else:
        changed = [row[0] for row in sample if _stat_row(Path(row[0])) != list(row)]
    if changed:
        raise HarnessError(
            f"data.sources={_short_list(cfg.sources)}: {_short_list(changed)} changed since "
            f"data.out_dir={out_dir} was prepared (size or time): run `harness prepare-data` "
            f"with the same config to compare the files by content (it keeps the shards if the "
            f"bytes are the same), or prepare into another data.out_dir")


def check_toy_corpus(cfg: DataConfig, out_dir: Path) -> None:
    """check_corpus against what out_dir holds: the rule prepare-data, train and submit share."""
    if cfg.sources or cfg.allow_toy_corpus:
        return
    held = (out_dir / MANIFEST).is_file()
    check_corpus(cfg, _prepared_from_builtin(read_manifest(out_dir)) if held else None)


def builtin_slice(cfg: DataConfig, out_dir: Path, settings: dict) -> bool:
    """Whether out_dir holds intact shards of the built-in corpus with these settings, which
    prepare-data then takes as they are, as train does: the built-in corpus is a toy, and any
    slice of it (data.max_bytes, another Python's standard library) serves."""
    if cfg.sources or not (out_dir / MANIFEST).is_file():
        return False
    manifest = read_manifest(out_dir)
    if not _prepared_from_builtin(manifest) or manifest.get("settings") != settings:
        return False
    TokenShards.open(out_dir, verify=True)
    _note_slice(cfg, out_dir, manifest)
    return True


def _note_slice(cfg: DataConfig, out_dir: Path, manifest: dict) -> None:
    saved = manifest.get("max_bytes", cfg.max_bytes)
    if saved != cfg.max_bytes:
        log.info("data.out_dir=%s holds %.1f MB of the built-in corpus (prepared with "
                 "data.max_bytes=%s; this config says %s): used as it is; prepare into another "
                 "data.out_dir for another slice", out_dir,
                 manifest.get("source_bytes", 0) / 1e6, saved, cfg.max_bytes)


def record_sources_checked(out_dir: Path, sample: list[list], sources_given: list[str]) -> None:
    """Remember the files' sample of stats, and the paths they were named by, once their
    content has been found equal (they may have been touched, copied or moved; best effort: a
    read-only data directory keeps being refused by the trainer's quick check until
    prepared again)."""
    path = out_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        given = absolute(sources_given)
        if manifest.get("stat_sample") == sample and manifest.get("sources_given") == given:
            return
        manifest.pop("sources_stat", None)  # the whole corpus's key of older manifests
        manifest.update(stat_sample=sample, sources_given=given)
        tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass


def _prepared_from_builtin(manifest: dict) -> bool:
    if "sources_given" in manifest:
        return not manifest["sources_given"]
    root = str(stdlib_dir())  # manifests written before sources_given: by their paths
    paths = [str(s.get("path", "")) for s in _legacy_list(manifest)]
    return bool(paths) and all(p.startswith(root + os.sep) for p in paths)


def _short_list(items: list[str], most: int = 3) -> str:
    shown = ", ".join(items[:most])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > most else ''}]"


def _prepared_sources(manifest: dict) -> str:
    if _prepared_from_builtin(manifest):
        return "the built-in corpus (data.sources=[])"
    if "sources_given" in manifest:
        return f"data.sources={_short_list(manifest['sources_given'])}"
    return f"the files {_short_list([s.get('path', '?') for s in _legacy_list(manifest)])}"


def _legacy_list(manifest: dict) -> list[dict]:
    """The per-file list that manifests held before sources.jsonl (and sources_given)."""
    sources = manifest.get("sources")
    return [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []


def absolute(paths: list[str]) -> list[str]:
    return [os.path.abspath(os.path.expanduser(p)) for p in paths]


def mismatch_error(cfg: DataConfig, out_dir: Path, manifest: dict, settings: dict) -> HarnessError:
    """One line: what the config says, what out_dir holds, and the two ways out."""
    fix = ("run `harness prepare-data` with these data settings into another data.out_dir "
           "and train on that, or")
    saved = manifest.get("settings") or {}
    if (saved.get("format_version"), saved.get("prep_version")) != \
            (settings["format_version"], settings["prep_version"]):
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
    if given is not None and absolute(given) == absolute(cfg.sources):
        if manifest.get("max_bytes", cfg.max_bytes) != cfg.max_bytes:
            return _setting_differs("max_bytes", cfg.max_bytes, manifest["max_bytes"], out_dir, fix)
        return HarnessError(
            f"the files of data.sources={_short_list(cfg.sources)} changed since "
            f"data.out_dir={out_dir} was prepared from them: run `harness prepare-data` "
            f"into another data.out_dir and train on that, or restore the files")
    return HarnessError(
        f"data.sources={_short_list(cfg.sources)} but data.out_dir={out_dir} holds shards of "
        f"{prepared}: run `harness prepare-data` with these data.sources into another "
        f"data.out_dir and train on that (into this one if they are those files moved: it "
        f"compares them by content), or point data.sources back")


def _setting_differs(name: str, ours, theirs, out_dir: Path, fix: str) -> HarnessError:
    return HarnessError(f"data.{name}={ours} but data.out_dir={out_dir} was prepared with "
                        f"data.{name}={theirs}: {fix} set data.{name}={theirs}")
