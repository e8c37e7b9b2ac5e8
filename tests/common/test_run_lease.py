"""One writer per run directory (harness/common/lease.py, issue 32).

Fast, in-process: take / refuse / stale / another host's fresh heartbeat / same Slurm job /
dead holder's takeover, the heartbeat, the refusal line, and `harness submit` / `prepare-data`
exiting 2 on a held directory. The holders are real processes (HOLDER below), so the locks are
real flock()s. Slow: two real `harness train` on one run directory, a `harness train` killed
with SIGKILL whose lease the next start takes over, and the same job submitted twice to the
2-node Slurm test cluster.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_utils import child_env
from slurm_fixtures import slurm_cluster  # noqa: F401  (fixture: the 2-node cluster)

from harness import cli
from harness.common import lease as run_lease
from harness.common.errors import HarnessError
from harness.common.lease import LOCK_SUFFIX, RUN_LEASE

# takes the lease of the record in argv[1], says so, and holds it until killed
HOLDER = """
import sys, time
from pathlib import Path
from harness.common import lease as run_lease
record = Path(sys.argv[1])
run_lease.take(record, "train.run_dir", record.parent, "set train.run_dir elsewhere")
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(autouse=True)
def _quick(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(run_lease, "LOCK_RETRY_S", 0.2)
    yield
    run_lease.release_all()  # this process's leases of this test (tmp dirs go away)


@pytest.fixture
def holders():
    """start(record, **env) -> a process holding the lease; all killed at the end."""
    procs = []

    def start(record: Path, **env) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(record)], text=True,
                                stdout=subprocess.PIPE, env=child_env(**env))
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def record_of(run_dir: Path) -> Path:
    return run_dir / RUN_LEASE


def write_record(record: Path, **fields) -> None:
    """A record as a holder elsewhere would leave it (no process behind it here)."""
    record.parent.mkdir(parents=True, exist_ok=True)
    holder = {"pid": 4242, "host": "elsewhere", "job": None, "started": "then",
              "heartbeat": time.time(), "token": "theirs", **fields}
    record.write_text(json.dumps(holder))


def take(run_dir: Path) -> run_lease.Lease:
    return run_lease.take(record_of(run_dir), "train.run_dir", run_dir, "ANOTHER")


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "harness" and r.levelno >= logging.WARNING]


