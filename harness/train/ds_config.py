"""Config + plan -> the DeepSpeed JSON. Generated, never hand-edited (ds_configs/ is output)."""
from __future__ import annotations

import json
from typing import Any

import torch

from harness.config import Config
from harness.parallel import tensor_parallel
from harness.parallel.batch import Plan


def use_torch_adam(cfg: Config) -> bool:
    # DeepSpeed's FusedAdam (and its CPU Adam for offload) is JIT-compiled on first use on
    # every node: nvcc and CUDA_HOME needed there, ranks racing on one extension cache, a
    # lock left behind by a job killed mid-build. torch's AdamW needs no build, and on a GPU
    # its fused kernel is one launch per step like FusedAdam's. Under offload the step runs on
    # the CPU, where torch's fused kernel is as fast as CPU Adam and its default per-tensor
    # loop is not: 50M / 200M fp32 parameters in two flat groups, 1 thread, medians of 7
    # (bench/bench_offload_adam.py): CPU Adam 51 / 202 ms, torch fused 52 / 145 ms, torch
    # default 393 / 2601 ms (7.7x / 12.9x CPU Adam's time); 2 threads: 72 / 197, 56 / 233,
    # 588 / 2392 ms. So torch AdamW stays the default, fused under offload too.
    return True if cfg.optim.torch_adam is None else cfg.optim.torch_adam


def _fused_on(device: str, offload: bool) -> bool:
    """torch AdamW's fused kernel where the step runs: the GPU, or the CPU under offload
    (torch >= 2.4 has a CPU kernel). The CPU without offload keeps torch's default loop: the
    CPU tests compare against plain PyTorch's default AdamW bit for bit."""
    if offload:
        return torch.__version__ >= "2.4"
    return device == "cuda"


def _adam_params(cfg: Config, plan: Plan, device: str) -> dict[str, Any]:
    o = cfg.optim
    params: dict[str, Any] = {"lr": plan.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                              "weight_decay": o.weight_decay, "torch_adam": use_torch_adam(cfg)}
    # DeepSpeed passes the remaining keys to torch.optim.AdamW
    if params["torch_adam"] and _fused_on(device, cfg.zero.offload_optimizer):
        params["fused"] = True
    return params


def overlap_comm(cfg: Config, device: str) -> bool:
    """zero.overlap_comm resolved for the device: null = on on a GPU at ZeRO >= 1, where the
    gradient reduction (and at ZeRO 3 the parameter all-gather) then runs on its own stream,
    overlapped with the backward; off on a CPU, where DeepSpeed has no streams (the CPU
    accelerator is synchronous) and ZeRO 1/2 would only hold a second reduce bucket."""
    z = cfg.zero
    if z.overlap_comm is not None:
        return z.overlap_comm
    return device == "cuda" and z.stage >= 1


def build_ds_config(cfg: Config, plan: Plan, device: str) -> dict[str, Any]:
    b = plan.batch
    ds: dict[str, Any] = {
        "train_batch_size": b.global_batch,
        "train_micro_batch_size_per_gpu": b.micro_batch,
        "gradient_accumulation_steps": b.grad_accum,
        "gradient_clipping": cfg.clip.max_norm,
        "optimizer": {"type": "AdamW", "params": _adam_params(cfg, plan, device)},
        "zero_optimization": _zero(cfg, device),
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": _fp16(cfg),
        "steps_per_print": 10**9,  # the harness logs; keep DeepSpeed's own prints out
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer syncs the device at every forward and every step()
        # (from its third step) for a number it only prints, which steps_per_print keeps out:
        # the harness times the step itself (harness/train/host_syncs.py)
        "timers": {"throughput": {"enabled": False}},
    }
    if cfg.train.precision != "fp32":
        ds["data_types"] = {"grad_accum_dtype": cfg.train.grad_accum_dtype}
        ds["communication_data_type"] = cfg.train.reduce_dtype
    if plan.tp_size > 1:  # DeepSpeed's AutoTP (harness/parallel/tensor_parallel.py)
        ds["tensor_parallel"] = tensor_parallel.ds_section(plan.tp_size)
        # DeepSpeed checks train_batch_size against micro x accumulation x the WHOLE world
        # (its config is read before the tensor-parallel groups exist): leave it to derive it.
        # Gradients are still averaged over the data-parallel group only (measured: TP 2
        # matches TP 1, tests/parallel/test_tensor_parallel.py)
        del ds["train_batch_size"]
    if plan.segments:
        ac = cfg.activation_checkpointing
        ds["activation_checkpointing"] = {
            "partition_activations": ac.partition_activations,
            "cpu_checkpointing": ac.cpu_checkpointing,
            "contiguous_memory_optimization": ac.contiguous_memory_optimization,
            "number_checkpoints": plan.number_checkpoints,
            "synchronize_checkpoint_boundary": ac.synchronize_checkpoint_boundary,
            "profile": ac.profile,
        }
    return ds


def _zero(cfg: Config, device: str) -> dict[str, Any]:
    z = cfg.zero
    section: dict[str, Any] = {"stage": z.stage}
    if z.stage >= 1:
        section.update(overlap_comm=overlap_comm(cfg, device),
                       reduce_bucket_size=z.reduce_bucket_size, contiguous_gradients=True)
    if z.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return section


def _fp16(cfg: Config) -> dict[str, Any]:
    if cfg.train.precision != "fp16":
        return {"enabled": False}
    f = cfg.fp16
    return {"enabled": True, "loss_scale": 0, "initial_scale_power": f.initial_scale_power,
            "loss_scale_window": f.loss_scale_window, "hysteresis": f.hysteresis,
            "min_loss_scale": f.min_loss_scale}


def dumps(ds: dict[str, Any]) -> str:
    return json.dumps(ds, indent=2, sort_keys=True) + "\n"


# ds_configs/<preset>.json: each preset's JSON at the world size and device it is meant for
SNAPSHOTS = {"tiny": (1, "cpu"), "gpt2-small": (8, "cuda"), "gpt2-medium": (8, "cuda"),
             "gpt-1.3b": (8, "cuda"), "tiny-llama": (1, "cpu"), "llama-1b": (8, "cuda")}


def snapshot(preset: str) -> str:
    from harness.config import load_config
    from harness.parallel.batch import make_plan

    world_size, device = SNAPSHOTS[preset]
    cfg = load_config(preset)
    return dumps(build_ds_config(cfg, make_plan(cfg, world_size), device))


if __name__ == "__main__":  # `make ds-configs` regenerates ds_configs/
    import sys
    from pathlib import Path

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "ds_configs")
    for name in SNAPSHOTS:
        (out / f"{name}.json").write_text(snapshot(name))
