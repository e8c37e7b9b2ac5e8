"""A real multi-node Slurm cluster on this machine (tests/slurm_cluster.sh) for slow tests.

Use it from a test module:
    from slurm_fixtures import slurm_cluster  # noqa: F401  (the fixture, a SlurmCluster)
    def test_x(slurm_cluster): job = slurm_cluster.sbatch(path); slurm_cluster.wait(job, 60)
slurm_gpu_cluster is the same cluster with 4 fake GPUs per node (gpus_per_node=4 scripts).
Skips with the reason when Slurm's daemons are not installed (.ci/install_slurm.sh) or when
not root. Every wait has its own timeout: a request the nodes cannot meet pends for ever.
"""
from __future__ import annotations

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


def _cluster_env(**shape: int) -> dict:
    env = dict(os.environ)
    env.setdefault("HARNESS_SLURM_DIR", "/tmp/harness-slurm")
    env.update({f"HARNESS_SLURM_{key.upper()}": str(v) for key, v in shape.items()})
    env["SLURM_CONF"] = f"{env['HARNESS_SLURM_DIR']}/etc/slurm.conf"
    return env


def start_cluster(nodes: int = 2, **shape: int) -> SlurmCluster:
    """Start (or reuse) a cluster of `nodes` nodes; shape: cpus=, gpus= per node."""
    missing = [cmd for cmd in NEEDED if shutil.which(cmd) is None]
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} missing): run .ci/install_slurm.sh")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (network namespaces, daemons as root)")
    env = _cluster_env(**shape)
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(nodes)], env=env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"slurm_cluster.sh start failed:\n{proc.stderr}"
    return SlurmCluster(nodes, env)


def stop_cluster(cluster: SlurmCluster) -> None:
    subprocess.run(["bash", str(SCRIPT), "stop"], env=cluster.env, capture_output=True,
                   timeout=60, check=True)


@pytest.fixture(scope="module")
def slurm_cluster():
    cluster = start_cluster(nodes=2)
    yield cluster
    stop_cluster(cluster)


@pytest.fixture(scope="module")
def slurm_gpu_cluster():
    """The same 2 nodes with 4 fake GPUs each (GRES): for scripts with gpus_per_node > 0, which
    ask for --gres=gpu:N and N tasks per node. Nothing uses the devices on a CPU machine."""
    cluster = start_cluster(nodes=2, gpus=4)
    yield cluster
    stop_cluster(cluster)
