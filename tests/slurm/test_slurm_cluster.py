"""The rendered batch script on a real 2-node Slurm cluster (tests/slurm_cluster.sh): tasks get
their ranks from launch/srun_task.sh and meet at MASTER_ADDR by host name; USR1 reaches the
tasks and the job requeues itself. A stand-in for `python` replaces the trainer."""
import sys
import time
from pathlib import Path

import pytest
from slurm_fixtures import slurm_cluster  # noqa: F401  (fixture)

from harness.config.slurm import SlurmConfig
from harness.slurm.sbatch import render_sbatch
from harness.train.preemption import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow

# rank 0 listens on MASTER_PORT, every other rank connects to MASTER_ADDR by name
RENDEZVOUS = """
import os, socket, sys, time
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
print(f"rank={rank} world={world} local={os.environ['LOCAL_RANK']} master={addr} "
      f"host={socket.gethostname()} args={' '.join(sys.argv[1:])}", flush=True)
if rank == 0:
    server = socket.create_server(("", port))
    server.settimeout(60)
    for _ in range(world - 1):
        print("rank 0 heard:", server.accept()[0].recv(100).decode(), flush=True)
else:
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    conn.sendall(f"rank {rank} on {socket.gethostname()}".encode())
"""

# the trainer's part: on USR1 or TERM "save" and exit with the requeue code; a restart is done
TRAINER = f"""#!/bin/bash
[ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] && exit 0
trap 'echo "rank $RANK got USR1"; exit {REQUEUE_EXIT_CODE}' USR1
trap 'echo "rank $RANK got TERM"; exit {REQUEUE_EXIT_CODE}' TERM
echo "rank $RANK ready"
for _ in $(seq 600); do sleep 0.1 & wait $!; done
exit 1
"""


def write_job(tmp_path: Path, fake_python: str, **cfg) -> Path:
    """The harness's own script, with `fake_python` standing in for python (cpu-only tasks)."""
    python = tmp_path / "python"
    python.write_text(fake_python)
    python.chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    slurm = SlurmConfig(gpus_per_node=0, cpus_per_task=1, time="5:00", **cfg)
    script = run_dir / "job.sbatch"
    script.write_text(render_sbatch(slurm, str(run_dir), ["--config", "c.yaml"], str(python)))
    return script


def test_two_nodes_rendezvous_by_name(slurm_cluster, tmp_path):  # noqa: F811
    (tmp_path / "rendezvous.py").write_text(RENDEZVOUS)
    fake = f'#!/bin/bash\nexec {sys.executable} {tmp_path / "rendezvous.py"} "$@"\n'
    name = 'two"nodes";#1$(x)'  # scontrol's one-line output would split at a space
    script = write_job(tmp_path, fake, nodes=2, job_name=name)
    job = slurm_cluster.sbatch(script)
    info = slurm_cluster.wait(job, timeout=60)
    out = (script.parent / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    assert info["JobName"] == name and f"({name})" in out
    for rank, host in [(0, "n1"), (1, "n2")]:
        assert (f"rank={rank} world=2 local=0 master=n1 host={host} "
                "args=-m harness.cli train --config c.yaml") in out
    assert "rank 0 heard: rank 1 on n2" in out


def start_trainers(cluster, tmp_path: Path) -> tuple[str, Path]:
    script = write_job(tmp_path, TRAINER, nodes=2)
    job = cluster.sbatch(script)
    out = script.parent / f"slurm-{job}.out"
    deadline = time.monotonic() + 30
    while not out.exists() or out.read_text().count("ready") < 2:  # both traps are set
        assert time.monotonic() < deadline, f"tasks not ready after 30 s: {cluster.job(job)}"
        time.sleep(0.1)
    return job, out


def test_usr1_saves_and_requeues(slurm_cluster, tmp_path):  # noqa: F811
    job, out = start_trainers(slurm_cluster, tmp_path)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    # a requeued job waits cred_expire (10 s in slurm_cluster.sh) before it may start again
    info = slurm_cluster.wait(job, timeout=60)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert text.count("got USR1") == 2 and "requeueing" in text and "training finished" in text


def test_scancel_is_final(slurm_cluster, tmp_path):  # noqa: F811
    job, out = start_trainers(slurm_cluster, tmp_path)
    slurm_cluster.run("scancel", job)
    info = slurm_cluster.wait(job, timeout=30)
    text = out.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", text
    assert text.count("got TERM") == 2 and "harness: requeueing" not in text
    assert "not requeued by this script" in text  # and the script says so
