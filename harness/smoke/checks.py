"""The smoke's verdicts: each takes what a phase produced and returns one Check (one line).

The bounds, and why:

LOSS_DROP: the mean train/loss of the last LAST_STEPS steps must lie at least 10% below step
1's. Step 1 sits at ln(vocab) = 6.24 for the tiny preset (a fresh model's near-uniform
prediction); the tiny preset's 30 steps reach 4.8-4.9 on the CPU (-22%, issue 28's
measurement), most of it from learning the tokens' frequencies, the first thing any working
update learns. An update that never reaches the weights (gradients lost, each step skipped)
leaves the loss where it started, give or take its batch-to-batch noise: measured with
optim.lr=1e-9, the last 5 steps' mean +0.3% from step 1's, eval/loss unchanged.
The last evaluation's eval/loss must also lie below the first's.

NORM_RTOL: step 1's pre-clip norm against plain PyTorch in fp32 (reference.py), relative.
fp32: both sides sum the same products in another order (DeepSpeed's flat ZeRO partitions,
recomputed checkpointed layers): measured 5e-9 relative (the smoke) and 5e-8 (a 2-layer
variant) on this CPU, so 1e-5 is rounding with 200x room and still catches every real error.
bf16: 2%, the argument and measurements of bench/gpu_check.py's NORM_RTOL (a bf16 run starts
from weights rounded to 8 bits and computes in bf16; measured 0.02-0.07%). Both catch what
matters: a missing or doubled accumulation division (x2), a layer group counted twice or left
out.

RESUME_TOL: the resumed steps (each one's train/loss, pre-clip norm and the last eval/loss,
relative) and the final fp32 weights (the update error: how far the resumed run's weights lie
from the uninterrupted run's, relative to how far the resumed steps moved them) against the
uninterrupted run; the learning rate, a function of the step alone, must be equal everywhere.
On the CPU the harness resumes bit for bit (tests/checkpoint/test_resume.py): both bounds are
0. On a GPU two runs of the same steps may differ by the order of atomic adds in backward
kernels (attention, embedding): last-bit rounding of fp32 sums. Its stand-in, measured on the
CPU in bf16 (tiny preset, resumed at 20 of 30): every fp32 master weight moved by one ulp at
the resume point moves the metrics by up to 6e-4 (a later step's pre-clip norm) and the
weights' update error to 1.1e-2. The resume bugs that matter, measured the same way (fp32 /
bf16): the data one global batch ahead 0.46 / 0.55 on the metrics, 0.21 / 0.23 on the
weights; Adam's moments lost 4.4 / 0.24 and 1.8 / 1.9; the LR schedule one step ahead 0.2 on
the LR itself. The GPU bounds, 1e-2 on the metrics and 0.1 on the weights, sit between:
16x and 9x the rounding stand-in, 24x and 2x under the smallest bug. Unproven until a GPU
runs it: how close the GPU's own rounding comes to them.

EXPORT_ATOL: logits of the exported model, reloaded by transformers, against the harness's
own model on the same weights, both fp32 on the CPU: measured within 1e-5 on random ids by
tests/after/test_export_hf.py (another op order); 1e-4 is 10x that, and a transposed weight,
a wrong LayerNorm epsilon or an untied head moves logits by tenths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

LAST_STEPS = 5
LOSS_DROP = 0.10
NORM_RTOL = {"fp32": 1e-5, "bf16": 0.02}
# (metrics, relative; weights, update error) by device
RESUME_TOL = {"cpu": (0.0, 0.0), "cuda": (1e-2, 0.1)}
EXPORT_ATOL = 1e-4
RESUMED_METRICS = ("train/loss", "optim/grad_norm_preclip", "optim/lr", "eval/loss")
EXACT = ("optim/lr",)


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == "PASS"

    def line(self) -> str:
        return f"{self.status} {self.name:<7} {self.detail}"


def verdict(name: str, ok: bool, detail: str) -> Check:
    return Check(name, "PASS" if ok else "FAIL", detail)


def _numbers(record: dict[str, Any]) -> Iterable[tuple[str, float]]:
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, float(value)


def finite(runs: dict[str, list[dict[str, Any]]]) -> Check:
    """Every number of every step record (events aside) of every run is finite."""
    count = 0
    for run, records in runs.items():
        for record in records:
            for key, value in _numbers(record):
                count += 1
                if not math.isfinite(value):
                    return verdict("finite", False, f"{key}={value} at step "
                                   f"{record.get('step')} of the {run} run's metrics.jsonl")
    total = sum(len(r) for r in runs.values())
    return verdict("finite", count > 0, f"{count} values in {total} step records, all finite")


def loss_falls(records: list[dict[str, Any]]) -> Check:
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    if len(losses) < LAST_STEPS + 1 or len(evals) < 2:
        return verdict("loss", False, f"{len(losses)} train/loss and {len(evals)} eval/loss "
                                      f"values: too few to tell")
    first, last = losses[0], sum(losses[-LAST_STEPS:]) / LAST_STEPS
    drop = 1 - last / first if first else 0.0
    ok = drop >= LOSS_DROP and evals[-1] < evals[0]
    return verdict("loss", ok, f"train/loss {first:.4f} at step 1 -> {last:.4f} (last "
                               f"{LAST_STEPS} steps' mean, {-drop:+.1%}; need <= "
                               f"{-LOSS_DROP:+.0%}); eval/loss {evals[0]:.4f} -> {evals[-1]:.4f}")


def rel(a: float, b: float) -> float:
    if a == b:  # equal infinities included
        return 0.0
    return abs(a - b) / max(abs(b), 1e-30)


def step1_norm(harness: Optional[float], reference: float, precision: str) -> Check:
    tol = NORM_RTOL["fp32" if precision == "fp32" else "bf16"]
    if harness is None:
        return verdict("norm", False, "no optim/grad_norm_preclip at step 1")
    diff = rel(harness, reference)
    return verdict("norm", diff <= tol, f"step-1 pre-clip norm {harness:.6g} vs plain PyTorch "
                                        f"fp32 {reference:.6g} (relative {diff:.1e}, "
                                        f"tolerance {tol:g})")


def resumed(whole: list[dict[str, Any]], again: list[dict[str, Any]], weights_err: float,
            start: int, device: str) -> Check:
    """The resumed run's steps (after `start`) against the same steps of the whole run."""
    tol, wtol = RESUME_TOL[device]
    by_step = {r["step"]: r for r in whole}
    steps = [r["step"] for r in again]
    end = whole[-1]["step"] if whole else None
    if not again or steps != list(range(start + 1, start + 1 + len(again))) or steps[-1] != end:
        return verdict("resume", False, f"from step {start}: the resumed run's steps "
                                        f"{steps[:1]}..{steps[-1:]} do not run on to step {end}")
    worst, where = 0.0, ""
    for record in again:
        other = by_step[record["step"]]
        for key in RESUMED_METRICS:
            if key not in record and key not in other:
                continue
            a, b = float(record.get(key, math.nan)), float(other.get(key, math.nan))
            d = rel(a, b) if math.isfinite(a) and math.isfinite(b) else math.inf
            if key in EXACT and d:
                d = math.inf  # a function of the step alone: any difference is a bug
            if d > worst:
                worst, where = d, f" ({key} at step {record['step']}: {a:.8g} vs {b:.8g})"
    ok = worst <= tol and weights_err <= wtol
    bounds = "bitwise" if tol == wtol == 0 else f"tolerances {tol:g} and {wtol:g}"
    return verdict("resume", ok, f"from step {start}, steps {steps[0]}-{steps[-1]} against the "
                                 f"uninterrupted run ({bounds}): largest metric difference "
                                 f"{worst:.1e}{where}; final weights' update error "
                                 f"{weights_err:.1e}")


def update_error(start: dict[str, Any], whole: dict[str, Any], again: dict[str, Any]) -> float:
    """||again - whole|| / ||whole - start|| over all weights: 0 when the resumed run ends on
    the uninterrupted run's weights, about 1 or more when its updates went elsewhere."""
    diff = moved = 0.0
    for name, w0 in start.items():
        if name not in whole or name not in again:
            return math.inf
        a, w = again[name].double(), whole[name].double()
        diff += float((a - w).pow(2).sum())
        moved += float((w - w0.double()).pow(2).sum())
    if diff == 0:
        return 0.0
    return math.sqrt(diff / moved) if moved else math.inf
