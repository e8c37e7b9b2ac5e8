"""Where the suite's time goes: a pytest plugin that records, per test, its duration, the
processes it started, the engines it built in-process and the training runs it started as
subprocesses, and writes them as JSON at the session's end.

Registered by conftest.py only when HARNESS_TEST_COSTS=<path to a JSON file> is set, so a
normal run neither imports this nor patches anything. tests/cost_table.py renders the JSON
into the table in tests/README.md.

What is counted, and what is not:
- processes: every subprocess.Popen this pytest process starts (subprocess.run and
  check_output go through it). Their own children (torchrun's ranks, Slurm's jobs) are not
  seen; torchrun and the deepspeed launcher are counted as `ranks` from their
  --nproc_per_node / --num_gpus instead.
- train: the processes that train: `harness train` (python -m harness.cli train or the
  `harness` entry point), directly or under a launcher, and the worker scripts tests/*_worker.py
  (each trains through the real engine).
- engines: deepspeed.initialize calls in this process (harness.train.engine.build makes every one).
A session-scoped fixture's cost lands on the first test that uses it, as pytest reports it;
what runs outside any test (collection, session teardown hooks) goes to the key OUTSIDE.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

OUTSIDE = "(outside tests)"
WORKER_KEY = "harness_test_costs"  # in xdist's workerinput (the path) and workeroutput (counts)
TESTS_DIR = Path(__file__).resolve().parent
LAUNCHERS = {"torchrun": "--nproc_per_node", "deepspeed": "--num_gpus"}


def _argv(args) -> list[str]:
    """Popen's first argument as a list of strings (it may be one shell string or a path)."""
    if isinstance(args, (str, bytes, os.PathLike)):
        text = os.fsdecode(args)
        try:
            return shlex.split(text)
        except ValueError:  # unbalanced quotes in a shell string: a rough split still classifies
            return text.split()
    return [os.fsdecode(a) for a in args]


def _flag(argv: list[str], name: str) -> str | None:
    """The value of --name=V or --name V (torchrun also spells it --nproc-per-node)."""
    names = {name, name.replace("_", "-")}
    for i, a in enumerate(argv):
        key, eq, value = a.partition("=")
        if key in names:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def classify(args) -> dict[str, int]:
    """One started process: {"processes": 1, "ranks": N for a launcher, "train": 1 if it trains}."""
    argv = _argv(args)
    names = [os.path.basename(a) for a in argv]
    launcher = None
    if names[:1] == ["torchrun"] or {"torch.distributed.run", "torch.distributed.launch"} & {*argv}:
        launcher = "torchrun"
    elif names[:1] == ["deepspeed"]:
        launcher = "deepspeed"
    ranks = 0
    if launcher:
        value = _flag(argv, LAUNCHERS[launcher])
        ranks = int(value) if value and value.isdigit() else 1  # "auto" or absent: one per node
    # the subcommand follows the module (-m harness.cli train) or the entry point (harness train)
    train = any(n in ("harness.cli", "harness") and argv[i + 1:i + 2] == ["train"]
                for i, n in enumerate(names))
    train = train or any(n.endswith("_worker.py") and Path(a).resolve().parent == TESTS_DIR
                         for a, n in zip(argv, names))
    return {"processes": 1, "ranks": ranks, "train": int(train)}


