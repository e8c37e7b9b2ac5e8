"""Gradient accumulation: activation memory and time per sample for 1, 2, 4 and 8
accumulation steps at a fixed micro batch, through harness.train.trainer.Trainer.

    python bench/bench_accumulation.py [--quick] [--rounds N]

Memory is the peak of bytes saved for backward over a whole optimizer step
(harness.model.memory.SavedActivations): each micro-step's backward frees its activations before
the next forward, so it must not grow with the accumulation steps (ratio 1.000). Time per
sample should stay flat or fall slightly (the optimizer step is shared by more samples).
"""
from __future__ import annotations

from common import MB, alternate, bench_parser, median, print_table, save_json, synthetic_data

from harness.config import load_config
from harness.model.memory import SavedActivations
from harness.train.engine import build
from harness.train.trainer import Trainer

ACCUMS = (1, 2, 4, 8)
FULL = {"shape": [], "micro": 4, "rounds": 10}  # the tiny preset's model
QUICK = {"shape": ["model.n_layer=2", "model.d_model=64", "model.n_head=2",
                   "model.block_size=64"], "micro": 2, "rounds": 2}


def trainer_for(accum: int, setup: dict) -> Trainer:
    micro = setup["micro"]
    cfg = load_config("tiny", [*setup["shape"], f"train.global_batch_size={micro * accum}",
                               f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}",
                               "train.max_steps=1000"])
    built = build(cfg)
    return Trainer(cfg, built, synthetic_data(cfg, micro, built.device), [])


def saved_peak(trainer: Trainer) -> int:
    with SavedActivations(trainer.engine.module.parameters()) as meter:
        trainer.train_step()
    return meter.peak


def main() -> None:
    p = bench_parser(__doc__, "small model, 2 rounds (CI)")
    args = p.parse_args()
    setup = dict(QUICK if args.quick else FULL)
    setup["rounds"] = args.rounds or setup["rounds"]
    trainers = {a: trainer_for(a, setup) for a in ACCUMS}
    peaks = {a: saved_peak(t) for a, t in trainers.items()}
    times = alternate({a: t.train_step for a, t in trainers.items()}, setup["rounds"])
    per_sample = {a: median(t) / (setup["micro"] * a) for a, t in times.items()}
    rows = [(a, setup["micro"], f"{peaks[a] / MB:.2f}", f"{peaks[a] / peaks[1]:.3f}",
             f"{per_sample[a] * 1e3:.2f}", f"{per_sample[a] / per_sample[1]:.3f}") for a in ACCUMS]
    m = trainers[1].cfg.model
    print_table(["accum", "micro", "saved MiB", "mem / accum 1", "ms / sample",
                 "time / accum 1"], rows,
                f"{m.n_layer} layers, d {m.d_model}, seq {m.block_size}, "
                f"{trainers[1].cfg.train.precision}, {trainers[1].built.device}, "
                f"{setup['rounds']} alternating rounds (memory must stay flat: 1.000)")
    save_json(args.out, {"setup": setup, "peak_bytes": peaks, "seconds_per_sample": per_sample})


if __name__ == "__main__":
    main()
