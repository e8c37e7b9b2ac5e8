import functools
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
                  else cost_stats.CostStats(costs, worker=worker and worker["workerid"]))
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
def _keep_the_process_group():
    """The CLI leaves the process group when it reports an error, as a process about to exit
    should. Called in-process by a test, it would tear down the group that later tests'
    engines share (DeepSpeed caches its groups); subprocess tests still leave it for real.
    A MonkeyPatch of its own: a test's monkeypatch.undo() must not lift it (one did, and 117
    later tests on that worker failed with "Group ... is not registered")."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("harness.parallel.distributed.close_process_group", lambda: None)
        yield


# ---- parallel workers (pytest-xdist: pyproject's addopts, -n 2) ------------------------------
# One unit of work per module, so that a module-scoped fixture (a shared trained run, one
# multi-process launch) is built once, on one worker; every module that starts the Slurm test
# cluster in one unit, so that one cluster serves them all. (xdist's own --dist loadgroup
# ignores xdist_group marks with this pytest: measured, every test scheduled on its own.)
def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


@functools.cache
def _slurm_modules() -> frozenset[str]:
    """The test modules that start the Slurm test cluster (they import its fixture)."""
    return frozenset(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                     if "from slurm_fixtures import" in p.read_text())


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if _module(nodeid) in _slurm_modules() else _module(nodeid)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Under workers, modules with slow tests first (Slurm's first of all): the long ones start
    early and the short ones fill in around them (--no-loadscope-reorder keeps this order)."""
    if not hasattr(config, "workerinput"):
        return
    rank: dict[str, int] = {}
    for item in items:
        module = _module(item.nodeid)
        mine = 0 if module in _slurm_modules() else 1 if item.get_closest_marker("slow") else 2
        rank[module] = min(rank.get(module, 2), mine)
    items.sort(key=lambda i: rank[_module(i.nodeid)])  # stable: the order within a module kept
