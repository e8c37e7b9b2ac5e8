"""Config + plan -> the DeepSpeed JSON. Generated, never hand-edited (ds_configs/ is output)."""
from __future__ import annotations

import json
from typing import Any

from harness.config import Config
from harness.plan import Plan


def use_torch_adam(cfg: Config, device: str) -> bool:
    # DeepSpeed's CPU FusedAdam JIT-compiles for ~40 s; torch's AdamW is as good on CPU
    if cfg.optim.torch_adam is not None:
        return cfg.optim.torch_adam
    return device == "cpu"


def build_ds_config(cfg: Config, plan: Plan, device: str) -> dict[str, Any]:
    b, o = plan.batch, cfg.optim
    ds: dict[str, Any] = {
        "train_batch_size": b.global_batch,
        "train_micro_batch_size_per_gpu": b.micro_batch,
        "gradient_accumulation_steps": b.grad_accum,
        "gradient_clipping": cfg.clip.max_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": plan.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": use_torch_adam(cfg, device),
            },
        },
        "zero_optimization": _zero(cfg),
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": _fp16(cfg),
        "steps_per_print": 10**9,  # the harness logs; keep DeepSpeed's own prints out
        "wall_clock_breakdown": False,
    }
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


def _zero(cfg: Config) -> dict[str, Any]:
    z = cfg.zero
    section: dict[str, Any] = {"stage": z.stage}
    if z.stage >= 1:
        section.update(overlap_comm=z.overlap_comm, reduce_bucket_size=z.reduce_bucket_size,
                       contiguous_gradients=True)
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
