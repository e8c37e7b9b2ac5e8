"""bench/gpu_check.py's rules: one finished run -> one table row, PASS or FAIL and why.

The tolerances and bands are argued in gpu_check.py's docstring.
"""
from __future__ import annotations

import math

from common import median
from gpu_reference import Reference

from harness.plan.planner import MARGIN, predict_memory
# the weights' change against the reference's (0: equal, 1: an update never landed)
from harness.smoke.checks import update_error

TIMED_OUT = 124  # as timeout(1) reports it; `harness train` exits 0, 2, 3 or 42
NORM_RTOL = 0.02
LOSS_RTOL = 0.005  # each step's train/loss against the fp32 reference's (see above)
UPDATE_RTOL = 0.10  # the weights' change after 3 updates against the reference's (see above)
MEMORY_BAND = (0.75, 1 + MARGIN)  # measured peak / the planner's peak
# model FLOPs utilisation of the speed rows without checkpointing (see above); every_layer
# recomputes each block's forward, so its lower end is 3/4 of this
MFU_BAND = {"gpt2-small": (0.15, 0.65), "gpt-1.3b": (0.25, 0.70)}


def new_row(name: str, kind: str, **values) -> dict:
    return {"name": name, "kind": kind, "status": "PASS", "norm": None, "reference": None,
            "loss_err": None, "update_err": None, "tokens_per_s": None, "mfu": None,
            "memory_gb": None, "planned_gb": None, "seconds": 0.0, "problems": [],
            "notes": [], **values}


def judge(run: dict, result: dict, ref: Reference, device: str, warmup: int,
          min_mfu: float | None, graph_breaks: list[int] | None = None) -> dict:
    """The table row of one finished run: status PASS/FAIL and why. min_mfu None: the MFU
    band of the run's preset (MFU_BAND). graph_breaks: per block, for a compiled run."""
    row = new_row(run["name"], run["kind"], reference=ref.norms[0] if ref.norms else None,
                  seconds=result["seconds"])
    problems, steps = row["problems"], result["steps"]
    if result["code"] != 0:
        ended = "timed out" if result["code"] == TIMED_OUT else f"exit {result['code']}"
        problems.append(f"{ended} (see {result['log']})")
    if not steps:
        problems.append("no step metrics")
        row["status"] = "FAIL"
        return row
    if graph_breaks is not None and any(graph_breaks):
        problems.append(f"graph breaks inside blocks {graph_breaks}: they run eager")
    if run["kind"] == "overflow":
        problems += overflow_problems(steps, result["events"], run["cfg"].train.max_steps)
    else:
        judge_norm(row, steps, ref)
    if run["kind"] == "norm":
        judge_updates(row, steps, result, ref)
    measured = steps[warmup:] or steps
    row["tokens_per_s"] = median([r["throughput/tokens_per_s"] for r in measured])
    if device == "cuda":
        judge_gpu(row, run, steps, measured, min_mfu)
    row["status"] = "FAIL" if problems else "PASS"
    return row


def judge_norm(row: dict, steps: list[dict], ref: Reference) -> None:
    problems = row["problems"]
    row["norm"] = norm = steps[0].get("optim/grad_norm_preclip")
    if steps[0].get("step") != 1 or not isinstance(norm, float) or not math.isfinite(norm):
        problems.append(f"step 1 norm {norm!r}")
    elif abs(norm / row["reference"] - 1) > NORM_RTOL:
        problems.append(f"norm off by {norm / row['reference'] - 1:+.2%}")
    if "optim/update_norm" not in steps[0]:
        problems.append("no optim/update_norm (monitor off?)")


