"""A real multi-node Slurm cluster on this machine (tests/slurm_cluster.sh) for slow tests.

Use it from a test module:
    from slurm_fixtures import slurm_cluster  # noqa: F401  (the fixture, a SlurmCluster)
    def test_x(slurm_cluster): job = slurm_cluster.sbatch(path); slurm_cluster.wait(job, 60)
slurm_gpu_cluster is the same cluster with 4 fake GPUs per node (gpus_per_node=4 scripts).
Skips with the reason when Slurm's daemons are not installed (.ci/install_slurm.sh) or when
not root. Every wait has its own timeout: a request the nodes cannot meet pends for ever.

One cluster per pytest run, started at its first use and stopped when the run ends: the run
holds a cluster id (1-63, an flock on /tmp/harness-slurm.<id>.lock that the kernel drops when
the process dies, kill -9 included) and with it a directory, bridge, subnet, namespaces and
slurmctld port no other run uses (tests/slurm_cluster.sh), so two runs on one machine never
stop each other's cluster; a run that took over the id of a crashed one stops what that left.
Modules reuse the run's cluster (restarted only to change its shape, 2 nodes with or without
GPUs) and cancel their jobs when they end.
"""
from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("slurm_cluster.sh")
NEEDED = ("slurmctld", "slurmd", "sbatch", "munged", "ip", "nsenter")
# states after which a job runs no more unless someone requeues it
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@dataclass
class SlurmCluster:
    nodes: int
    env: dict  # os.environ plus SLURM_CONF: pass to every Slurm client

    def run(self, *cmd: str, timeout: float = 30) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def sbatch(self, script: Path) -> str:
        return self.run("sbatch", "--parsable", str(script)).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict: JobState, Restarts, ExitCode, ..."""
        fields = self.run("scontrol", "show", "job", "--oneliner", job_id).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job_id: str, timeout: float, states: set[str] = FINAL) -> dict[str, str]:
        """Poll until the job is in one of `states`; fail with its record after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout} s: "
                                     f"{info}\n{self.run('sinfo', '-N')}")
            time.sleep(0.2)

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job still queued or running, and wait until they are gone."""
        deadline = time.monotonic() + timeout
        while jobs := self.run("squeue", "-h", "-o", "%A").split():
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs {jobs} still there after scancel for {timeout} s")
            self.run("scancel", "--full", *jobs)
            time.sleep(0.2)


_claimed: dict = {}  # this run's cluster: id, dir, the lock file held open


def _claim() -> dict:
    """This process's cluster id and directory: the first id whose lock no live process holds.
    Anything a crashed holder of that id left running is stopped before the first start."""
    if not _claimed:
        for cluster_id in range(1, 64):
            lock = open(f"/tmp/harness-slurm.{cluster_id}.lock", "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            _claimed.update(id=cluster_id, dir=f"/tmp/harness-slurm.{cluster_id}", lock=lock)
            _script("stop", _cluster_env())
            atexit.register(_stop_claimed)  # the end of the pytest run
            break
        else:
            pytest.skip("63 pytest runs on this machine hold a Slurm test cluster each")
    return _claimed


def _cluster_env(**shape: int) -> dict:
    env = dict(os.environ)
    env.update(HARNESS_SLURM_ID=str(_claimed["id"]), HARNESS_SLURM_DIR=_claimed["dir"])
    env.update({f"HARNESS_SLURM_{key.upper()}": str(v) for key, v in shape.items()})
    env["SLURM_CONF"] = f"{env['HARNESS_SLURM_DIR']}/etc/slurm.conf"
    return env


def _script(command: str, env: dict, *args: str, timeout: float = 90) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), command, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"slurm_cluster.sh {command} failed:\n{proc.stderr}"


def _stop_claimed() -> None:
    _script("stop", _cluster_env(), timeout=60)


def start_cluster(nodes: int = 2, **shape: int) -> SlurmCluster:
    """This run's cluster with `nodes` nodes; shape: cpus=, gpus= per node. Reused when it
    already has that shape, restarted with it otherwise."""
    missing = [cmd for cmd in NEEDED if shutil.which(cmd) is None]
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} missing): run .ci/install_slurm.sh")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (network namespaces, daemons as root)")
    _claim()
    env = _cluster_env(**shape)
    _script("start", env, str(nodes))
    return SlurmCluster(nodes, env)


@pytest.fixture(scope="module")
def slurm_cluster():
    cluster = start_cluster(nodes=2)
    yield cluster
    cluster.cancel_all()  # the next module starts on idle nodes; the run's end stops them


@pytest.fixture(scope="module")
def slurm_gpu_cluster():
    """The same 2 nodes with 4 fake GPUs each (GRES): for scripts with gpus_per_node > 0, which
    ask for --gres=gpu:N and N tasks per node. Nothing uses the devices on a CPU machine."""
    cluster = start_cluster(nodes=2, gpus=4)
    yield cluster
    cluster.cancel_all()
