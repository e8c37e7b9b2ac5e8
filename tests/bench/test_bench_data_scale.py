"""bench_data_scale --quick: both curves measured, and the training start's costs that do not
depend on timing (its peak memory, the manifest's size) flat in the number of files. Timings
are the bench's to report, not a test's (a shared 2-core machine)."""
import pytest
from test_bench_quick import run_bench

pytestmark = pytest.mark.slow  # the bench runs its measures in processes of their own


def test_data_scale(tmp_path):
    stdout, result = run_bench("bench_data_scale", tmp_path)
    assert "x per 10x files" in stdout and "x per 10x documents" in stdout
    files, docs = result["files"], result["documents"]
    assert [r["prep_files"] for r in files] == [r["n"] for r in files]
    assert [r["prep_documents"] for r in docs] == [r["n"] for r in docs]
    # one JSONL of 300 or 3000 documents: the same manifest but for the counts' digits
    sizes = [r["prep_manifest_kb"] for r in docs]
    assert max(sizes) - min(sizes) < 0.1
    # a start's peak memory does not grow tenfold with tenfold files or documents
    for rows in (files, docs):
        assert rows[-1]["start_peak_mb"] < 2 * rows[0]["start_peak_mb"] + 1
