"""Every read of a tensor's value by the host in one optimizer step, the harness's and DeepSpeed
0.19.8's: the list harness.train.trainer's docstring refers to, and that
tests/train/test_host_syncs.py compares a counted step with, per configuration.

On a GPU each read of a device tensor (item(), tolist(), float(t), bool(t), `if t:`, .cpu())
waits for every kernel queued before it, and so does a blocking copy from the host to the
device (torch.tensor(data, device=...) and .to(device) of host memory: cudaMemcpyAsync then
cudaStreamSynchronize) and torch.cuda.synchronize. A read of a tensor that is already on the
host costs nothing; the list keeps those too, so that a new read anywhere is noticed. Reads
made once, not every step, are not listed: the update-norm pass (GradNorms.update_metrics)
reads AdamW's step counts and copies its slices' layer groups and weights to the device when it
cuts its slices (its first step, after a checkpoint load or a rollback); its bias corrections
come from fused AdamW's step tensor on the device (grad_norms.py:_corrections).

What the CPU test cannot see (every tensor is on the CPU there, so a copy to the host and a
copy to the engine's device are the same .to('cpu') call; .to() is therefore not counted):
- harness/train/trainer.py:train_step: torch.cuda.synchronize() once per step, for the step
  time (CUDA only);
- harness/train/grad_norms.py:update_metrics: under ZeRO-Offload one copy of the update norms
  (computed on the host) to the device per step, before their all-reduce;
- harness/train/grad_norms.py:local_squares: torch.cuda.synchronize() under ZeRO-Offload;
- harness/train/grad_norms.py:_corrections: float() of torch AdamW's step count where it is
  on the host and the parameters on the device (neither fused nor capturable: not the harness's
  configuration), free;
- DeepSpeed's get_accelerator().FloatTensor/ByteTensor([x]) (blocking copies of Python
  numbers: get_weight_norm, has_overflow at ZeRO 0) and .to() copies of its own.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Read:
    op: str  # the Tensor method (item, tolist, cpu, __bool__, __float__), `tensor` (made on a
    # device from host data), `synchronize` (the accelerator's)
    where: str  # file:function, the first frame outside torch
    per: str  # step | micro (micro-step) | tensor (parameter tensor) | group (optimizer group)
    when: str  # always | monitor (optim/update_norm watched) | clip (clip.max_norm > 0) | the
    # DeepSpeed optimizer it is in: unfused (ZeRO 0 bf16: FP16_UnfusedOptimizer), bf16opt
    # (ZeRO 1 bf16, fp32 accumulation: BF16_Optimizer), zero12 (DeepSpeedZeroOptimizer),
    # zero3; several joined by +
    gpu: str  # what it costs on a GPU
    n: int = 1  # times per `per`


_H, _DS = "harness/", "deepspeed/runtime/"
HOST_SYNCS = (
    Read("cpu", _H + "parallel/collectives.py:reduce_scalars", "step", "always",
         "sync: the step's packed all-reduce (loss, norms, stats, stop flag) to the host"),
    Read("item", _H + "train/trainer.py:_reduced_scalars", "step", "always", "host: stop flag"),
    Read("tolist", _H + "train/trainer.py:_reduced_scalars", "step", "always",
         "host: means and maxima", n=2),
    Read("tolist", _H + "train/grad_norms.py:signals", "step", "always", "host: group norms"),
    Read("tolist", _H + "train/grad_norms.py:update_metrics", "step", "monitor",
         "sync: the update norms after their all-reduce"),
    Read("__bool__", _DS + "utils.py:has_overflow_serial", "tensor", "unfused",
         "sync per parameter tensor: the overflow check, even in bf16"),
    Read("item", _DS + "utils.py:has_overflow", "step", "unfused", "sync: the overflow flag"),
    Read("__float__", _DS + "utils.py:get_weight_norm", "group", "unfused", "sync: group norm"),
    Read("item", _DS + "utils.py:get_weight_norm", "group", "unfused",
         "sync: the same norm, copied back to the device first"),
    Read("__bool__", _DS + "utils.py:is_invalid_grad_norm", "step", "bf16opt", "sync: norm"),
    Read("tensor", _DS + "utils.py:mask_nan_or_inf_with_val_inplace", "step", "bf16opt",
         "blocking copy: a -1 fill value"),
    Read("__bool__", _DS + "utils.py:clip_tensors_by_global_norm", "step", "bf16opt+clip",
         "sync: clip coefficient < 1"),
    Read("__bool__", _DS + "utils.py:is_invalid_grad_norm", "step", "zero12", "sync: norm", n=3),
    Read("tensor", _DS + "utils.py:mask_nan_or_inf_with_val_inplace", "step", "zero12",
         "blocking copy: a -1 fill value", n=2),
    Read("item", _DS + "zero/stage_1_and_2.py:has_overflow", "step", "zero12",
         "sync: the overflow flag"),
    Read("__bool__", _DS + "utils.py:is_invalid_grad_norm", "step", "zero3", "sync: norm"),
    Read("tensor", _DS + "zero/stage3.py:get_grad_norm_direct", "step", "zero3",
         "blocking copies: norm accumulators", n=2),
)


def expected(conditions: set[str], counts: dict[str, int]) -> Counter:
    """(op, where) -> reads per optimizer step. conditions: those that hold (`always` added);
    counts: per-kind multiplicities, {"micro": grad_accum, "tensor": ..., "group": ...}."""
    holds = {"always", *conditions}
    out: Counter = Counter()
    for r in HOST_SYNCS:
        if set(r.when.split("+")) <= holds:
            out[(r.op, r.where)] += r.n * ({"step": 1, **counts}[r.per])
    return out
