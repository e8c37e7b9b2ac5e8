"""One rank of tests/callbacks/test_evaluator.py's multi-process runs, started by torchrun.

usage: eval_worker.py OUT_DIR key=value ...
       eval_worker.py --cases CASES.json OUT_DIR   (JSON {case id: [key=value, ...]})
Trains through harness.train.run.make_trainer (which builds the Evaluator as `harness train` does),
then writes the full parameters (gathered at ZeRO 3) to OUT_DIR/params.pt on rank 0; with
--cases, each case in turn in these processes (an engine each, one process group), to
OUT_DIR/<case id>/params.pt (tests/batched.py).

At ZeRO 3 a small model keeps its parameters gathered from one forward to the next (under
DeepSpeed's stage3_param_persistence_threshold, max_reuse_distance and max_live_parameters),
so a rank's extra forward would make no collective and the test could not fail. Those are set
to 0 here: every forward all-gathers every parameter, as a large model's does (32 all-gathers
per forward on the test's model; with them the old evaluator hung at the uneven batch).
"""
import sys
from pathlib import Path

import torch
from batched import run_cases
from engine_utils import full_params

import harness.train.engine
from harness.config import load_config
from harness.train.run import leave_together, make_trainer


def _gather_in_every_forward(build_ds_config):
    def build(cfg, plan, device):
        ds = build_ds_config(cfg, plan, device)
        if ds["zero_optimization"]["stage"] == 3:
            ds["zero_optimization"].update(
                stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0,
                stage3_max_live_parameters=0, stage3_prefetch_bucket_size=0)
        return ds
    return build


def train(out: Path, overrides: list[str]) -> None:
    trainer, _ = make_trainer(load_config("tiny", overrides))
    trainer.fit()
    params = {n: p.detach().clone() for n, p in full_params(trainer.engine)}  # every rank
    if trainer.is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(params, out / "params.pt")


def main() -> None:
    engine = harness.train.engine
    engine.build_ds_config = _gather_in_every_forward(engine.build_ds_config)
    run_cases(sys.argv[1:], train)
    leave_together()


if __name__ == "__main__":
    main()
