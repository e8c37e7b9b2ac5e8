"""One rank of a multi-process test run, started by torchrun (or alone for world size 1).

usage: dist_worker.py OUT_DIR STOP_AT key=value ...   (STOP_AT 0: run to max_steps)
Trains with harness.run.make_trainer and writes this rank's parameters to OUT_DIR/rankR.pt.
"""
import sys
from pathlib import Path

import torch

from engine_utils import StopAt
from harness.config import load_config
from harness.run import leave_together, make_trainer


def main() -> None:
    out, stop_at, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    trainer, _ = make_trainer(load_config("tiny", overrides))
    if stop_at:
        trainer.callbacks.insert(0, StopAt(stop_at))
    trainer.fit()
    out.mkdir(parents=True, exist_ok=True)
    params = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    torch.save(params, out / f"rank{trainer.built.dist.rank}.pt")
    leave_together()


if __name__ == "__main__":
    main()
