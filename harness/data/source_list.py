"""sources.jsonl, beside manifest.json in a prepared directory: one JSON line per source file
(path, kind, size, bytes used, sha256, documents), then one per file left out (path and
why). The manifest keeps only their summary (counts, bytes, a digest), so that reading it,
which every rank does at every start, costs the same for ten files or ten million.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from harness.data.corpus import Source

SOURCES_FILE = "sources.jsonl"


def write_source_list(directory: Path, sources: list[Source], skipped: dict[str, list[str]],
                      digest: str) -> dict:
    """Write `directory`/sources.jsonl; return the manifest's "sources" summary (`digest`: of
    what the sources contribute to the fingerprint)."""
    with open(directory / SOURCES_FILE, "w") as f:
        for source in sources:
            f.write(json.dumps(asdict(source)) + "\n")
        for reason, paths in skipped.items():
            for path in paths:
                f.write(json.dumps({"path": path, "skipped": reason}) + "\n")
    return {"file": SOURCES_FILE, "files": len(sources),
            "documents": sum(s.documents for s in sources),
            "bytes": sum(s.bytes_used for s in sources), "sha256": digest,
            "skipped": {reason: len(paths) for reason, paths in skipped.items()}}


def source_summary(manifest: dict) -> dict:
    """The manifest's "sources" summary; from the list an older manifest held inline."""
    sources = manifest.get("sources")
    if isinstance(sources, dict):
        return sources
    rows = sources if isinstance(sources, list) else []
    return {"files": len(rows), "documents": sum(s.get("documents", 0) for s in rows),
            "bytes": sum(s.get("bytes_used", 0) for s in rows), "skipped": {}}


def read_source_list(directory: Path, manifest: dict) -> list[dict]:
    """Every row of sources.jsonl (an older manifest's inline list): O(files), so for tools
    and tests, never for a training start."""
    sources = manifest.get("sources")
    if isinstance(sources, list):
        return sources
    with open(directory / sources["file"]) as f:
        return [json.loads(line) for line in f]
