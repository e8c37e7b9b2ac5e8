import os
import sys
from pathlib import Path

# one thread per process: CI has 2 cores and the distributed tests run 2 ranks
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
# the shared helpers and workers here, and the bench code some tests check (bench/common.py,
# bench/spikes/: the spike suite, its split and the published baselines)
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench"), str(ROOT / "bench" / "spikes")]

import pytest  # noqa: E402


def pytest_configure(config):
    # HARNESS_TEST_COSTS=<file.json>: per-test time, processes and engines (tests/cost_stats.py);
    # popped, so that a pytest a test starts in a subprocess does not write over the file
    costs = os.environ.pop("HARNESS_TEST_COSTS", "")
    if costs:
        from cost_stats import CostStats

        config.pluginmanager.register(CostStats(costs), "cost_stats")


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory):
    """Token shards of a 300 kB slice of the built-in corpus, prepared once per session."""
    from harness.config.data import DataConfig
    from harness.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("shards") / "stdlib"
    prepare_data(DataConfig(out_dir=str(out), max_bytes=300_000, vocab_size=512), progress=False)
    return out


@pytest.fixture(autouse=True)
def _keep_the_process_group(monkeypatch):
    """The CLI leaves the process group when it reports an error, as a process about to exit
    should. Called in-process by a test, it would tear down the group that later tests'
    engines share (DeepSpeed caches its groups); subprocess tests still leave it for real."""
    monkeypatch.setattr("harness.parallel.distributed.close_process_group", lambda: None)
