"""One rank of a multi-process test run, started by torchrun (or alone for world size 1).

usage: dist_worker.py OUT_DIR STOP_AT key=value ...   (STOP_AT 0: run to max_steps)
       dist_worker.py --cases CASES.json OUT_DIR
Trains with harness.train.run.make_trainer and writes this rank's parameters to OUT_DIR/rankR.pt.
With --cases (JSON {case id: {"stop_at": N, "overrides": [...], "flip_a_bit": [path, ...]}}),
each case in turn in these processes, an engine each, one process group, to
OUT_DIR/<case id>/rankR.pt (tests/batched.py); flip_a_bit: files that rank 0 damages as
test_checkpoint_fallback.flip_a_bit does, before the case's trainer is made.
"""
import gc
import sys
from pathlib import Path

import torch
from engine_utils import StopAt

from harness.config import load_config
from harness.train.run import leave_together, make_trainer


def train(out: Path, stop_at: int, overrides: list[str]) -> None:
    trainer, _ = make_trainer(load_config("tiny", overrides))
    if stop_at:
        trainer.callbacks.insert(0, StopAt(stop_at))
    trainer.fit()
    out.mkdir(parents=True, exist_ok=True)
    params = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    torch.save(params, out / f"rank{trainer.built.dist.rank}.pt")


def run_cases(spec_file: str, out: Path) -> None:
    from batched import case_dir, env_rank, read_cases

    from harness.parallel.collectives import Collectives

    for case, spec in read_cases(spec_file).items():
        with case_dir(out, case, env_rank()) as d:
            if spec.get("flip_a_bit"):
                if env_rank() == 0:
                    sys.path.insert(0, str(Path(__file__).parent / "checkpoint"))
                    from test_checkpoint_fallback import flip_a_bit

                    for path in spec["flip_a_bit"]:
                        flip_a_bit(Path(path))
                if torch.distributed.is_initialized():  # the others wait for the damage
                    Collectives.for_process_group().barrier()
            train(d, spec.get("stop_at", 0), spec["overrides"])
        gc.collect()  # the case's engine, before the next one's


def main() -> None:
    if sys.argv[1] == "--cases":
        run_cases(sys.argv[2], Path(sys.argv[3]))
    else:
        train(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
    leave_together()


if __name__ == "__main__":
    main()
