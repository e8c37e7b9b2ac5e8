"""Where a process sits (harness.parallel.distributed.detect) from the launcher's environment, and
the per-job rendezvous port. The Slurm environments are the ones measured on Slurm 22.05:
  batch script:  SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID=0, SLURM_LOCALID=0, no step id
  salloc shell:  SLURM_JOB_ID, SLURM_NTASKS, no SLURM_PROCID, no step id
  srun task:     all of the above plus SLURM_STEP_ID / SLURM_STEPID = 0, 1, ...
"""
import subprocess
import sys
from pathlib import Path

import pytest
from engine_utils import child_env

from harness.common.errors import HarnessError
from harness.parallel import distributed
from harness.parallel.distributed import detect, job_port

JOB = {"SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "4"}
BATCH = {**JOB, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
SALLOC = dict(JOB)
SRUN = {**JOB, "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0"}


@pytest.mark.parametrize("env", [
    BATCH, SALLOC,
    {**BATCH, "SLURM_STEP_ID": "4294967291"},  # the batch step (0xfffffffb), Slurm >= 20.11
    {**BATCH, "SLURM_STEP_ID": "4294967294"},  # the batch step before 20.11
    {**BATCH, "SLURM_STEPID": "4294967292"},  # the extern step
    {**BATCH, "SLURM_STEP_ID": "4294967290"},  # salloc's interactive step
], ids=["batch", "salloc", "batch-step", "old-batch-step", "extern-step", "interactive-step"])
def test_outside_srun_with_many_tasks_is_refused(env):
    with pytest.raises(HarnessError, match=r"not as an srun task, with SLURM_NTASKS=4: .*run it "
                                           r"under `srun`.*unset SLURM_NTASKS") as err:
        detect(env)
    assert "\n" not in str(err.value) and "4711" in str(err.value)


def test_srun_tasks_and_single_processes_are_accepted():
    task = detect(SRUN)
    assert (task.rank, task.world_size, task.launcher) == (2, 4, "slurm")
    assert (task.master_addr, task.master_port) == ("n1", job_port(4711))
    # one task in the job: the batch script may run the trainer itself
    alone = detect({**BATCH, "SLURM_NTASKS": "1"})
    assert (alone.rank, alone.world_size) == (0, 1)
    # what the message suggests: without SLURM_NTASKS it is one process
    single = detect({k: v for k, v in BATCH.items() if k != "SLURM_NTASKS"})
    assert (single.world_size, single.launcher) == (1, "single")
    # torchrun (or the deepspeed launcher) inside a batch script starts the ranks itself
    torchrun = detect({**BATCH, "RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29501"})
    assert (torchrun.rank, torchrun.world_size, torchrun.launcher) == (1, 2, "torchrun")
    assert detect({}).launcher == "single"


def test_bare_train_in_a_batch_script_exits_2_with_one_line(tmp_path):
    env = child_env(**BATCH)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "train",
                           f"train.run_dir={tmp_path / 'run'}", f"data.out_dir={tmp_path / 'd'}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: harness train runs inside Slurm job "
                                                   "4711"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()  # refused before any work


def test_job_port_stays_below_the_ephemeral_range():
    ports = [job_port(j) for j in range(0, 60_001, 7)]
    assert min(ports) == distributed.JOB_PORT_BASE == 10000 and max(ports) <= 29999
    assert job_port(1) != job_port(2) and job_port(5) == job_port(5 + 20_000)
    # Linux's default ephemeral range starts at 32768; this machine's own setting, if readable
    low = 32768
    conf = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if conf.is_file():
        low = min(low, int(conf.read_text().split()[0]))
    assert max(ports) < low


def test_srun_task_script_uses_the_same_port(tmp_path):
    """What the Slurm tasks really use: launch/srun_task.sh exports MASTER_PORT itself."""
    (tmp_path / "scontrol").write_text("#!/bin/bash\necho n1\n")
    (tmp_path / "scontrol").chmod(0o755)
    script = Path(__file__).parents[2] / "launch" / "srun_task.sh"
    env = child_env(**{**SRUN, "SLURM_JOB_ID": "34567"}, PATH=f"{tmp_path}:/usr/bin:/bin")
    out = subprocess.run(["bash", str(script), "bash", "-c", "echo $MASTER_PORT"], env=env,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert int(out) == job_port(34567)


def test_launch_readme_states_the_port_the_code_uses():
    readme = (Path(__file__).parents[2] / "launch" / "README.md").read_text()
    flat = " ".join(readme.split())
    assert (f"{distributed.JOB_PORT_BASE} + job id % {distributed.JOB_PORT_SPAN}" in flat), \
        "launch/README.md's MASTER_PORT differs from harness.parallel.distributed.job_port"
