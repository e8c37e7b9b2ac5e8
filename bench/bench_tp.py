"""Tensor parallelism on this CPU: per-rank bytes saved for backward and step time at TP 1 and
TP 2, without checkpointing, with every-layer checkpointing, with partition_activations and
with cpu_checkpointing, as ratios to TP 1, and the planner's per-rank prediction beside them.

    python bench/bench_tp.py [--quick] [--rounds N] [--out FILE.json]

TP 1 is one process, TP 2 two (torch.distributed.run, gloo), each the real engine with
DeepSpeed's AutoTP. Bytes: the exact peak of bytes saved for backward on one rank, recompute
included (harness.model.memory.measure_step; both ranks of the group hold the same), against
harness.plan.planner's activations for that rank. Time: a full optimizer step
(harness.train.trainer.Trainer), the variants of one process in alternation (bench/common.py), the
median of rank 0. On a CPU-only machine the host is the device: cpu_checkpointing copies the
partitions into host buffers but frees no device memory, and TP 2's two processes share this
machine's cores with everything else (one thread each), so its step time shows the
all-reduces' and the halved matmuls' cost, not a GPU's speed-up.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (alternate, bench_parser, median, one_micro_step, print_table, ratio, save_json,
                    synthetic_data)

from harness.config import load_config

KiB = 2**10
AC = "activation_checkpointing"
PARTITIONED = [f"{AC}.policy=every_layer", f"{AC}.partition_activations=true"]
VARIANTS = {"none": [], "every_layer": [f"{AC}.policy=every_layer"],
            "partitioned": PARTITIONED,
            "partitioned+cpu": [*PARTITIONED, f"{AC}.cpu_checkpointing=true"]}
# order: the launches, TP 1 and TP 2 in A B B A order so that drift on a shared machine hits
# both alike (variants within a launch alternate round by round)
FULL = {"shape": [], "micro": 4, "rounds": 10, "order": (1, 2, 2, 1)}  # the tiny preset
QUICK = {"shape": ["model.n_layer=2", "model.d_model=64", "model.block_size=64"], "micro": 2,
         "rounds": 2, "order": (1, 2)}
TPS = (1, 2)


def config(setup: dict, tp: int, variant: str):
    return load_config("tiny", [*setup["shape"], *one_micro_step(setup["micro"]),
                                "model.vocab_size=256", "train.max_steps=100000",
                                "monitor.enabled=false", f"parallel.tensor_parallel_size={tp}",
                                *VARIANTS[variant]])


# ---- one rank (started by torch.distributed.run) ----------------------------------------
def measure_variant(setup: dict, tp: int, variant: str):
    """(bytes saved for backward, a train step that first restores this variant's settings)."""
    from harness.model.memory import measure_step
    from harness.train.engine import build, configure_checkpointing, import_deepspeed
    from harness.train.trainer import Trainer

    cfg = config(setup, tp, variant)
    built = build(cfg)
    data = synthetic_data(cfg, setup["micro"], built.device)
    saved = measure_step(built.engine.module, *data.micro_batch(0, 0))
    built.engine.module.zero_grad(set_to_none=True)
    trainer = Trainer(cfg, built, data, [])
    deepspeed = import_deepspeed(built.device)

    def step():
        # DeepSpeed's checkpoint settings are module globals, left by the newest build
        configure_checkpointing(deepspeed, cfg, built.plan, built.ds_config, built.model,
                                built.dist)
        trainer.train_step()
    return saved, step, built.dist.rank


def worker(out: str, setup: dict, tp: int) -> None:
    from harness.train.run import leave_together

    saved, steps = {}, {}
    for variant in VARIANTS:
        saved[variant], steps[variant], rank = measure_variant(setup, tp, variant)
    # configure_checkpointing warns at TP 1 with partition_activations; once was enough
    logging.getLogger("harness").setLevel(logging.ERROR)
    times = alternate(steps, setup["rounds"])
    result = {v: {**saved[v], "seconds": times[v]} for v in VARIANTS}
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    leave_together()


# ---- the parent: launch, predict, print --------------------------------------------------
def launch(setup: dict, tp: int, quick: bool, rounds: int, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={tp}", __file__, "--worker", str(out), "--tp", str(tp),
           "--rounds", str(rounds), *(["--quick"] if quick else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"TP {tp} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(tp)]


def predicted(setup: dict, tp: int, variant: str) -> int:
    from harness.plan.planner import predict_memory

    return predict_memory(config(setup, tp, variant), tp, device="cpu")["activations"]


def summary(launches: list[list[dict]], variant: str) -> dict:
    """Bytes from every rank of every launch (the largest; they agree), the median step time
    over rank 0's rounds of all launches."""
    ranks = [rank[variant] for ranks in launches for rank in ranks]
    return {"peak": max(r["peak"] for r in ranks), "forward": max(r["forward"] for r in ranks),
            "seconds": median([t for ranks in launches for t in ranks[0][variant]["seconds"]])}


def rows_for(setup: dict, results: dict[int, list[list[dict]]]) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        base = summary(results[1], variant)
        for tp in TPS:
            row = summary(results[tp], variant)
            rows.append({"variant": variant, "tp": tp, **row,
                         "predicted": predicted(setup, tp, variant),
                         "mem_ratio": row["peak"] / base["peak"],
                         "time_ratio": row["seconds"] / base["seconds"]})
    return rows


def print_rows(rows: list[dict]) -> None:
    table = [(r["variant"], r["tp"], f"{r['forward'] / KiB:.1f}", f"{r['peak'] / KiB:.1f}",
              f"{r['mem_ratio']:.3f}", ratio(r["predicted"], r["peak"]),
              f"{r['seconds'] * 1e3:.1f}", f"{r['time_ratio']:.3f}") for r in rows]
    print_table(["variant", "TP", "after fwd KiB", "peak KiB/rank", "mem / TP 1",
                 "planner / meas", "step ms", "time / TP 1"], table,
                "\nper rank (mem and time / TP 1: against the same variant at TP 1)")


def main() -> None:
    p = bench_parser(__doc__, "2 layers, d_model 64, 64 tokens, 2 rounds (CI)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    setup = dict(QUICK if args.quick else FULL)
    setup["rounds"] = args.rounds or setup["rounds"]
    if args.worker:
        worker(args.worker, setup, args.tp)
        return
    print(f"tiny preset {' '.join(setup['shape']) or '(4 layers, d_model 128, 128 tokens)'}, "
          f"vocab 256, micro batch {setup['micro']}, fp32, ZeRO 0; {setup['rounds']} "
          f"alternating rounds. CPU only: the host is the device, so cpu_checkpointing frees "
          f"no device memory here, and TP 2's 2 processes share this machine's cores")
    results: dict[int, list[list[dict]]] = {tp: [] for tp in TPS}
    with tempfile.TemporaryDirectory() as tmp:
        for i, tp in enumerate(setup["order"]):
            out = Path(tmp) / f"launch{i}"
            results[tp].append(launch(setup, tp, args.quick, setup["rounds"], out))
    rows = rows_for(setup, results)
    print_rows(rows)
    save_json(args.out, {"setup": setup, "rows": rows})


if __name__ == "__main__":
    main()
