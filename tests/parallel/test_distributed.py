"""Data parallelism across real processes on gloo (torchrun), and resuming on fewer ranks.

The 2-rank runs under torchrun share one launch (tests/batched.py: the ranks train each case
in turn, an engine each); the deepspeed launcher gets its own; the 1-rank runs train in this
process (as tests/checkpoint/test_resume.py's do)."""
import subprocess
import sys
from pathlib import Path

import batched
import pytest
import torch
from engine_utils import (ROUNDING_TOL, child_env, final_params, max_diff, retry_on_port_clash,
                          torchrun)

from harness.config import load_config

pytestmark = pytest.mark.slow
WORKER = str(Path(__file__).parents[1] / "dist_worker.py")
BASE = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=32",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=6",
        "optim.warmup_steps=2", "checkpoint.every=0"]
# case: (stop after this step (0: run to the end), overrides)
TWO_RANK_CASES = {"stage0": (0, ["zero.stage=0"]), "stage2": (0, ["zero.stage=2"]),
                  "stop3": (3, [])}  # stops after step 3 and saves


def overrides(run_dir, shards, *extra) -> list[str]:
    return [*BASE, f"train.run_dir={run_dir}", f"data.out_dir={shards}", *extra]


def ranks(d: Path, nproc: int = 2) -> list[dict]:
    return [torch.load(d / f"rank{r}.pt") for r in range(nproc)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, shards_dir) -> batched.Outcome:
    """Every 2-rank torchrun run of this module, in one launch: OUT/<case>/rankR.pt, the run
    directory of case C in RUNS/C."""
    tmp = tmp_path_factory.mktemp("two")
    out, runs = tmp / "out", tmp / "runs"
    cases = {case: {"stop_at": stop, "overrides": overrides(runs / case, shards_dir, *extra)}
             for case, (stop, extra) in TWO_RANK_CASES.items()}
    outcome = batched.launch(lambda spec: torchrun(2, WORKER, "--cases", str(spec), str(out)),
                             out, cases, child_env())
    outcome.runs = runs
    return outcome


def one_rank_params(run_dir, shards) -> dict:
    """A 1-rank run in this process: accumulation re-derived (global batch 8 = 2 x 4)."""
    return final_params(load_config("tiny", overrides(run_dir, shards)))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, shards_dir):
    return one_rank_params(tmp_path_factory.mktemp("one") / "run", shards_dir)


@pytest.mark.parametrize("stage", [0, 2])
def test_two_ranks_agree_and_match_one_rank(two_ranks, one_rank, stage):
    r0, r1 = ranks(two_ranks.dir(f"stage{stage}"))
    assert max_diff(r0, r1) == 0.0
    # 2 ranks x accumulation 2 vs 1 rank x accumulation 4: the same 8 samples per step
    assert max_diff(r0, one_rank) <= ROUNDING_TOL


def test_deepspeed_launcher_trains_like_torchrun(tmp_path, shards_dir, two_ranks):
    # torchrun's side: the stage0 case, the same config (zero.stage defaults to 0)
    assert load_config("tiny", BASE).zero.stage == 0
    torchrun_ranks = ranks(two_ranks.dir("stage0"))
    args = [str(tmp_path / "b"), "0", *overrides(tmp_path / "rb", shards_dir)]

    def run(cmd):
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
        return proc, proc.stdout + proc.stderr

    # it needs a port up front: a new one if rank 0 finds it taken
    proc = retry_on_port_clash(lambda port: run(
        [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus=2",
         f"--master_port={port}", "--no_local_rank", WORKER, *args]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deepspeed = ranks(tmp_path / "b")
    assert max_diff(torchrun_ranks[0], deepspeed[0]) == 0.0
    assert max_diff(deepspeed[0], deepspeed[1]) == 0.0


def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks, shards_dir, one_rank):
    two_ranks.dir("stop3")  # the 2-rank run that stopped after step 3 and saved
    resumed = one_rank_params(two_ranks.runs / "stop3", shards_dir)  # accumulation: 4
    assert max_diff(resumed, one_rank) <= ROUNDING_TOL
