"""Activation checkpointing: memory saved for backward and forward+backward time per policy,
as ratios to no checkpointing, and how the memory grows with depth.

    python bench/bench_checkpointing.py [--quick] [--rounds N]

Memory is the exact peak of bytes saved for backward, recompute included
(harness.model.memory.measure_step), beside the planner's prediction. Models come from
harness.train.engine.build, so DeepSpeed's checkpoint function does the recomputing. Times are
medians of alternating rounds over the policies at each depth.
"""
from __future__ import annotations

from common import (MB, alternate, bench_parser, median, one_micro_step, print_table, save_json,
                    synthetic_data)

from harness.config import load_config
from harness.model.memory import measure_step
from harness.plan.planner import activation_bytes
from harness.train.engine import build

AC = "activation_checkpointing"
# extra overrides per policy; count keeps 4 segments at every depth (min(4, depth))
POLICIES = {"none": [], "every_layer": [], "every_k": [f"{AC}.every_k=2"], "sqrt": [],
            "count": []}
FULL = {"depths": (8, 16, 32), "shape": ["model.d_model=128", "model.n_head=4",
                                          "model.block_size=128"], "micro": 4, "rounds": 5}
QUICK = {"depths": (4, 8), "shape": ["model.d_model=64", "model.n_head=2",
                                     "model.block_size=64"], "micro": 2, "rounds": 2}


def model_for(depth: int, policy: str, setup: dict):
    micro = setup["micro"]
    extra = [f"{AC}.number_checkpoints={min(4, depth)}"] if policy == "count" else POLICIES[policy]
    cfg = load_config("tiny", [*setup["shape"], f"model.n_layer={depth}", "model.vocab_size=256",
                               *one_micro_step(micro), f"{AC}.policy={policy}", *extra])
    built = build(cfg)
    x, y = synthetic_data(cfg, micro, built.device).micro_batch(0, 0)
    model = built.engine.module
    return cfg, model, x, y


def fwd_bwd(model, x, y):
    def run():
        model.zero_grad(set_to_none=True)
        model(x, y).backward()
    return run


def measure_depth(depth: int, setup: dict) -> dict[str, dict]:
    rows, steps = {}, {}
    for policy in POLICIES:
        cfg, model, x, y = model_for(depth, policy, setup)
        peak = measure_step(model, x, y)["peak"]
        predicted = activation_bytes(cfg, setup["micro"], policy, fused=False)
        rows[policy] = {"peak": peak, "predicted": predicted}
        steps[policy] = fwd_bwd(model, x, y)
    times = alternate(steps, setup["rounds"])
    for policy, t in times.items():
        rows[policy]["seconds"] = median(t)
    return rows


def print_depth(depth: int, rows: dict[str, dict]) -> None:
    base = rows["none"]
    table = [(p, f"{r['peak'] / MB:.2f}", f"{r['peak'] / base['peak']:.3f}",
              f"{r['predicted'] / r['peak']:.3f}", f"{r['seconds'] * 1e3:.1f}",
              f"{r['seconds'] / base['seconds']:.3f}") for p, r in rows.items()]
    print_table(["policy", "saved MiB", "mem / none", "predicted / measured", "fwd+bwd ms",
                 "time / none"], table, f"\n{depth} layers")


def print_growth(results: dict[int, dict]) -> None:
    depths = sorted(results)
    headers = ["policy"] + [f"MiB @{d}" for d in depths] + [
        f"growth {a}->{b}" for a, b in zip(depths, depths[1:])]
    table = []
    for p in POLICIES:
        peaks = [results[d][p]["peak"] for d in depths]
        table.append([p] + [f"{v / MB:.2f}" for v in peaks] +
                     [f"{b / a:.2f}x" for a, b in zip(peaks, peaks[1:])])
    print_table(headers, table, "\nmemory growth with depth (2x layers: none doubles, "
                                "every_layer adds one input per layer, sqrt ~1.4x)")


def main() -> None:
    p = bench_parser(__doc__, "4 and 8 layers, small shapes (CI)")
    args = p.parse_args()
    setup = dict(QUICK if args.quick else FULL)
    setup["rounds"] = args.rounds or setup["rounds"]
    print(f"shape {' '.join(setup['shape'])}, micro batch {setup['micro']}, fp32, CPU meter; "
          f"{setup['rounds']} alternating rounds per depth")
    results = {}
    for depth in setup["depths"]:
        results[depth] = measure_depth(depth, setup)
        print_depth(depth, results[depth])
    print_growth(results)
    save_json(args.out, {"setup": setup, "results": results})


if __name__ == "__main__":
    main()
