"""What a training start costs does not grow with the corpus (issue 30 items 1 and 6): rank 0's
check of data.out_dir stats a bounded sample of the source files and reads only the
manifest, whose size is bounded too (the per-file list lies beside it, in sources.jsonl).
Corpora of a few hundred tiny files, prepared in-process."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.common.errors import HarnessError
from harness.config.data import DataConfig
from harness.data import out_dir as data_out_dir
from harness.data import prepare as prep
from harness.data.source_list import SOURCES_FILE, read_source_list


def _corpus(root: Path, files: int) -> Path:
    root.mkdir()
    for i in range(files):
        sub = root / f"d{i // 100:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:05d}.txt").write_text(f"file {i}: " + f"word{i % 53} " * (5 + i % 7) + "\n")
    return root


def _cfg(src: Path, out: Path) -> DataConfig:
    return DataConfig(sources=[str(src)], out_dir=str(out), vocab_size=300, val_fraction=0.1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(config, out_dir) of a corpus with more files than the trainer stats."""
    root = tmp_path_factory.mktemp("many")
    cfg = _cfg(_corpus(root / "src", 2 * data_out_dir.STAT_SAMPLE + 37), root / "out")
    prep.prepare_data(cfg, progress=False)
    return cfg, Path(cfg.out_dir)


def _stats_by_check(cfg, out, monkeypatch) -> int:
    calls = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    data_out_dir.check_prepared_from(cfg, out)
    monkeypatch.undo()
    return len(calls)


def test_the_trainer_stats_a_bounded_sample(prepared, monkeypatch):
    cfg, out = prepared
    files = len(list(Path(cfg.sources[0]).rglob("*.txt")))
    assert files > 2 * data_out_dir.STAT_SAMPLE
    stats = _stats_by_check(cfg, out, monkeypatch)
    # the sample, the named directory, the named path's existence, the manifest and shards
    assert data_out_dir.STAT_SAMPLE <= stats <= data_out_dir.STAT_SAMPLE + 10


def test_a_sampled_file_touched_is_found_and_prepare_data_clears_it(prepared):
    """The first and the last file are always in the sample; a touched file is refused until
    prepare-data compares the content and records it."""
    cfg, out = prepared
    last = sorted(Path(cfg.sources[0]).rglob("*.txt"))[-1]
    st = last.stat()
    os.utime(last, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(HarnessError, match=rf"\[{last}\] changed since .* \(size or time\)"):
        data_out_dir.check_prepared_from(cfg, out)
    prep.prepare_data(cfg, progress=False)
    data_out_dir.check_prepared_from(cfg, out)


def test_a_file_added_to_a_named_directory_is_found(tmp_path):
    src = _corpus(tmp_path / "src", 20)
    cfg = _cfg(src, tmp_path / "out")
    prep.prepare_data(cfg, progress=False)
    (src / "new.txt").write_text("a new document\n")
    with pytest.raises(HarnessError, match=rf"\[{src}\] changed since .* \(size or time\)"):
        data_out_dir.check_prepared_from(cfg, Path(cfg.out_dir))


def test_moved_sources_are_refused_then_recorded_by_prepare_data(tmp_path):
    """The trainer compares the paths prepare-data recorded, not the bytes: the same files
    moved are refused until prepare-data, run with the new paths, finds the same content."""
    src = _corpus(tmp_path / "src", 20)
    cfg = _cfg(src, tmp_path / "out")
    out = prep.prepare_data(cfg, progress=False)
    moved = tmp_path / "moved"
    src.rename(moved)
    cfg = _cfg(moved, out)
    with pytest.raises(HarnessError, match=rf"data.sources=\[{moved}\] but data.out_dir={out} "
                                           rf"holds shards of data.sources=\[{src}\]"):
        data_out_dir.check_prepared_from(cfg, out)
    prep.prepare_data(cfg, progress=False)
    data_out_dir.check_prepared_from(cfg, out)


def _prepare_files(root: Path, files: int) -> tuple[dict, list[dict]]:
    root.mkdir()
    cfg = _cfg(_corpus(root / "src", files), root / "out")
    out = prep.prepare_data(cfg, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest, read_source_list(out, manifest)


def test_the_manifest_summarises_the_sources_and_lists_them_beside_it(tmp_path, monkeypatch):
    """The manifest's size does not depend on the number of files (the trainer's stat sample
    shrunk to 16 so that both corpora fill it); sources.jsonl has a line per file, whose
    counts add up to the summary's."""
    monkeypatch.setattr(data_out_dir, "STAT_SAMPLE", 16)
    small, small_rows = _prepare_files(tmp_path / "a", 40)
    large, large_rows = _prepare_files(tmp_path / "b", 400)
    size = [len(json.dumps(m, indent=1)) for m in (small, large)]
    assert abs(size[0] - size[1]) < 200, size  # digits of counts, not 360 more rows
    for manifest, rows, files in ((small, small_rows, 40), (large, large_rows, 400)):
        summary = manifest["sources"]
        assert summary["file"] == SOURCES_FILE and len(rows) == summary["files"] == files
        assert summary["documents"] == sum(r["documents"] for r in rows) == files
        assert summary["bytes"] == sum(r["bytes_used"] for r in rows) == manifest["source_bytes"]
        keys = [[r["kind"], r["sha256"], r["bytes_used"]] for r in rows]
        assert summary["sha256"] == data_out_dir.sha256(keys)
