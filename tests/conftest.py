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
    worker = getattr(config, "workerinput", None)  # an xdist worker: told by the controller
    if worker is not None:
        costs = worker.get("harness_test_costs", "")
    if costs:
        import cost_stats

        workers = getattr(config.option, "numprocesses", None)
        plugin = (cost_stats.CostStatsController(costs, workers) if workers
                  else cost_stats.CostStats(costs, worker=worker is not None))
        config.pluginmanager.register(plugin, "cost_stats")


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


# ---- parallel workers (pytest-xdist, `make test`: -n 2 --dist loadgroup) --------------------
SLURM_FIXTURES = {"slurm_cluster", "slurm_gpu_cluster"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (its own modifyitems hook)
def pytest_collection_modifyitems(config, items):
    """Under workers, one group per module, so that a module-scoped fixture (a shared trained
    run, one multi-process launch) is built once, on one worker; every module that starts the
    Slurm test cluster in one group, so that one cluster serves them all. Modules with slow
    tests go first: the long ones start early and the short ones fill in around them (run with
    --no-loadscope-reorder, which keeps this order)."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    group, rank = {}, {}
    for path, members in modules.items():
        slurm = any(SLURM_FIXTURES & set(getattr(i, "fixturenames", ())) for i in members)
        group[path] = "slurm" if slurm else path
        rank[path] = 0 if slurm else 1 if any(i.get_closest_marker("slow") for i in members) else 2
    if config.pluginmanager.hasplugin("xdist"):
        for item in items:
            item.add_marker(pytest.mark.xdist_group(group[item.nodeid.split("::")[0]]))
    if hasattr(config, "workerinput"):  # a worker: the controller schedules in this order
        items.sort(key=lambda i: rank[i.nodeid.split("::")[0]])  # stable: module order kept
