"""A weighted mixture's data (data.mix) on disk: one tokenizer, then one prepared directory per
source, each an ordinary prepared data.out_dir of its own.

    <data.out_dir>/tokenizer.model   the mixture's one tokenizer (unless data.tokenizer_model)
    <data.out_dir>/mix.json          marks a mixture's directory; once the tokenizer is
                                     trained, what it was trained on (settings, content)
    <data.out_dir>/<name>/           source <name>'s shards, prepared by harness.data.prepare
                                     with that tokenizer given (data.tokenizer_model)

Without data.tokenizer_model the tokenizer is trained first on a bounded sample across all the
sources (harness.data.tokenizer's strided sample over their documents, the sources taken in
order of their names so that reordering data.mix changes nothing), written atomically, and
mix.json after it (its record that the tokenizer is complete). Each source is then prepared as
`harness prepare-data` prepares one corpus, with a config derived from data (sources, out_dir,
tokenizer_model replaced): the per-source directories are what a user would get preparing each
with that tokenizer by hand, and each has its own validation split. The weights are not part of
the prepared data: reweighting needs no preparation.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional

from harness.common import lease
from harness.common.durable import write_atomic
from harness.common.errors import HarnessError
from harness.config.data import DataConfig, MixSource
from harness.data import prepare
from harness.data.corpus import iter_documents, scan_sources, source_files
from harness.data.mixture import MixedSequences
from harness.data.out_dir import (MIX_RECORD, check_out_dir, check_prepared_from, owner_tag,
                                  prep_settings, sha256, source_keys)
from harness.data.shards import MANIFEST, TOKENIZER_FILE, TokenShards
from harness.data.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger("harness")

MIX_LEASE = ".mix" + lease.RUN_LEASE  # inside data.out_dir: one tokenizer trainer at a time


def source_dir(cfg: DataConfig, entry: MixSource) -> Path:
    return Path(cfg.out_dir) / entry.name


def tokenizer_path(cfg: DataConfig) -> Path:
    return Path(cfg.tokenizer_model) if cfg.tokenizer_model else \
        Path(cfg.out_dir) / TOKENIZER_FILE


def source_config(cfg: DataConfig, entry: MixSource) -> DataConfig:
    """The data config that prepares (and checks) one source: its files, its directory, the
    mixture's tokenizer."""
    return dataclasses.replace(cfg, sources=list(entry.sources), mix=[], mix_reweight=False,
                               out_dir=str(source_dir(cfg, entry)),
                               tokenizer_model=str(tokenizer_path(cfg)))


def _named(i: int, entry: MixSource, err: HarnessError) -> HarnessError:
    return HarnessError(f"data.mix[{i}] ({entry.name}): {err}")


# ---- preparing -------------------------------------------------------------------------------
def prepare_mix(cfg: DataConfig, progress: bool = True, report: bool = False) -> list[Path]:
    """The tokenizer, then every source's directory (each a no-op when up to date); returns
    the directories in data.mix's order. `report`: each source's closing line, as
    `harness prepare-data` prints it."""
    prepare_tokenizer(cfg)
    dirs = []
    for i, entry in enumerate(cfg.mix):
        sub = source_config(cfg, entry)
        try:
            if report:
                prepare.main(sub)
            else:
                prepare.prepare_data(sub, progress)
        except HarnessError as err:
            raise _named(i, entry, err) from None
        dirs.append(Path(sub.out_dir))
    return dirs


def prepare_tokenizer(cfg: DataConfig, train: bool = True) -> bool:
    """data.out_dir marked as a mixture's, and its tokenizer trained unless it is given (or
    trained on these sources already): what every source's preparation needs first. `train`
    false (a part of prepare_part.py): whether it is there, never training it."""
    cfg.validate()
    out = Path(cfg.out_dir)
    check_mix_dir(out)
    if not train and not cfg.tokenizer_model and _mix_tokenizer(cfg, out, False) is None:
        return False  # nothing written
    _mark(out, cfg)
    if train and not cfg.tokenizer_model:
        _mix_tokenizer(cfg, out)
    return True


def main(cfg: DataConfig) -> int:
    """`harness prepare-data` with data.mix set."""
    prepare_mix(cfg, progress=True, report=True)
    shares = ", ".join(f"{e.name} {s:.3g}" for e, s in zip(cfg.mix, cfg.mix_shares()))
    print(f"mixture {cfg.out_dir}: {len(cfg.mix)} sources, one tokenizer "
          f"({tokenizer_path(cfg)}); weights normalised to shares: {shares}")
    return 0


def check_mix_dir(out: Path) -> None:
    """data.out_dir of a mix: a directory of per-source directories, never one corpus's
    shards."""
    check_out_dir(out)
    if (out / MANIFEST).is_file():
        raise HarnessError(f"data.out_dir={out} holds the shards of one corpus, and data.mix "
                           f"prepares one directory per source inside data.out_dir: choose "
                           f"another data.out_dir")


