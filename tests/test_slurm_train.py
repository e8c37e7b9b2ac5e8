"""`harness submit` on a real 2-node Slurm cluster (tests/slurm_cluster.sh): the real trainer, one
task per node, gloo across the nodes' network namespaces. Job A trains uninterrupted; job B, the
same config, gets USR1 (what --signal=B:USR1@grace sends before the time limit) a few steps in,
saves, exits 42, requeues itself, resumes and must end bit-identical to A."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_utils import child_env
from slurm_fixtures import slurm_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

MAX_STEPS = 60
# dropout on: the resumed ranks must also restore their RNG states to match
CONFIG = ["slurm.nodes=2", "slurm.gpus_per_node=0", "slurm.cpus_per_task=1",
          "slurm.time=0-00:10:00", "model.n_layer=2", "model.d_model=32", "model.n_head=2",
          "model.block_size=32", "model.dropout=0.1", "train.global_batch_size=8",
          "train.micro_batch_size=2", f"train.max_steps={MAX_STEPS}", "checkpoint.every=5"]
# each wait has its own limit; startup (torch + deepspeed imports, 2 ranks on 2 shared cores)
# dominates, so the limits are generous against a loaded machine
START_S, RUN_S, REQUEUE_S = 120, 150, 60


def submit(cluster, run_dir: Path, shards: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "submit", "--config", "tiny", *CONFIG,
         f"data.out_dir={shards}", f"train.run_dir={run_dir}"],
        env=child_env(SLURM_CONF=cluster.env["SLURM_CONF"]), capture_output=True, text=True,
        timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    assert job.isdigit(), f"submit printed no job id: {proc.stdout!r}"
    return job


def wait_for(what: str, timeout: float, check):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.1)
    return result


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    # a line may be half-written while the job runs; event lines carry no loss
    return [rec["step"] for rec in map(_json, lines) if rec and "train/loss" in rec]


def _json(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def log(run_dir: Path, job: str) -> str:
    return (run_dir / f"slurm-{job}.out").read_text()


def final_params(run_dir: Path) -> dict:
    path = run_dir / f"checkpoints/step{MAX_STEPS:08d}/ds/mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def jobs(slurm_cluster, shards_dir, tmp_path_factory):  # noqa: F811
    """Submits A and B together (they share the nodes' CPUs), preempts B, times the way back."""
    tmp = tmp_path_factory.mktemp("slurm_train")
    a_dir, b_dir = tmp / "a", tmp / "b"
    a, b = submit(slurm_cluster, a_dir, shards_dir), submit(slurm_cluster, b_dir, shards_dir)

    wait_for(f"job {b}: 3 steps in metrics.jsonl", START_S, lambda: len(steps(b_dir)) >= 3)
    signalled = time.time()
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", b)
    times = {}
    stop = None

    def back_running():
        nonlocal stop
        info = slurm_cluster.job(b)
        now = time.time()
        if info["Restarts"] == "1" and "requeued" not in times:
            times["requeued"] = now
            # the resumed job prunes old checkpoints: look at the signal's one now, while the
            # requeued job waits out its begin time
            found = set(re.findall(r"stopped at step (\d+)", log(b_dir, b)))
            assert len(found) == 1, f"ranks did not stop at one step: {found}\n{log(b_dir, b)}"
            stop = int(found.pop())
            meta = b_dir / f"checkpoints/step{stop:08d}/meta.json"
            times["saved"] = meta.stat().st_mtime
        if "requeued" in times and info["JobState"] == "RUNNING":
            times["running"] = now
        return "running" in times

    wait_for(f"job {b}: requeued and running again after USR1", REQUEUE_S, back_running)
    report = f"job {b}, USR1 at step {stop}: " + ", ".join(
        f"{event} after {times[event] - signalled:.2f} s"
        for event in ("saved", "requeued", "running"))
    print(f"\n{report}")
    (tmp / "preemption_timings.txt").write_text(report + "\n")
    return {"a": (a, a_dir), "b": (b, b_dir), "stop": stop}


def test_submit_trains_on_two_nodes(slurm_cluster, jobs):  # noqa: F811
    job, run_dir = jobs["a"]
    info = slurm_cluster.wait(job, timeout=RUN_S)
    text = log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", text
    assert info["NodeList"] == "n[1-2]" and "training finished" in text
    # 8 samples per step = micro 2 x accumulation 2 x 2 data-parallel ranks
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2, ds
    assert steps(run_dir) == list(range(1, MAX_STEPS + 1))


def test_usr1_requeues_and_resumes_bit_identically(slurm_cluster, jobs):  # noqa: F811
    (job, run_dir), stop = jobs["b"], jobs["stop"]
    info = slurm_cluster.wait(job, timeout=RUN_S)
    text = log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert 3 <= stop < MAX_STEPS, text
    # 143 here: srun --kill-on-bad-exit sent TERM to a rank still on its way out with 42
    assert "requeueing (step exit code 42, after SIGUSR1)" in text, text
    assert f"resumed from {run_dir}/checkpoints/step{stop:08d} at step {stop}" in text
    assert steps(run_dir) == list(range(1, MAX_STEPS + 1))  # every step exactly once

    a_job, a_dir = jobs["a"]
    slurm_cluster.wait(a_job, timeout=RUN_S)
    resumed, straight = final_params(run_dir), final_params(a_dir)
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
