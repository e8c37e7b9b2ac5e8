"""One rank of tests/test_norms_across_ranks.py, started by torchrun.

usage: norm_worker.py OUT_DIR key=value ...
Trains on the synthetic tokens of engine_utils with the real engine and writes rank R's
per-step metrics and gathered parameters to OUT_DIR/rankR.pt.
"""
import sys
from pathlib import Path

import torch

from engine_utils import run_harness, small_cfg
from harness.callbacks.throughput import Throughput
from harness.run import leave_together


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = small_cfg(*overrides)
    dtype = torch.float32
    params, metrics, built = run_harness(cfg, dtype, callbacks=[Throughput()])
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"metrics": metrics, "params": params, "calls": built.comm.calls},
               out / f"rank{built.dist.rank}.pt")
    leave_together()


if __name__ == "__main__":
    main()