class CostStats:
    """Counts the tests this process runs and writes the JSON (without workers), or hands its
    counts to the controller at the end (an xdist worker: `worker` its id, e.g. "gw0")."""

    def __init__(self, path: str, worker: str | None = None):
        self.path = Path(path)
        self.worker = worker
        self.current = OUTSIDE  # the node id whose phases are running now
        self.tests: dict[str, dict] = {}
        self.started = time.time()
        self._patch_popen()
        self._patch_deepspeed()

    def _entry(self, nodeid: str) -> dict:
        return self.tests.setdefault(nodeid, {
            "seconds": 0.0, "outcome": None, "processes": 0, "ranks": 0, "engines": 0,
            "train": 0, "commands": [], "worker": self.worker, "started": time.time()})

    def _patch_popen(self) -> None:
        # the class's __init__, not the module's name: code that did `from subprocess import
        # Popen` (asyncio too) builds the same class
        original = subprocess.Popen.__init__
        stats = self

        @functools.wraps(original)
        def __init__(popen, args, *a, **kw):
            original(popen, args, *a, **kw)  # counted once it started: a missing binary raises
            entry = stats._entry(stats.current)
            for key, n in classify(args).items():
                entry[key] += n
            entry["commands"].append(" ".join(_argv(args))[:300])  # to check the counts by eye

        subprocess.Popen.__init__ = __init__

    def _patch_deepspeed(self) -> None:
        # harness.train.engine.build calls deepspeed.initialize through the module attribute, so
        # patching it here counts every engine. Imported now (conftest already set
        # DS_ACCELERATOR=cpu, as harness.train.engine would before its own import).
        try:
            import deepspeed
        except ImportError:
            return
        original = deepspeed.initialize
        stats = self

        @functools.wraps(original)
        def initialize(*a, **kw):
            stats._entry(stats.current)["engines"] += 1
            return original(*a, **kw)

        deepspeed.initialize = initialize

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        # setup, call and teardown (with the fixtures they set up or finalize) run inside
        self.current = item.nodeid
        self._entry(item.nodeid)
        try:
            yield
        finally:
            self.current = OUTSIDE

    def pytest_runtest_logreport(self, report):
        entry = self._entry(report.nodeid)
        entry["seconds"] += report.duration
        # the call's outcome; a setup that skipped or failed has no call phase
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            entry["outcome"] = report.outcome
        elif report.when == "teardown" and report.outcome == "failed":
            entry["outcome"] = "error"

    def pytest_sessionfinish(self, session, exitstatus):
        if self.worker:
            session.config.workeroutput[WORKER_KEY] = json.dumps(self.tests)
            return
        write(self.path, self.tests, self.started, exitstatus)


class CostStatsController:
    """Under pytest-xdist: the controller runs no test; it tells each worker to count (the
    worker registers CostStats(worker=True)) and merges what they counted."""

    def __init__(self, path: str, workers: int):
        self.path, self.workers = Path(path), workers
        self.tests: dict[str, dict] = {}
        self.started = time.time()

    def pytest_configure_node(self, node):
        node.workerinput[WORKER_KEY] = str(self.path)

    def pytest_testnodedown(self, node, error):
        counted = json.loads(getattr(node, "workeroutput", {}).get(WORKER_KEY, "{}"))
        for nodeid, entry in counted.items():
            if nodeid in self.tests:  # only OUTSIDE is counted by more than one worker
                mine = self.tests[nodeid]
                for key in ("seconds", "processes", "ranks", "engines", "train"):
                    mine[key] += entry[key]
                mine["commands"] += entry["commands"]
            else:
                self.tests[nodeid] = entry

    def pytest_sessionfinish(self, session, exitstatus):
        write(self.path, self.tests, self.started, exitstatus, workers=self.workers)


def write(path: Path, tests: dict[str, dict], started: float, exitstatus, workers: int = 0):
    """The JSON tests/cost_table.py renders. With workers, seconds are per test as each worker
    measured it: their sum is more than the wall time."""
    files: dict[str, dict] = {}
    for nodeid, t in tests.items():
        f = files.setdefault(nodeid.split("::")[0], {
            "tests": 0, "seconds": 0.0, "processes": 0, "ranks": 0, "engines": 0, "train": 0})
        f["tests"] += nodeid != OUTSIDE
        for key in ("seconds", "processes", "ranks", "engines", "train"):
            f[key] += t[key]
    data = {
        "measured": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "host": socket.gethostname(), "nproc": os.cpu_count(), "workers": workers,
        "wall_seconds": round(time.time() - started, 1),
        "args": sys.argv[1:], "exitstatus": int(exitstatus),
        "files": files, "tests": tests,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # a reader never sees half a file
