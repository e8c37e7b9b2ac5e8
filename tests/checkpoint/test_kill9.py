"""kill -9 at random moments (saves included), then resume: the end is bit-identical.

One run is killed 10 times, each time a random number of steps (1-12) plus a random 0-40 ms
after it got going, and restarted with the same command (checkpoint.resume=auto). Saving
every step makes kills inside a save likely. After every kill, every complete checkpoint
must load and match its checksums; none may be half-written, and no resume may have had to
set one aside.

Each life (and the reference run, which trains beside the first lives on the other core) is a
process forked from a warm interpreter (tests/forked_cli.py's forkserver: torch, DeepSpeed and
the harness imported once), running dist_worker.py's main with the same arguments: a process of
its own that kill -9 ends as it would a fresh one, without 4 s of imports per life.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_utils import child_env

from harness.checkpoint.sums import _Group, _verify, complete_checkpoints

pytestmark = pytest.mark.slow
WORKER = str(Path(__file__).parents[1] / "dist_worker.py")
ARGS = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=32",
        "model.dropout=0.1", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.max_steps=150", "optim.warmup_steps=2", "checkpoint.every=1",
        "checkpoint.keep_last=2"]


def command(out, run, shards):
    return [WORKER, str(out), "0", *ARGS, f"train.run_dir={run}", f"data.out_dir={shards}"]


def _life(argv: list[str], env: dict[str, str], log: str) -> None:
    """In the fork: dist_worker.py's main with argv, output to log, and the ending the
    interpreter gives it (atexit handlers after a clean run, exit 1 after an exception)."""
    import atexit
    import logging

    import torch

    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # read at import otherwise
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for target in (1, 2):
        os.dup2(fd, target)
    sys.argv = list(argv)
    import dist_worker

    code = 0
    try:
        dist_worker.main()
    except BaseException:  # noqa: B902 (SystemExit included, as the interpreter would)
        import traceback

        traceback.print_exc()
        code = 1
    if code == 0:
        atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Life:
    """A fork running `command`, with the part of Popen's interface the test uses."""

    def __init__(self, argv: list[str], log: Path):
        import forked_cli

        self.proc = forked_cli._forks().Process(target=_life, args=(argv, child_env(), str(log)))
        self.proc.start()
        self.pid = self.proc.pid

    def poll(self):
        return self.proc.exitcode

    @property
    def returncode(self):
        return self.proc.exitcode

    def wait(self, timeout=None):
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired("life", timeout)
        return self.proc.exitcode

    def kill(self):
        self.proc.kill()


def last_step(metrics):
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return len(lines)  # one line per step, truncated to the checkpoint on resume


def wait_for_steps(metrics, n, proc, timeout=120):
    """Until the run has logged n more steps (or ended: the caller checks how); fails after
    `timeout` s, so a slow start-up is never killed as if it were training."""
    start, deadline = last_step(metrics), time.monotonic() + timeout
    while proc.poll() is None:
        if last_step(metrics) >= start + n:
            return
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{n} steps not logged within {timeout} s (from step {start}, now "
                        f"{last_step(metrics)})")
        time.sleep(0.005)


def test_kill9_then_resume_is_bit_identical(tmp_path, shards_dir):
    started = []

    def life(out: Path, run: Path, log: str) -> Life:
        started.append(Life(command(out, run, shards_dir), tmp_path / log))
        return started[-1]

    try:
        _kill9_then_resume(tmp_path, life)
    finally:  # none left running after a failure (the reference trains beside the lives)
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)


def _kill9_then_resume(tmp_path, life):
    # the uninterrupted reference, beside the lives (each process trains on one core)
    ref = life(tmp_path / "ref", tmp_path / "ref_run", "ref.log")
    rng, run, kills = random.Random(0), tmp_path / "run", 0
    while kills < 10:
        proc = life(tmp_path / "out", run, f"life{kills}.log")
        wait_for_steps(run / "metrics.jsonl", rng.randint(1, 12), proc)
        time.sleep(rng.uniform(0.0, 0.04))
        if proc.poll() is not None:  # finished before the kill: nothing more to kill
            assert proc.returncode == 0, (tmp_path / f"life{kills}.log").read_text()[-3000:]
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        for ckpt in complete_checkpoints(run / "checkpoints"):  # none half-written
            assert (ckpt / "ds" / "mp_rank_00_model_states.pt").is_file()
            torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", weights_only=False)
            assert _verify(ckpt, _Group()) == (None, True), ckpt  # every checksum matches
    final = life(tmp_path / "out", run, "life-final.log")
    assert final.wait(timeout=300) == 0, (tmp_path / "life-final.log").read_text()[-2000:]
    assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    reference = torch.load(tmp_path / "ref" / "rank0.pt")
    assert kills >= 10
    # a kill never left a checkpoint that a resume found damaged and had to set aside
    assert not list((run / "checkpoints").glob("corrupt-*"))
    assert not any("corrupt or incomplete" in log.read_text()
                   for log in tmp_path.glob("life*.log"))
    result = torch.load(tmp_path / "out" / "rank0.pt")
    assert all(torch.equal(result[n], reference[n]) for n in reference)
