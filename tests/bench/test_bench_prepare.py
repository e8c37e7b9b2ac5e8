"""bench/bench_prepare.py --quick runs and reports the harness and sentencepiece side by side.
The speed itself is the bench's to report (a wall clock in a test flakes on a shared machine)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a process of its own, spawning tokenizer workers (~10 s)

ROOT = Path(__file__).resolve().parents[2]


def test_bench_prepare_quick(tmp_path):
    out = tmp_path / "prepare.json"
    run = subprocess.run([sys.executable, "bench/bench_prepare.py", "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "vs spm per CPU-s" in run.stdout and "harness, 2 workers" in run.stdout
    result = json.loads(out.read_text())
    assert result["mb"] > 0.5 and result["documents"] > 10
    for w in ("1 worker", "2 workers"):
        r = result["results"][f"harness, {w}"]
        assert r["mb_per_s"] > 0 and 0 < r["vs_sentencepiece_per_cpu_s"] < 5
    assert set(result["readers"]) == {"jsonl", "jsonl.gz", "jsonl.zst", "parquet"}
    assert all(r["read_mb_per_cpu_s"] > 0 for r in result["readers"].values())