# ---- the lease itself ------------------------------------------------------------------------
def test_a_free_directory_is_taken_and_released_without_a_trace(tmp_path):
    run_dir = tmp_path / "new" / "run"
    lease = take(run_dir)
    record = json.loads(record_of(run_dir).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["job"] is None and record["token"] == lease.token
    assert take(run_dir) is lease  # this process again (a second make_trainer): the same
    lease.release()
    lease.release()  # idempotent: finally and atexit paths both call it
    assert not (tmp_path / "new" / "run").exists()  # made by take, removed empty
    run_dir.mkdir(parents=True)
    take(run_dir).release()
    assert list(run_dir.iterdir()) == []  # both files gone, the directory kept


def test_a_live_holder_is_refused_with_one_line_naming_it(tmp_path, holders, caplog):
    holder = holders(record_of(tmp_path), SLURM_JOB_ID="1234")
    before = record_of(tmp_path).read_text()
    with pytest.raises(HarnessError) as info:
        take(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"train.run_dir={tmp_path} is in use by another "
                                              f"writer: pid {holder.pid} on host "
                                              f"{socket.gethostname()} (Slurm job 1234), started ")
    assert f"(`scancel 1234`, or `kill {holder.pid}` on {socket.gethostname()})" in msg
    assert msg.endswith(", or ANOTHER")
    assert record_of(tmp_path).read_text() == before  # the holder's record untouched
    assert not warnings_of(caplog)


def test_a_holder_killed_with_sigkill_is_taken_over_with_one_warning(tmp_path, holders,
                                                                     caplog):
    holder = holders(record_of(tmp_path))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert record_of(tmp_path).exists()  # left behind: nobody released it
    lease = take(tmp_path)
    (line,) = warnings_of(caplog)
    assert f"took over the lease left by pid {holder.pid} on host {socket.gethostname()}" in line
    assert "that writer is gone (its lock is free)" in line
    assert json.loads(record_of(tmp_path).read_text())["token"] == lease.token


def test_another_hosts_fresh_heartbeat_is_respected(tmp_path, caplog):
    # no lock held here: a filesystem that does not carry flock across nodes
    write_record(record_of(tmp_path), job="77")
    with pytest.raises(HarnessError) as info:
        take(tmp_path)
    msg = str(info.value)
    assert "pid 4242 on host elsewhere (Slurm job 77)" in msg and "`scancel 77`" in msg
    assert "if that process is gone, its lease expires in " in msg
    # the same record with its heartbeat stale: taken over, with one warning
    write_record(record_of(tmp_path), heartbeat=time.time() - run_lease.STALE_AFTER_S - 1)
    take(tmp_path)
    (line,) = warnings_of(caplog)
    assert "left by pid 4242 on host elsewhere" in line and "no heartbeat for 9" in line


def test_a_dead_pid_on_this_host_is_taken_over(tmp_path, caplog):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that was, and is no more
    write_record(record_of(tmp_path), pid=proc.pid, host=socket.gethostname())
    take(tmp_path)
    (line,) = warnings_of(caplog)
    assert f"left by pid {proc.pid} on host {socket.gethostname()}" in line


def test_the_same_slurm_job_takes_over_its_previous_lease(tmp_path, holders, monkeypatch,
                                                          caplog):
    """A requeued job is the same run: its previous incarnation's lease is its own, taken
    over without a warning once that incarnation is gone (waited for while it still beats)."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    write_record(record_of(tmp_path), job="77", host=socket.gethostname())
    take(tmp_path).release()
    monkeypatch.setattr(run_lease, "STALE_AFTER_S", 1.0)
    write_record(record_of(tmp_path), job="77")  # another node's, beating a moment ago
    start = time.monotonic()
    take(tmp_path)
    assert 0.5 < time.monotonic() - start < 5  # waited for its heartbeat to go stale
    assert not warnings_of(caplog)
    # another job's lease is refused at once, live on this host
    holder = holders(record_of(tmp_path / "b"), SLURM_JOB_ID="78")
    with pytest.raises(HarnessError, match=f"pid {holder.pid} .*Slurm job 78"):
        take(tmp_path / "b")


def test_the_heartbeat_refreshes_the_record(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lease, "HEARTBEAT_S", 0.1)
    lease = take(tmp_path)
    first = json.loads(record_of(tmp_path).read_text())["heartbeat"]
    deadline = time.monotonic() + 5
    while json.loads(record_of(tmp_path).read_text())["heartbeat"] == first:
        assert time.monotonic() < deadline, "no heartbeat in 5 s"
        time.sleep(0.05)
    assert json.loads(record_of(tmp_path).read_text())["token"] == lease.token


def test_a_lease_taken_over_is_noticed_and_never_removed(tmp_path, caplog):
    lease = take(tmp_path)
    write_record(record_of(tmp_path))  # another writer judged us gone
    lease.beat()
    assert lease.lost and "taken over by pid 4242 on host elsewhere" in caplog.text
    lease.release()
    assert json.loads(record_of(tmp_path).read_text())["token"] == "theirs"  # theirs stays


def test_check_takes_nothing_and_creates_nothing(tmp_path, holders):
    run_lease.check(record_of(tmp_path), "train.run_dir", tmp_path, "ANOTHER")
    assert list(tmp_path.iterdir()) == []
    holders(record_of(tmp_path))
    with pytest.raises(HarnessError, match="is in use by another writer"):
        run_lease.check(record_of(tmp_path), "train.run_dir", tmp_path, "ANOTHER")


def test_a_run_directory_with_a_lease_is_not_foreign(tmp_path):
    from harness.config import load_config
    from harness.train.run_dir import claim_run_dir

    for name in (RUN_LEASE, RUN_LEASE + LOCK_SUFFIX, RUN_LEASE + ".tmp-123"):
        (tmp_path / name).write_text("")
    claim_run_dir(load_config("tiny", [f"train.run_dir={tmp_path}"]), rank=0)  # no refusal


# ---- the commands: one line, exit 2 ----------------------------------------------------------
def test_submit_on_a_held_run_directory_exits_2(tmp_path, holders, capsys):
    run_dir = tmp_path / "run"
    holder = holders(record_of(run_dir), SLURM_JOB_ID="555")
    code = cli.main(["submit", "--config", "tiny", f"train.run_dir={run_dir}",
                     f"data.out_dir={tmp_path / 'data'}", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = err.splitlines()
    assert line.startswith(f"error: train.run_dir={run_dir} is in use by another writer: "
                           f"pid {holder.pid}")
    assert "`scancel 555`" in line and "set train.run_dir to another directory" in line
    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_LEASE, RUN_LEASE + LOCK_SUFFIX]


def test_prepare_data_into_a_held_directory_exits_2(tmp_path, holders, capsys):
    out = tmp_path / "shards"
    holder = holders(tmp_path / f".shards{RUN_LEASE}")
    code = cli.main(["prepare-data", f"data.out_dir={out}", "data.max_bytes=20000"])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = err.splitlines()
    assert line.startswith(f"error: data.out_dir={out} is in use by another writer: pid "
                           f"{holder.pid}")
    assert "prepare into another data.out_dir" in line
    assert not out.exists() and not list(tmp_path.glob(".shards.tmp-*"))


# ---- real `harness train` processes ----------------------------------------------------------
MAX_STEPS = 60
TRAIN = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=32",
         "train.global_batch_size=8", "train.micro_batch_size=4", f"train.max_steps={MAX_STEPS}",
         "optim.warmup_steps=2", "checkpoint.every=5", "data.eval_every=0", "train.log_every=20",
         "wandb.mode=disabled"]
START_S = 180  # torch + deepspeed imports of two processes on two shared cores


def train_cmd(run_dir: Path, shards: Path) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "train", "--config", "tiny", *TRAIN,
            f"train.run_dir={run_dir}", f"data.out_dir={shards}"]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "train/loss" in rec:
            out.append(rec)
    return out


def final_params(run_dir: Path) -> dict:
    import torch

    path = run_dir / f"checkpoints/step{MAX_STEPS:08d}/ds/mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def harness_lines(text: str, level: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(f"{level} harness:")]


@pytest.mark.slow
def test_a_second_train_refuses_and_a_killed_ones_lease_is_taken_over(tmp_path, shards_dir):
    """`first` trains in A; a second `harness train` on A while first runs (held stopped, so
    that "while" holds on any machine) refuses with one line and exit 2, and first then ends
    bit-identical to `alone`, an uninterrupted run in C. `killed`, a run in B, is killed with
    SIGKILL after a checkpoint and restarted: the restart takes the dead run's lease over with
    one warning, and ends bit-identical too."""
    import torch

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    env = child_env()
    env.pop("SLURM_JOB_ID", None)
    run = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": env}
    first = subprocess.Popen(train_cmd(a, shards_dir), **run)
    killed = subprocess.Popen(train_cmd(b, shards_dir), **run)
    alone = subprocess.Popen(train_cmd(c, shards_dir), **run)
    try:
        # both watched at once, each stopped as soon as it gets there, however they run
        pending = {first: (a, 3, signal.SIGSTOP),  # mid-run, its lease held
                   killed: (b, 7, signal.SIGKILL)}  # past its step-5 checkpoint
        deadline = time.monotonic() + START_S
        while pending:
            for proc, (run_dir, n, sig) in list(pending.items()):
                assert proc.poll() is None, f"{run_dir}: exited {proc.returncode} too soon"
                if len(metrics(run_dir)) >= n:
                    proc.send_signal(sig)
                    del pending[proc]
            assert time.monotonic() < deadline, f"not every run started in {START_S} s"
            time.sleep(0.005)
        killed.communicate(timeout=60)
        assert (b / RUN_LEASE).exists() and (b / f"{RUN_LEASE}{LOCK_SUFFIX}").exists()
        restart = subprocess.Popen(train_cmd(b, shards_dir), **run)
        second = subprocess.run(train_cmd(a, shards_dir), timeout=START_S, **run)
        first.send_signal(signal.SIGCONT)
        _, restart_err = restart.communicate(timeout=START_S)
        _, first_err = first.communicate(timeout=START_S)
        _, alone_err = alone.communicate(timeout=START_S)
    finally:
        for proc in (first, killed, alone):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
    # the second: one line naming the first, exit 2, nothing of the first's touched
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: train.run_dir={a} is in use by another writer: pid "
                           f"{first.pid} on host {socket.gethostname()}, started "), line
    assert f"`kill {first.pid}` on {socket.gethostname()}" in line
    assert "set train.run_dir to another directory to start a separate run" in line
    assert "Traceback" not in second.stderr and not list(a.glob("traceback-*"))
    # the first: as if alone (compared below)
    assert first.returncode == 0, first_err[-3000:]
    assert not harness_lines(first_err, "WARNING"), first_err[-3000:]
    # the restart of the killed run: one warning, naming the dead holder
    assert restart.returncode == 0, restart_err[-3000:]
    (warning,) = harness_lines(restart_err, "WARNING")
    assert f"took over the lease left by pid {killed.pid} on host {socket.gethostname()}" \
           in warning and "its lock is free" in warning
    assert alone.returncode == 0, alone_err[-3000:]
    reference, params = metrics(c), final_params(c)
    for run_dir in (a, b):
        assert [r["step"] for r in metrics(run_dir)] == list(range(1, MAX_STEPS + 1))
        assert [r["train/loss"] for r in metrics(run_dir)] == \
               [r["train/loss"] for r in reference], run_dir
        mine = final_params(run_dir)
        assert mine.keys() == params.keys()
        for name in mine:
            assert torch.equal(mine[name], params[name]), (run_dir, name)
    for run_dir in (a, b, c):  # released at the end: the next writer finds no lease
        assert not list(run_dir.glob(f"{RUN_LEASE}*"))


# ---- the 2-node Slurm test cluster -----------------------------------------------------------
SLURM = ["slurm.nodes=2", "slurm.gpus_per_node=0", "slurm.cpus_per_task=1",
         "slurm.time=0-00:10:00", *TRAIN]


def harness_submit(cluster, run_dir: Path, shards: Path) -> subprocess.CompletedProcess:
    env = child_env(SLURM_CONF=cluster.env["SLURM_CONF"])
    env.pop("SLURM_JOB_ID", None)  # the login node's
    return subprocess.run([sys.executable, "-m", "harness.cli", "submit", "--config", "tiny",
                           *SLURM, f"data.out_dir={shards}", f"train.run_dir={run_dir}"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def wait_until(what: str, timeout: float, check):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.1)
    return result


@pytest.mark.slow
def test_the_same_job_submitted_twice_one_trains_one_refuses(
        slurm_cluster, tmp_path, shards_dir):  # noqa: F811
    """The first job trains on both nodes; while it runs, `harness submit` of the same job
    refuses on the login node (writing nothing), and the same batch script sbatch-ed again
    fails at start-up with exit 2, not requeued; the first finishes with every step once and
    its checkpoints intact."""
    from harness.checkpoint.sums import _Group, _verify, complete_checkpoints

    cluster = slurm_cluster
    run_dir = tmp_path / "run"
    proc = harness_submit(cluster, run_dir, shards_dir)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.strip()

    def held_and_training():
        record = run_lease._read(run_dir / RUN_LEASE)
        return record if record and record.job == first and metrics(run_dir) else None

    holder = wait_until(f"job {first} training", START_S, held_and_training)
    assert holder.host != socket.gethostname()  # rank 0, on a node, not the login host
    # its rank 0 held mid-run (same PID namespace as the nodes), so that the second job
    # starts while the first runs however fast this machine is
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        script = (run_dir / "train.sbatch").read_bytes()
        config = (run_dir / "job_config.yaml").read_bytes()
        again = harness_submit(cluster, run_dir, shards_dir)
        assert again.returncode == 2, again.stderr
        (line,) = again.stderr.splitlines()
        assert line.startswith(f"error: train.run_dir={run_dir} is in use by another writer: "
                               f"pid {holder.pid} on host {holder.host} (Slurm job {first})")
        assert f"`scancel {first}`" in line, line
        assert (run_dir / "train.sbatch").read_bytes() == script  # nothing replaced
        assert (run_dir / "job_config.yaml").read_bytes() == config
        second = cluster.sbatch(run_dir / "train.sbatch")
        refused = cluster.wait(second, timeout=START_S)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    text = (run_dir / f"slurm-{second}.out").read_text()
    assert refused["JobState"] == "FAILED" and refused["ExitCode"] == "2:0", (refused, text)
    assert refused["Restarts"] == "0", text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and all(f"Slurm job {first}" in ln and f"`scancel {first}`" in ln
                          for ln in errors), text
    assert "Traceback" not in text and "job step failed with exit code 2" in text

    done = cluster.wait(first, timeout=START_S)
    log_text = (run_dir / f"slurm-{first}.out").read_text()
    assert done["JobState"] == "COMPLETED" and done["Restarts"] == "0", log_text
    assert "training finished" in log_text
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, MAX_STEPS + 1))
    checkpoints = complete_checkpoints(run_dir / "checkpoints")
    assert checkpoints[-1].name == f"step{MAX_STEPS:08d}"
    for ckpt in checkpoints:
        assert _verify(ckpt, _Group()) == (None, True), ckpt
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert not list(run_dir.glob(f"{RUN_LEASE}*"))  # released at the end
