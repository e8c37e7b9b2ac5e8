"""`harness plan`'s time per step: a first absolute estimate from FLOPs and an assumed MFU.

Not a measurement and not calibrated (the calibrated model is harness/plan/throughput.py,
used with --gpu). A
step of G samples of T tokens does G x T x F model FLOPs (F = harness.model.flops.
flops_per_token: 6N plus attention), more by the recompute share of the checkpointing policy.
Spread over W GPUs, each sustaining the assumed fraction u (--mfu) of its dense peak P
(harness.model.flops.PEAK_FLOPS for --gpu-type and train.precision), that takes

    step time = G x T x F x (1 + recompute share) / (W x P x u) + accum x 5 ms

where the second term is a fixed cost per micro-step (launches, hooks, Python) that small
micro batches pay more often. Nothing else is modelled: no communication (ZeRO's gradient
reduction, tensor-parallel all-reduces), no data loading, no evaluation or checkpoint saving;
under tensor parallelism the replicated embeddings and head are counted as if split. Without a
known peak the times are only relative: the ranking assumes P x u = 400 TFLOP/s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from harness.model.flops import peak_flops

MICRO_STEP_OVERHEAD_S = 5e-3
DEFAULT_GPU_TYPE = "H100"  # H100 SXM: 80 GB, as --gpu-memory's default
DEFAULT_MFU = 0.40  # a well-tuned dense model on H100s reaches 0.35-0.55; a guess, stated
RANKING_FLOPS = 400e12  # sustained FLOP/s per GPU assumed when the peak is unknown


@dataclass(frozen=True)
class Speed:
    """One GPU's assumed speed: `peak` dense FLOP/s of the run's precision (None: unknown, so
    no absolute time), `mfu` the fraction of it sustained, `gpu` what the peak is of."""
    peak: Optional[float]
    mfu: float = DEFAULT_MFU
    gpu: str = DEFAULT_GPU_TYPE

    @property
    def sustained(self) -> float:
        return self.peak * self.mfu if self.peak else RANKING_FLOPS

    @property
    def absolute(self) -> bool:
        return self.peak is not None

    def describe(self, precision: str) -> str:
        """What the times assume, in one line."""
        if not self.peak:
            return (f"no absolute times: no known dense {precision} peak for --gpu-type "
                    f"{self.gpu!r}; pass its --peak-tflops (times below are relative)")
        return (f"assumes {self.gpu}: {self.peak / 1e12:,.0f} TFLOP/s dense {precision} peak x "
                f"MFU {self.mfu:.0%} (--gpu-type, --peak-tflops, --mfu), plus "
                f"{MICRO_STEP_OVERHEAD_S * 1e3:.0f} ms per micro-step; no communication, data "
                f"loading or checkpoint time")


def speed_for(gpu_type: Optional[str], precision: str, mfu: Optional[float] = None,
              peak_tflops: Optional[float] = None) -> Speed:
    """--gpu-type (a name harness.model.flops knows, e.g. H100, A100; default H100), or any
    GPU with its --peak-tflops given."""
    mfu = DEFAULT_MFU if mfu is None else mfu
    if peak_tflops is not None:
        return Speed(peak_tflops * 1e12, mfu, gpu_type or "the GPU")
    gpu_type = gpu_type or DEFAULT_GPU_TYPE
    return Speed(peak_flops(gpu_type, precision), mfu, gpu_type)


def step_seconds(global_tokens: int, flops_per_token: float, recompute_share: float,
                 grad_accum: int, world_size: int, speed: Speed) -> float:
    """The formula above, for one optimizer step."""
    compute = global_tokens * flops_per_token * (1 + recompute_share)
    return compute / (world_size * speed.sustained) + grad_accum * MICRO_STEP_OVERHEAD_S


def duration(seconds: float) -> str:
    """3.2 s, 14 min, 5.3 h, 12.4 days."""
    if seconds < 90:
        return f"{seconds:.3g} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
