"""How far the logged pre-clip norms of 2 ranks are from 1 rank and from plain PyTorch, per
ZeRO stage and precision (the tolerances tests/parallel/test_norms_across_ranks.py asserts,
measured).

    OMP_NUM_THREADS=1 .venv/bin/python bench/norm_gaps.py     # ~2 minutes on 2 cores

2 ranks (torchrun, gloo) x accumulation 2 against 1 rank x accumulation 4 on the same samples;
the largest relative difference over the global and per-group norms at step 1 and steps 2-3,
and 1 rank's step 1 against clip_grad_norm_ on a plain copy. Then, under bf16, the largest
difference between DeepSpeed's accumulated gradient and plain PyTorch summing the same bf16
micro-batch gradients in fp32, and in bf16.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "train"), str(TESTS / "parallel")]  # the tests it reuses

import torch  # noqa: E402
from engine_utils import (child_env, max_diff, plain_grads, precision_args,  # noqa: E402
                          run_harness, small_cfg, torchrun)
from test_accumulation import SPLIT, FirstGradients  # noqa: E402
from test_norms_across_ranks import CASES, ONE, TWO, case_args, norm_keys, plain_first_step  # noqa: E402

WORKER = str(TESTS / "norm_worker.py")


def two_ranks(out: Path, overrides: list[str]) -> list[dict]:
    """One 2-rank run of tests/norm_worker.py: each rank's metrics and parameters."""
    proc = subprocess.run(torchrun(2, WORKER, str(out), *overrides), env=child_env(),
                          capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def rel(a: dict, b: dict, keys) -> float:
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in keys)


def main() -> None:
    print("config | 2 vs 1 rank, step 1 | steps 2-3 | 1 rank vs plain PyTorch")
    for stage, precision, offload, extra in CASES:
        args = case_args(stage, precision, offload, extra)
        r0, _ = two_ranks(Path(tempfile.mkdtemp()), [*args, *TWO])
        _, one, _ = run_harness(small_cfg(*args, *ONE))
        keys = norm_keys(one[0])
        later = max(rel(a, b, keys) for a, b in zip(r0["metrics"][1:], one[1:]))
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        plain = plain_first_step(small_cfg(*args, *ONE), 2, 4, dtype)
        print(f"zero{stage} {precision}{' offload' if offload else ''}{' llama' if extra else ''} | "
              f"{rel(r0['metrics'][0], one[0], keys):.1e} | {later:.1e} | "
              f"{rel(one[0], plain, list(plain)):.1e}", flush=True)
    cfg = small_cfg(*SPLIT)
    in_fp32 = plain_grads(cfg, 2, 4, torch.bfloat16, torch.float32)
    in_bf16 = plain_grads(cfg, 2, 4, torch.bfloat16, torch.bfloat16)
    for stage in (1, 2, 3):
        seen = FirstGradients()
        run_harness(small_cfg(*SPLIT, *precision_args(stage, "bf16")), callbacks=[seen])
        print(f"zero{stage} bf16 accumulated gradient: vs a plain fp32 sum "
              f"{max_diff(seen.grads, in_fp32):.1e}, vs a plain bf16 sum "
              f"{max_diff(seen.grads, in_bf16):.1e}", flush=True)


if __name__ == "__main__":
    main()
