"""A rank that goes away mid-run (harness/parallel/peers.py): the survivor says in one line which
rank on which host, and exits with LOST_RANK_EXIT_CODE, with two real `harness train` ranks on gloo.

- kill -9 of rank 1 (a crash, the OOM killer): gloo tells rank 0 at once ("Connection closed by
  peer"); the roll call names rank 1.
- SIGSTOP of rank 1 (a node lost without a word: no socket is closed): rank 0 waits in its
  collective until parallel.collective_timeout_s (here 10 s), then names rank 1 the same way.
The two pairs are launched one after the other and checked separately. The 2-node Slurm
cluster is not used: what differs there (hosts) is the host table's, tested with the cluster
in tests/slurm/test_slurm_tp.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_utils import child_env, retry_on_port_clash

from harness.parallel.peers import LOST_RANK_EXIT_CODE, ROLL_CALL_S

pytestmark = pytest.mark.slow
TIMEOUT_S = 10
ARGS = ["--config", "tiny", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
        "model.block_size=32", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.max_steps=100000", "optim.warmup_steps=1", "checkpoint.every=0",
        "data.eval_every=0", f"parallel.collective_timeout_s={TIMEOUT_S}"]


def start_pair(run_dir: Path, shards: Path, port: int) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "harness.cli", "train", *ARGS, f"data.out_dir={shards}",
           f"train.run_dir={run_dir}"]
    return [subprocess.Popen(cmd, env=child_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in (0, 1)]


def training_pair(run_dir: Path, shards: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Two ranks past their third step. Started by hand (torchrun's agent would end the
    survivor itself), so with a port picked up front: again with a new one when rank 0 found
    it taken (engine_utils.retry_on_port_clash)."""
    def launch(port):
        shutil.rmtree(run_dir, ignore_errors=True)
        rank0, rank1 = start_pair(run_dir, shards, port)
        deadline = time.monotonic() + 240
        while steps(run_dir) < 3:  # training, not starting up
            if rank0.poll() is not None:
                rank1.kill()
                err = rank0.stderr.read() + rank1.communicate()[1]
                return None, err
            assert time.monotonic() < deadline, "3 steps not logged within 240 s"
            time.sleep(0.1)
        return (rank0, rank1), ""

    pair = retry_on_port_clash(launch)
    assert pair is not None, "rank 0 ended before its third step"
    return pair


def steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def lost(tmp_path_factory, shards_dir):
    tmp = tmp_path_factory.mktemp("lost_rank")
    pairs = {}
    for how in ("kill", "stop"):
        rank0, rank1 = training_pair(tmp / how, shards_dir)
        os.kill(rank1.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        pairs[how] = (tmp / how, rank0, rank1, time.monotonic())
    out = {}
    for how, (run_dir, rank0, rank1, when) in pairs.items():
        try:
            _, stderr = rank0.communicate(timeout=TIMEOUT_S + ROLL_CALL_S + 60)
        finally:
            rank1.kill()
            rank1.communicate()
        out[how] = (rank0.returncode, stderr, time.monotonic() - when)
    return out


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_the_survivor_names_the_rank_that_went_away(lost, how):
    code, stderr, _ = lost[how]
    host = socket.gethostname()
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert code == LOST_RANK_EXIT_CODE, stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert errors[0].startswith(f"error: rank 0 ({host}): a collective failed and rank 1 "
                                f"({host}) did not answer within {ROLL_CALL_S:g} s"), errors
    assert f"parallel.collective_timeout_s={TIMEOUT_S}" in errors[0]


def test_a_silent_rank_is_given_up_on_after_the_timeout(lost):
    # kill: gloo notices the closed socket at once; stop: only the timeout ends the wait
    _, kill_err, kill_s = lost["kill"]
    _, stop_err, stop_s = lost["stop"]
    assert "Timed out" in stop_err and "Timed out" not in kill_err
    assert stop_s >= TIMEOUT_S
