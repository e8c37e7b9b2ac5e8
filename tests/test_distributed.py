"""Data parallelism across real processes on gloo (torchrun), and resuming on fewer ranks."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_utils import ROUNDING_TOL, child_env, max_diff, retry_on_port_clash, torchrun

pytestmark = pytest.mark.slow
WORKER = str(Path(__file__).with_name("dist_worker.py"))
BASE = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=32",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=6",
        "optim.warmup_steps=2", "checkpoint.every=0"]


def launch(nproc, out, run_dir, shards, stop_at=0, *extra, launcher="torchrun"):
    args = [str(out), str(stop_at), *BASE, f"train.run_dir={run_dir}", f"data.out_dir={shards}",
            *extra]

    def run(cmd):
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
        return proc, proc.stdout + proc.stderr

    if nproc == 1:
        proc, _ = run([sys.executable, WORKER, *args])
    elif launcher == "deepspeed":  # it needs a port up front: a new one if rank 0 finds it taken
        proc = retry_on_port_clash(lambda port: run(
            [str(Path(sys.executable).with_name("deepspeed")), f"--num_gpus={nproc}",
             f"--master_port={port}", "--no_local_rank", WORKER, *args]))
    else:
        proc, _ = run(torchrun(nproc, WORKER, *args))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, shards_dir):
    tmp = tmp_path_factory.mktemp("one")
    return launch(1, tmp / "out", tmp / "run", shards_dir)[0]


@pytest.mark.parametrize("stage", [0, 2])
def test_two_ranks_agree_and_match_one_rank(tmp_path, shards_dir, one_rank, stage):
    r0, r1 = launch(2, tmp_path / "out", tmp_path / "run", shards_dir, 0, f"zero.stage={stage}")
    assert max_diff(r0, r1) == 0.0
    # 2 ranks x accumulation 2 vs 1 rank x accumulation 4: the same 8 samples per step
    assert max_diff(r0, one_rank) <= ROUNDING_TOL


def test_deepspeed_launcher_trains_like_torchrun(tmp_path, shards_dir):
    torchrun = launch(2, tmp_path / "a", tmp_path / "ra", shards_dir)
    deepspeed = launch(2, tmp_path / "b", tmp_path / "rb", shards_dir, launcher="deepspeed")
    assert max_diff(torchrun[0], deepspeed[0]) == 0.0 and max_diff(deepspeed[0], deepspeed[1]) == 0.0


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path, shards_dir, one_rank):
    run = tmp_path / "run"
    launch(2, tmp_path / "a", run, shards_dir, 3)  # stops after step 3 and saves
    (resumed,) = launch(1, tmp_path / "b", run, shards_dir)  # accumulation re-derived: 4
    assert max_diff(resumed, one_rank) <= ROUNDING_TOL
