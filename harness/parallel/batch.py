"""The one place where batch arithmetic and checkpoint layout are decided.

global batch = micro batch x accumulation steps x data-parallel ranks. Given any two of the
three and the world size, the third follows; all three must agree when all are given.

The process layout: world = tensor-parallel size x data-parallel size, rank =
dp_rank x tp + tp_rank (DeepSpeed's AutoTP groups: consecutive ranks form one tensor-parallel
group, so with ranks numbered node by node a group stays inside a node when tp divides the
ranks per node). Batch arithmetic counts data-parallel ranks only: the ranks of one
tensor-parallel group see the same micro-batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from harness.common.errors import HarnessError
from harness.config import ActivationCheckpointingConfig, Config


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    grad_accum: int
    dp_size: int


@dataclass(frozen=True)
class Plan:
    batch: BatchPlan
    lr: float  # peak LR after optional linear scaling with the global batch
    segments: tuple[tuple[int, int], ...]  # [start, end) block ranges run under one checkpoint
    seq_len: int
    tp_size: int = 1  # ranks per tensor-parallel group; world = tp_size x batch.dp_size

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global `rank` (its tensor-parallel group's index)."""
        return rank // self.tp_size

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp_size

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_batch * self.seq_len

    @property
    def number_checkpoints(self) -> int:
        return len(self.segments)


def plan_batch(global_batch: int | None, micro: int | None, accum: int | None,
               dp_size: int) -> BatchPlan:
    given = {"train.global_batch_size": global_batch, "train.micro_batch_size": micro,
             "train.grad_accum_steps": accum}
    for key, value in given.items():
        if value is not None and value < 1:
            raise HarnessError(f"{key}={value} must be >= 1")
    if dp_size < 1:
        raise HarnessError(f"world size {dp_size} must be >= 1")
    if sum(v is not None for v in given.values()) < 2:
        raise HarnessError("set two of train.global_batch_size, train.micro_batch_size, "
                           "train.grad_accum_steps (the third follows from the world size)")
    if global_batch is None:
        global_batch = micro * accum * dp_size
    elif micro is None:
        micro = _divide(global_batch, accum * dp_size, "train.micro_batch_size",
                        f"train.grad_accum_steps x world size = {accum} x {dp_size}")
    elif accum is None:
        accum = _divide(global_batch, micro * dp_size, "train.grad_accum_steps",
                        f"train.micro_batch_size x world size = {micro} x {dp_size}")
    if micro * accum * dp_size != global_batch:
        raise HarnessError(
            f"train.global_batch_size={global_batch} != train.micro_batch_size x "
            f"train.grad_accum_steps x world size = {micro} x {accum} x {dp_size}: "
            f"drop one of the three so it is derived")
    return BatchPlan(global_batch, micro, accum, dp_size)


def _divide(total: int, by: int, derived_key: str, what: str) -> int:
    if total % by:
        raise HarnessError(f"train.global_batch_size={total} is not divisible by {what}: "
                           f"cannot derive {derived_key}; change the global batch")
    return total // by


def checkpoint_segments(ac: ActivationCheckpointingConfig, n_layer: int
                        ) -> tuple[tuple[int, int], ...]:
    """Block ranges that each run under one checkpoint call (empty: no block checkpointed).

    every_layer: one segment per block. count/sqrt: the blocks cut into that many contiguous
    segments (Chen et al.'s sqrt(n) trick; DeepSpeed's number_checkpoints counts these calls).
    every_k: every k-th block alone (torchtitan's layer-selective AC). attention/mlp: one
    sub-block per layer, so n_layer calls.
    """
    policy = ac.policy
    if policy == "none":
        return ()
    if policy in ("every_layer", "attention", "mlp"):
        return tuple((i, i + 1) for i in range(n_layer))
    if policy == "every_k":
        return tuple((i, i + 1) for i in range(ac.every_k - 1, n_layer, ac.every_k))
    count = ac.number_checkpoints if policy == "count" else max(1, round(math.sqrt(n_layer)))
    bounds = [round(i * n_layer / count) for i in range(count + 1)]
    return tuple((a, b) for a, b in zip(bounds, bounds[1:]))


def make_plan(cfg: Config, world_size: int) -> Plan:
    t, tp = cfg.train, cfg.parallel.tp_size
    if world_size % tp:
        raise HarnessError(f"world size {world_size} is not divisible by "
                           f"parallel.tensor_parallel_size={tp}: start a multiple of {tp} ranks")
    batch = plan_batch(t.global_batch_size, t.micro_batch_size, t.grad_accum_steps,
                       world_size // tp)
    lr = cfg.optim.lr
    if cfg.optim.lr_scaling:
        lr = lr * batch.global_batch / cfg.optim.base_global_batch
    segments = checkpoint_segments(cfg.activation_checkpointing, cfg.model.n_layer)
    if cfg.activation_checkpointing.policy == "every_k" and not segments:
        raise HarnessError(f"activation_checkpointing.every_k={cfg.activation_checkpointing.every_k}"
                           f" exceeds model.n_layer={cfg.model.n_layer}: nothing is checkpointed")
    return Plan(batch=batch, lr=lr, segments=segments, seq_len=cfg.model.block_size, tp_size=tp)


def lr_at(step: int, plan: Plan, cfg: Config) -> float:
    """Linear warm-up to the peak, then cosine to peak x min_lr_ratio at max_steps.

    `step` counts optimizer steps already taken, so the first update uses lr_at(0).
    """
    o, peak = cfg.optim, plan.lr
    if step < o.warmup_steps:
        return peak * (step + 1) / o.warmup_steps
    span = max(1, cfg.train.max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    floor = peak * o.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
