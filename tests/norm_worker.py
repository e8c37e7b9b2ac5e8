"""One rank of tests/parallel/test_norms_across_ranks.py (and test_tensor_parallel.py), started by
torchrun.

usage: norm_worker.py OUT_DIR key=value ...
       norm_worker.py --cases CASES.json OUT_DIR   (JSON {case id: [key=value, ...]})
Trains on the synthetic tokens of engine_utils with the real engine and writes rank R's
per-step metrics and gathered parameters to OUT_DIR/rankR.pt; with --cases, each case in turn
in these processes (an engine each, one process group), to OUT_DIR/<case id>/rankR.pt
(tests/batched.py: a failed case writes its traceback there instead and ends the ranks).
"""
import sys
from pathlib import Path

import torch
from batched import run_cases
from engine_utils import run_harness, small_cfg

from harness.callbacks.memory import PeakMemory
from harness.callbacks.throughput import Throughput
from harness.train.run import leave_together


def train(out: Path, overrides: list[str]) -> None:
    cfg = small_cfg(*overrides)
    params, metrics, built = run_harness(cfg, torch.float32, callbacks=[Throughput(), PeakMemory()])
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"metrics": metrics, "params": params, "calls": built.comm.calls},
               out / f"rank{built.dist.rank}.pt")


def main() -> None:
    run_cases(sys.argv[1:], train)
    leave_together()


if __name__ == "__main__":
    main()
