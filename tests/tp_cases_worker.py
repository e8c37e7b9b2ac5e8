"""One rank of many tensor-parallel cases in one launch, for tests/parallel/test_tensor_parallel.py.

usage: tp_cases_worker.py CASES.json OUT_DIR
CASES: JSON {case id: {"kind", "overrides"}}, run in order in this one process (one start,
one rendezvous for all of them; every case builds its own engine, reseeded), each into
OUT_DIR/<case id>/ (tests/batched.py):
  kind "train":      the real engine trains cfg.train.max_steps steps (engine_utils.run_harness,
                     as tests/norm_worker.py); rankR.pt: {"metrics", "params"}
  kind "activation": one forward + backward under the saved-bytes meter
                     (tp_activation_worker.measure); rankR.json
A case that raises writes its traceback there instead and ends the ranks (a rank left alone
in a collective would wait for the others); the test side relaunches the cases after it, and
that case's test fails with the traceback.
"""
import json
import sys
from pathlib import Path

import torch
from batched import case_dir, env_rank, read_cases
from engine_utils import run_harness, small_cfg
from tp_activation_worker import measure

from harness.callbacks.throughput import Throughput
from harness.train.run import leave_together


def run_case(out: Path, case: dict) -> None:
    if case["kind"] == "train":
        params, metrics, built = run_harness(small_cfg(*case["overrides"]), torch.float32,
                                             callbacks=[Throughput()])
        torch.save({"metrics": metrics, "params": params}, out / f"rank{built.dist.rank}.pt")
    elif case["kind"] == "activation":
        res = measure(case["overrides"])
        with open(out / f"rank{res['rank']}.json", "w") as f:
            json.dump(res, f)
    else:
        raise ValueError(f"unknown kind {case['kind']!r}")


def main() -> None:
    out = Path(sys.argv[2])
    for name, case in read_cases(sys.argv[1]).items():
        with case_dir(out, name, env_rank()) as d:
            run_case(d, case)
    leave_together()


if __name__ == "__main__":
    main()
