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


# ---- SIGTERM with W&B on: scancel, and scontrol requeue (which Slurm requeues itself) --------
# Each job logs to W&B offline, as a user without network does. Slurm's SIGTERM reaches every
# process of the job, W&B's service included (harness/callbacks/wandb_logger.py).
WANDB = ["wandb.mode=offline"]
TERM_AT = 8  # steps logged before the signal: past the step-5 checkpoint, so the stop saves


def submit_wandb(cluster, run_dir: Path, shards: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "submit", "--config", "tiny", *CONFIG, *WANDB,
         f"data.out_dir={shards}", f"train.run_dir={run_dir}"],
        env=child_env(SLURM_CONF=cluster.env["SLURM_CONF"]), capture_output=True, text=True,
        timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def wandb_rows(run_dir: Path) -> list[dict]:
    """Every step row of every offline W&B run file under the run directory."""
    from wandb_reader import read_run, run_files

    return [row for path in run_files(run_dir / "wandb")
            for row in read_run(path, timeout=5).rows("train/loss")]


def first_life(run_dir: Path, job: str) -> dict:
    """What a job left when SIGTERM ended it: its log, stop step, steps, W&B rows, and whether
    the stop's checkpoint is complete (looked at now: a later resume prunes old ones)."""
    text = log(run_dir, job)
    found = set(re.findall(r"stopped at step (\d+) \(signal (?:SIGTERM|on another rank)\)", text))
    assert len(found) == 1, f"ranks did not stop at one step: {found}\n{text}"
    stop = int(found.pop())
    return dict(dir=run_dir, job=job, log=text, stop=stop, steps=steps(run_dir),
                rows=wandb_rows(run_dir),
                saved=(run_dir / f"checkpoints/step{stop:08d}/meta.json").is_file())


@pytest.fixture(scope="module")
def terminated(slurm_cluster, jobs, shards_dir, tmp_path_factory):  # noqa: F811
    """Job C is scancel'ed, job D gets `scontrol requeue`, both a few steps past a checkpoint.
    C is then submitted again by hand; D comes back by itself (its begin time moved to now)."""
    tmp = tmp_path_factory.mktemp("slurm_term")
    c_dir, d_dir = tmp / "c", tmp / "d"
    c, d = submit_wandb(slurm_cluster, c_dir, shards_dir), submit_wandb(slurm_cluster, d_dir,
                                                                         shards_dir)
    wait_for(f"job {c}: {TERM_AT} steps", START_S, lambda: len(steps(c_dir)) >= TERM_AT)
    slurm_cluster.run("scancel", c)
    wait_for(f"job {d}: {TERM_AT} steps", START_S, lambda: len(steps(d_dir)) >= TERM_AT)
    slurm_cluster.run("scontrol", "requeue", d)
    c_info = slurm_cluster.wait(c, timeout=RUN_S)
    # the batch script's last line: the job's processes are done with the run directory
    wait_for(f"job {c}: ended", RUN_S, lambda: "not requeued by this script" in log(c_dir, c))
    out = {"c": dict(first_life(c_dir, c), info=c_info)}
    # D: Slurm requeues it; the first life's log and files, before the second begins
    wait_for(f"job {d}: requeued", RUN_S, lambda: slurm_cluster.job(d)["Restarts"] == "1"
             and slurm_cluster.job(d)["JobState"] == "PENDING")
    wait_for(f"job {d}: ended", RUN_S, lambda: "not requeued by this script" in log(d_dir, d))
    out["d"] = first_life(d_dir, d)
    slurm_cluster.run("scontrol", "update", f"jobid={d}", "StartTime=now")
    c2 = submit_wandb(slurm_cluster, c_dir, shards_dir)
    out["c"].update(again=c2, again_info=slurm_cluster.wait(c2, timeout=RUN_S))
    out["d"].update(info=slurm_cluster.wait(d, timeout=RUN_S))
    slurm_cluster.wait(jobs["a"][0], timeout=RUN_S)  # the uninterrupted reference
    return out


@pytest.mark.parametrize("which", ["c", "d"])
def test_sigterm_saves_on_both_ranks_and_w_and_b_keeps_every_step(terminated, which):
    t = terminated[which]
    stop, text = t["stop"], t["log"]
    assert TERM_AT <= stop < MAX_STEPS, text
    # both ranks stopped after the same step (one may have been told by the other first, in
    # the step's all-reduce), said what happens next, and exited 42
    lines = re.findall(r"stopped at step \d+ \(signal (?:SIGTERM|on another rank)\): checkpoint "
                       r"saved; exit code 42: SIGTERM is Slurm ending the job", text)
    assert len(lines) == 2, text
    assert "got SIGTERM: Slurm is ending the job" in text and "not requeued by this script" in text
    assert "Traceback" not in text and "unexpected" not in text, text
    assert t["saved"], text
    assert t["steps"] == list(range(1, stop + 1))
    # the killed service lost rows (it writes in batches); they were logged again after the save
    assert "SIGTERM reached W&B's service too" in text, text
    assert sorted(r["train/step"] for r in t["rows"]) == list(range(1, stop + 1))


def test_scancel_is_not_requeued_and_a_resubmission_resumes_bit_identically(slurm_cluster,  # noqa: F811
                                                                            terminated, jobs):
    c = terminated["c"]
    assert c["info"]["JobState"] == "CANCELLED" and c["info"]["Restarts"] == "0", c["log"]
    assert c["again_info"]["JobState"] == "COMPLETED", log(c["dir"], c["again"])
    _resumed_exactly(c["dir"], log(c["dir"], c["again"]), c["stop"], jobs)


def test_scontrol_requeue_comes_back_by_itself_and_resumes_bit_identically(terminated, jobs):
    d = terminated["d"]
    assert d["info"]["JobState"] == "COMPLETED" and d["info"]["Restarts"] == "1", d["log"]
    _resumed_exactly(d["dir"], log(d["dir"], d["job"]), d["stop"], jobs)


def _resumed_exactly(run_dir: Path, text: str, stop: int, jobs) -> None:
    assert f"resumed from {run_dir}/checkpoints/step{stop:08d} at step {stop}" in text, text
    assert steps(run_dir) == list(range(1, MAX_STEPS + 1))  # every step exactly once
    assert sorted(r["train/step"] for r in wandb_rows(run_dir)) == list(range(1, MAX_STEPS + 1))
    resumed, straight = final_params(run_dir), final_params(jobs["a"][1])
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