def judge_updates(row: dict, steps: list[dict], result: dict, ref: Reference) -> None:
    """3 updates against the reference's: every step applied, each step's loss, and the
    weights after the last (an update that never reaches the weights, a doubled or a stale
    one, moves them elsewhere)."""
    problems = row["problems"]
    skipped = [r["step"] for r in steps if r.get("optim/skipped")]
    if skipped or len(steps) != len(ref.losses):
        problems.append(f"{len(steps)} steps, skipped {skipped}: 3 applied updates needed")
        return
    row["loss_err"] = max(abs(r["train/loss"] / x - 1) for r, x in zip(steps, ref.losses))
    if not row["loss_err"] <= LOSS_RTOL:
        problems.append(f"loss off by up to {row['loss_err']:.2%}")
    row["update_err"] = update_error(ref.initial, ref.final, result["params"])
    if not row["update_err"] <= UPDATE_RTOL:
        problems.append(f"weights after {len(steps)} updates off by {row['update_err']:.1%}")
    evals = [r["eval/loss"] for r in steps if "eval/loss" in r]
    if not evals or not all(isinstance(v, float) and math.isfinite(v) for v in evals):
        problems.append(f"eval/loss {evals}")


def overflow_problems(steps: list[dict], events: list[dict], max_steps: int) -> list[str]:
    """fp16 with a forced overflow: DeepSpeed skips the step and halves the scale (after
    fp16.hysteresis overflows), the monitor raises no alarm, and the run trains on."""
    problems = []
    if len(steps) != max_steps:
        problems.append(f"{len(steps)} of {max_steps} steps ran")
    skipped = [bool(r.get("optim/skipped")) for r in steps]
    scales = [r.get("optim/loss_scale") for r in steps]
    if not skipped[0]:
        problems.append("step 1 did not overflow: nothing was tested")
    first_applied = skipped.index(False) if False in skipped else None
    if first_applied is None:
        problems.append(f"every step skipped (loss scales {scales})")
    else:
        if any(skipped[first_applied:]):
            problems.append("an overflow after training resumed")  # the scale never recovered
        drops = [b / a for a, b in zip(scales[:first_applied], scales[1:first_applied + 1])]
        if not drops or any(d not in (0.5, 1.0) for d in drops) or 0.5 not in drops:
            problems.append(f"loss scale did not halve over the overflows: {scales}")
        tail = steps[first_applied:]
        if not all(math.isfinite(r["optim/grad_norm_preclip"]) and math.isfinite(r["train/loss"])
                   for r in tail):
            problems.append("non-finite norm or loss after the overflows")
    alarms = [e["event"] for e in events if e.get("level") == "alarm"]
    if alarms:
        problems.append(f"monitor alarms {alarms}: an overflow is the loss scaler's, not one")
    return problems


def judge_gpu(row: dict, run: dict, steps: list[dict], measured: list[dict],
              min_mfu: float | None) -> None:
    mfus = [r["throughput/mfu"] for r in measured if "throughput/mfu" in r]
    row["mfu"] = median(mfus) if mfus else None
    row["memory_gb"] = max(r.get("memory/gpu_max_allocated_gb", 0.0) for r in steps)
    row["planned_gb"] = predict_memory(run["cfg"], 1, device="cuda")["peak"] / 1e9
    if run["kind"] != "speed":
        return
    low, high = mfu_band(run["cfg"], run["preset"]) if min_mfu is None else (min_mfu, 1.0)
    if row["mfu"] is None or not low < row["mfu"] <= high:
        row["problems"].append(f"MFU {row['mfu']} outside ({low:.2f}, {high:.2f}]")
    lo, hi = row["planned_gb"] * MEMORY_BAND[0], row["planned_gb"] * MEMORY_BAND[1]
    if not lo <= row["memory_gb"] <= hi:
        row["problems"].append(f"memory {row['memory_gb']:.1f} GB outside the plan's band "
                               f"[{lo:.1f}, {hi:.1f}]")


def mfu_band(cfg, preset: str) -> tuple[float, float]:
    low, high = MFU_BAND.get(preset, (0.0, 1.0))
    if cfg.activation_checkpointing.policy != "none":  # a forward recomputed, not counted
        low *= 0.75
    return low, high
