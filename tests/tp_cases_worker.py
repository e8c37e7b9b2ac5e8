"""One rank of many tensor-parallel cases in one launch, for tests/parallel/test_tensor_parallel.py.

usage: tp_cases_worker.py SPEC.json
SPEC: a JSON list of {"name", "kind", "out", "overrides"}, run in order in this one process
(one start, one rendezvous for all of them; every case builds its own engine, reseeded):
  kind "train":      the real engine trains cfg.train.max_steps steps (engine_utils.run_harness,
                     as tests/norm_worker.py); OUT/rankR.pt: {"metrics", "params"}
  kind "activation": one forward + backward under the saved-bytes meter
                     (tp_activation_worker.measure); OUT.rankR.json
After each case every rank writes OUT.doneR; a case that raises writes its traceback to
OUT.errorR.txt and ends the launch (a rank left alone in a collective would wait for the
others): its test fails with that traceback, the cases after it with the name of the case
that ended the launch (tests/case_launch.py).
"""
import json
import os
import sys
import traceback
from pathlib import Path

import torch
from case_launch import done
from engine_utils import run_harness, small_cfg
from tp_activation_worker import measure

from harness.callbacks.throughput import Throughput
from harness.train.run import leave_together


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_case(case: dict) -> None:
    out = Path(case["out"])
    if case["kind"] == "train":
        params, metrics, built = run_harness(small_cfg(*case["overrides"]), torch.float32,
                                             callbacks=[Throughput()])
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"metrics": metrics, "params": params}, out / f"rank{built.dist.rank}.pt")
    elif case["kind"] == "activation":
        res = measure(case["overrides"])
        with open(f"{out}.rank{res['rank']}.json", "w") as f:
            json.dump(res, f)
    else:
        raise ValueError(f"unknown kind {case['kind']!r}")


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    for case in cases:
        try:
            run_case(case)
        except BaseException:
            Path(f"{case['out']}.error{rank()}.txt").write_text(
                f"case {case['name']} on rank {rank()}:\n{traceback.format_exc()}")
            sys.stderr.write(traceback.format_exc())
            sys.stderr.flush()
            os._exit(1)
        done(case["out"], rank()).touch()
    leave_together()


if __name__ == "__main__":
    main()