def _mark(out: Path, cfg: DataConfig) -> None:
    """mix.json before anything else is written: the trainer's path checks take the directory
    for a mixture's (harness.data.out_dir.check_out_dir); never over an existing record."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / MIX_RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    except OSError as e:
        raise HarnessError(f"data.out_dir={out}: cannot write there ({e.strerror or e}): "
                           f"choose a writable data.out_dir") from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"sources": [e.name for e in cfg.mix]}) + "\n")


def _mix_tokenizer(cfg: DataConfig, out: Path, train: bool = True) -> Optional[Tokenizer]:
    """out/tokenizer.model, trained on all the sources unless mix.json says it was already
    (`train` false: None then)."""
    entries = sorted(cfg.mix, key=lambda e: e.name)
    scanned = []
    for entry in entries:
        try:
            sources = scan_sources(entry.sources, cfg.max_bytes, source_files(entry.sources),
                                   {}, text_field=cfg.jsonl_text_field)
        except HarnessError as err:
            raise _named(cfg.mix.index(entry), entry, err) from None
        scanned.append(sources)
    settings = prep_settings(cfg, None)
    inputs = sha256({"settings": settings, "sources": [source_keys(s) for s in scanned]})
    existing = _trained(out, inputs)
    if existing is not None or not train:
        return existing
    held = lease.take(out / MIX_LEASE, "data.out_dir", out,
                      "prepare into another data.out_dir (or run again once it is done)")
    try:
        existing = _trained(out, inputs)  # by another preparer meanwhile
        if existing is not None:
            return existing
        sources = [s for group in scanned for s in group]
        texts = (text for text, _ in iter_documents(sources, cfg.jsonl_text_field))
        tmp = out / f".{TOKENIZER_FILE}.{owner_tag()}.tmp"
        total = sum(s.bytes_used for s in sources)
        tokenizer = train_tokenizer(texts, tmp, cfg.tokenizer_type, cfg.vocab_size, total,
                                    cfg.tokenizer_threads)
        os.replace(tmp, out / TOKENIZER_FILE)
        record = {"inputs_sha256": inputs, "settings": settings,
                  "tokenizer_sha256": tokenizer.sha256, "sources": [e.name for e in entries]}
        write_atomic(out / MIX_RECORD, (json.dumps(record, indent=1) + "\n").encode())
        return Tokenizer(out / TOKENIZER_FILE)
    finally:
        held.release()


def _trained(out: Path, inputs: str) -> Optional[Tokenizer]:
    """The tokenizer of out when mix.json says it is complete and trained on `inputs`; None
    when there is none yet; a refusal when it was trained on something else (the per-source
    shards were tokenized with it: a new one would not match them)."""
    record, model = out / MIX_RECORD, out / TOKENIZER_FILE
    if not record.is_file() or not model.is_file():
        return None
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        return None  # torn: written last, so the tokenizer is retrained
    tokenizer = Tokenizer(model)
    if saved.get("tokenizer_sha256") != tokenizer.sha256:  # the first record, or torn
        return None
    if saved.get("inputs_sha256") != inputs:
        raise HarnessError(
            f"data.out_dir={out}: its {TOKENIZER_FILE} was trained on other data.mix sources or "
            f"tokenizer settings, and its sources' shards tokenized with it: prepare into "
            f"another data.out_dir, or keep that tokenizer with "
            f"data.tokenizer_model={model} (sources whose files changed must then be prepared "
            f"again: remove their directories)")
    return tokenizer


# ---- what the trainer opens ------------------------------------------------------------------
def mix_prepared(cfg: DataConfig) -> bool:
    """Whether every source's directory holds shards (a manifest), and the tokenizer is there."""
    return tokenizer_path(cfg).is_file() and all(
        (source_dir(cfg, e) / MANIFEST).is_file() for e in cfg.mix)


def check_mix_prepared(cfg: DataConfig, read_sources: bool = True) -> None:
    """harness.data.out_dir.check_prepared_from for each source's directory: the shards are
    the ones its entry describes, tokenized with the mixture's tokenizer."""
    check_mix_dir(Path(cfg.out_dir))
    for i, entry in enumerate(cfg.mix):
        try:
            check_prepared_from(source_config(cfg, entry), source_dir(cfg, entry), read_sources)
        except HarnessError as err:
            raise _named(i, entry, err) from None


class MixShards:
    """The sources' TokenShards, opened in data.mix's order (TokenShards' checks each)."""

    def __init__(self, cfg: DataConfig):
        self.directory = Path(cfg.out_dir)
        self.names = [e.name for e in cfg.mix]
        self.parts = [TokenShards.open(source_dir(cfg, e)) for e in cfg.mix]
        self.fingerprints = {n: s.fingerprint for n, s in zip(self.names, self.parts)}
        # one for the whole mixture, where a run without a mix keeps the corpus's: the
        # sources, their order and their shards (the weights are the sampler's, not the data's)
        self.fingerprint = sha256([[n, fp] for n, fp in self.fingerprints.items()])
        self.vocab_size = max(s.vocab_size for s in self.parts)
        self.tokenizer_path = self.parts[0].tokenizer_path
        shas = {s.manifest["tokenizer"]["sha256"] for s in self.parts}
        if len(shas) != 1:
            raise HarnessError(f"data.out_dir={self.directory}: the sources' shards were "
                               f"tokenized with {len(shas)} different tokenizers: prepare them "
                               f"again with `harness prepare-data`")

    def sequences(self, split: str, seq_len: int) -> MixedSequences:
        return MixedSequences(self.names, [s.sequences(split, seq_len) for s in self.parts])

    def named_sequences(self, split: str, seq_len: int):
        return list(zip(self.names, [s.sequences(split, seq_len) for s in self.parts]))

