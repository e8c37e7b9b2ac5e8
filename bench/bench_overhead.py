"""Harness overhead: a step through harness.train.trainer.Trainer on the real DeepSpeed engine vs a
bare PyTorch loop doing the same arithmetic, timed alternately in one process.

    python bench/bench_overhead.py [--quick] [--rounds N] [key=value ...]

The bare loop is what a user would write by hand: the same GPT and initial weights, the same
micro-batches, loss / accumulation, clip_grad_norm_, torch AdamW and LR schedule, and it reads
the loss and the norm back (.item()) as any logging loop does. Target: harness / bare <= 1.03.
Monitor overhead, also measured alternately: the harness with the spike monitor on (its
signals: per-group gradient norms, the Adam update norm, and the detector) vs off.
"""
from __future__ import annotations

import numpy as np  # noqa: E402 (common sets the thread count before torch loads)
import torch
from common import (CpuTimer, alternate, bench_parser, median, print_table, save_json,
                    synthetic_data, timed)

from harness.config import load_config
from harness.model import build_model, param_groups
from harness.parallel.batch import lr_at, make_plan
from harness.train.engine import build, seed_everything
from harness.train.trainer import Trainer

QUICK = ["model.n_layer=2", "model.d_model=64", "model.block_size=64", "model.n_head=2",
         "train.global_batch_size=8", "train.micro_batch_size=4", "train.grad_accum_steps=2"]


def harness_step(cfg, monitor: bool):
    from dataclasses import replace

    from harness.callbacks.spike_monitor import SpikeMonitor

    cfg = replace(cfg, monitor=replace(cfg.monitor, enabled=monitor))
    built = build(cfg)
    b = built.plan.batch
    callbacks = [SpikeMonitor(cfg.monitor)] if monitor else []
    trainer = Trainer(cfg, built, synthetic_data(cfg, b.micro_batch, built.device), callbacks)
    # the monitor's own CPU time inside each step: its callback and the update-norm pass
    timer = CpuTimer(*[(callbacks[0], h) for h in ("on_before_step", "on_step_end")],
                     (trainer.norms, "update_metrics")) if monitor else None

    def step():
        before = timer.seconds if timer else 0.0
        metrics = trainer.train_step()
        for cb in trainer.callbacks:
            cb.on_step_end(trainer, trainer.step, metrics)
        if timer:
            step.monitor_s.append(timer.seconds - before)
    step.monitor_s = []
    return step, built.device


def bare_step(cfg, device: str):
    plan = make_plan(cfg, 1)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=plan.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, plan, cfg) / plan.lr)
    accum, data = plan.batch.grad_accum, synthetic_data(cfg, plan.batch.micro_batch, device)
    state = {"consumed": 0}

    def step():
        total = torch.zeros((), device=device)
        for k in range(accum):
            x, y = data.micro_batch(state["consumed"], k)
            loss = model(x, y)
            (loss / accum).backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip.max_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state["consumed"] += plan.batch.global_batch
        return (total / accum).item(), norm.item()  # .item() also waits for a GPU

    return step


def monitor_seconds_per_step(steps: int) -> float:
    """check_pre_step + check_post_step per step, with full windows (the steady state)."""
    from harness.monitor import MonitorConfig, SpikeDetector

    cfg = MonitorConfig()
    det, rng = SpikeDetector(cfg), np.random.default_rng(0)
    warm = cfg.window + cfg.warmup_steps

    def feed(step):
        det.check_pre_step(step, {"train/loss": 3.0 + 0.01 * rng.standard_normal(),
                                  "optim/grad_norm_preclip": float(rng.lognormal(0, 0.1)),
                                  "optim/lr": 1e-3})
        det.check_post_step(step, {"optim/update_norm": float(rng.lognormal(-3, 0.1))})

    for s in range(warm):
        feed(s)
    return timed(lambda: [feed(s) for s in range(warm, warm + steps)]) / steps


def main() -> None:
    p = bench_parser(__doc__, "tiny model, a few rounds (CI)")
    p.add_argument("overrides", nargs="*", help="config overrides on the tiny preset")
    args = p.parse_args()
    cfg = load_config("tiny", (QUICK if args.quick else []) + args.overrides)
    rounds = args.rounds or (4 if args.quick else 40)
    harness, device = harness_step(cfg, monitor=False)
    monitored, _ = harness_step(cfg, monitor=True)
    bare = bare_step(cfg, device)
    times = alternate({"bare PyTorch": bare, "harness": harness, "harness + monitor": monitored},
                      rounds, warmup=2)
    base = median(times["bare PyTorch"])
    rows = [(name, f"{median(t) * 1e3:.2f}", f"{min(t) * 1e3:.2f}", f"{median(t) / base:.3f}")
            for name, t in times.items()]
    m, b = cfg.model, make_plan(cfg, 1).batch
    print_table(["loop", "median ms/step", "min ms/step", "ratio to bare"], rows,
                f"{m.n_layer} layers, d {m.d_model}, seq {m.block_size}, micro "
                f"{b.micro_batch} x accum {b.grad_accum}, "
                f"{cfg.train.precision}, {device}, {rounds} alternating rounds "
                f"(target harness/bare <= 1.03)")
    per_step = monitor_seconds_per_step(50 if args.quick else 500)
    step_s = median(times["harness"])
    inside = median(monitored.monitor_s)
    monitor_ratio = median(times["harness + monitor"]) / step_s
    print(f"\nmonitor overhead (target <= 1%): {inside * 1e3:.2f} ms of CPU per step timed "
          f"inside it = {inside / step_s:.2%} of the harness step (whole steps alternated: "
          f"{monitor_ratio - 1:+.2%}, noisier); the detector alone "
          f"{per_step * 1e3:.3f} ms/step = {per_step / step_s:.2%}, the rest is the update norm")
    save_json(args.out, {"seconds": times, "ratio": step_s / base, "monitor_ratio": monitor_ratio,
                         "monitor_share_timed": inside / step_s,
                         "monitor_seconds_per_step": per_step})


if __name__ == "__main__":
    main()
