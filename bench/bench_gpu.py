"""GPU throughput: tokens/s, MFU and peak memory of the GPT presets in bf16 on one GPU, with
and without activation checkpointing, through the real harness engine; and the planner's
memory prediction against torch.cuda.max_memory_allocated. (bench/gpu_check.py is the
pass/fail acceptance check through the CLI; this is the in-process benchmark it takes its
micro batches from.)

    python bench/bench_gpu.py [--quick] [--presets gpt2-small,...] [--out gpu.json]

Each row builds the preset with harness.train.engine.build (world size 1, the preset's ZeRO stage),
trains WARMUP + MEASURED steps of synthetic tokens with harness.train.trainer.Trainer at global
batch = micro batch, and reports the median step. Peak memory is reset after the warm-up, so
it is the steady state the planner predicts. MFU = flops_per_token x tokens/s / the GPU's
dense bf16 peak (harness.model.flops). "monitor" is the spike monitor's update-norm pass (included
in every step) timed alone, as a share of the step. Rows that run out of memory print OOM; on a
CPU-only machine the script prints why it skipped and exits 0.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from common import median, one_micro_step, print_table, save_json, synthetic_data

from harness.common.callback import Callback
from harness.config import load_config
from harness.model.flops import flops_per_token, mfu, peak_flops
from harness.plan.planner import predict_memory
from harness.train.engine import build
from harness.train.trainer import Trainer

GB = 1e9
# micro batch per preset: the planner puts all of these under ~70 GB (see `harness plan`)
MICRO = {"gpt2-small": 16, "gpt2-medium": 16, "gpt-1.3b": 8}
POLICIES = ("none", "every_layer")


class StepTimes(Callback):
    """Records step times after the warm-up; resets the peak-memory counter when it ends."""

    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def on_step_end(self, trainer, step, metrics):
        if step == self.warmup:
            torch.cuda.reset_peak_memory_stats()
        elif step > self.warmup:
            self.times.append(metrics["throughput/step_time_s"])


def flash_runs(cfg) -> bool:
    """Whether SDPA's FlashAttention kernel accepts this preset's head shape in bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = cfg.model
    q = torch.randn(1, m.n_head, m.block_size, m.d_model // m.n_head, device="cuda",
                    dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return True
    except RuntimeError:
        return False


def run_row(preset: str, policy: str, micro: int, steps: tuple[int, int], extra: list[str]):
    warmup, measured = steps
    cfg = load_config(preset, [*one_micro_step(micro), f"train.max_steps={warmup + measured}",
                               "optim.warmup_steps=1", "train.precision=bf16", "train.device=cuda",
                               f"activation_checkpointing.policy={policy}", *extra])
    built = build(cfg)
    timer = StepTimes(warmup)
    trainer = Trainer(cfg, built, synthetic_data(cfg, micro, "cuda"), [timer])
    trainer.fit()
    update_ms = update_norm_ms(trainer)
    tokens_per_s = micro * cfg.model.block_size / median(timer.times)
    peak = peak_flops(torch.cuda.get_device_name(), cfg.train.precision)
    fpt = flops_per_token(cfg.model, built.n_params)  # counted before ZeRO 3 partitions
    measured_bytes = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    predicted = predict_memory(cfg, 1, gpu_memory_bytes=total)["peak"]
    return {"tokens_per_s": tokens_per_s, "step_ms": median(timer.times) * 1e3,
            "mfu": mfu(fpt, tokens_per_s, 1, peak) if peak else None,
            "max_allocated_gb": measured_bytes / GB, "planner_gb": predicted / GB,
            "planner_ratio": predicted / measured_bytes, "flash": flash_runs(cfg),
            "update_norm_ms": update_ms, "status": "ok"}


def update_norm_ms(trainer, repeats: int = 5) -> float:
    """The spike monitor's update-norm pass over the optimizer state (part of every step
    above, since the monitor is on by default), timed alone: its share of the step is the
    monitor's overhead on this GPU."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.norms.update_ratio(1e-4)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return median(times) * 1e3


def guarded_row(preset: str, policy: str, micro: int, steps, extra) -> dict:
    row = {"preset": preset, "policy": policy, "micro": micro}
    try:
        row.update(run_row(preset, policy, micro, steps, extra))
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as err:  # one broken row (a kernel that fails to build) must not end the table
        row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
    gc.collect()  # DeepSpeed's engine holds reference cycles: free it before the next row
    torch.cuda.empty_cache()
    return row


def fmt(row: dict) -> list[str]:
    if row["status"] != "ok":
        return [row["preset"], row["policy"], str(row["micro"])] + ["-"] * 8 + [row["status"]]
    mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
    return [row["preset"], row["policy"], str(row["micro"]), f"{row['tokens_per_s']:,.0f}", mfu,
            f"{row['step_ms']:.1f}", f"{row['max_allocated_gb']:.1f}", f"{row['planner_gb']:.1f}",
            f"{row['planner_ratio']:.2f}", "yes" if row["flash"] else "no",
            f"{row['update_norm_ms'] / row['step_ms']:.2%}", "ok"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="gpt2-small only, 1 + 2 steps")
    p.add_argument("--presets", default=",".join(MICRO), help="comma-separated presets")
    p.add_argument("--torch-adam", action="store_true",
                   help="torch AdamW instead of DeepSpeed's FusedAdam (no JIT build)")
    p.add_argument("--out", default=None, help="write the table as JSON")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU on this machine; skipped (run it on an H100/H200)")
        return 0
    presets = ["gpt2-small"] if args.quick else args.presets.split(",")
    steps = (1, 2) if args.quick else (3, 10)
    extra = ["optim.torch_adam=true"] if args.torch_adam else []
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}; SDPA backends enabled: flash "
          f"{torch.backends.cuda.flash_sdp_enabled()}, mem-efficient "
          f"{torch.backends.cuda.mem_efficient_sdp_enabled()}, math "
          f"{torch.backends.cuda.math_sdp_enabled()}; {steps[0]} warm-up + {steps[1]} steps")
    rows = []
    for preset in presets:
        for policy in POLICIES:
            rows.append(guarded_row(preset, policy, MICRO.get(preset, 8), steps, extra))
            print(f"  done {preset} {policy}: {rows[-1]['status']}", flush=True)
    print_table(["preset", "policy", "micro", "tokens/s", "MFU", "step ms", "max alloc GB",
                 "planner GB", "planner/meas", "flash", "monitor", "status"],
                [fmt(r) for r in rows],
                "\nbf16, 1 GPU, synthetic tokens, global batch = micro batch")
    save_json(args.out, {"device": name, "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
