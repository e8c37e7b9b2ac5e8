"""`harness plan`: per-GPU memory from the config alone, and the micro batch / checkpointing
choices that fit a GPU, fastest first.

Model states, per parameter (GB = 1e9 bytes throughout). Mixed precision (bf16/fp16) keeps
low-precision parameters 2 B and gradients 2 B, an fp32 master copy 4 B and Adam's m and v
8 B: 16 B. The usual quote "7B needs 14 GB params + 14 GB grads + 56 GB Adam" counts m+v as
the Adam states; the fp32 master copy is another 28 GB, listed on its own line (the ZeRO
paper folds it into K = 12 B of optimizer state). fp32 training: 4 + 4 + 8, no master copy.
ZeRO 1 shards master and Adam states over the data-parallel ranks, ZeRO 2 also the
gradients, ZeRO 3 also the parameters; zero.offload_optimizer moves master and Adam states
(and the optimizer step) to the CPU.

Tensor parallelism (parallel.tensor_parallel_size): each rank holds 1/tp of the tensors
AutoTP shards and all of the replicated rest, and ZeRO shards over the data-parallel ranks
(world / tp). Activations are per rank too (harness.model.memory.block_parts): what lies between a
column- and the next row-parallel layer (q, k, v, attention's saved tensors, the MLP's fc and
GELU outputs, llama's SwiGLU w1/w3 outputs and product) is 1/tp; the Layer- and RMSNorms, the
residual stream and its dropout masks, the embeddings and the head are whole on every rank.
With partition_activations a checkpoint keeps 1/tp of its input and its recompute gathers the
whole input again. Checked against the bytes saved for backward on each of 2 real ranks
(tests/plan/test_tp_memory.py, within 1%).

Activations come from harness.model.memory.predict_peak (bytes saved for backward, recompute
included). On top of them the loss needs working memory in its backward: the fp32 gradients
of the log-softmax output and input, 2 x 4 B per logit, alive while everything is still held.
The optimizer step briefly makes an fp32 copy of the (sharded) gradients; activations are
gone by then, so the peak is the larger of the two moments.
"""
from __future__ import annotations

import math
from dataclasses import astuple, replace
from functools import lru_cache

import torch

from harness.common.errors import HarnessError
from harness.config import Config, ModelConfig
from harness.model import build_model, count_params
from harness.model.flops import flops_per_token
from harness.model.memory import block_parts, checkpoint_kept, head_bytes, predict_peak
from harness.parallel.batch import checkpoint_segments, make_plan
from harness.parallel.tensor_parallel import spec_of
from harness.plan.speed import MICRO_STEP_OVERHEAD_S, Speed, step_seconds
from harness.train.ds_config import overlap_comm
from harness.train.engine import resolve_device

GB = 1e9
MARGIN = 0.10  # allocator fragmentation and what the model does not see
GPU_FIXED_BYTES = 2 * GB  # CUDA context, cuBLAS workspace, NCCL buffers
SEARCH_POLICIES = ("none", "attention", "mlp", "every_k", "sqrt", "every_layer")


# ---- model states ---------------------------------------------------------------------
def model_state_bytes(n_params: int, precision: str, zero_stage: int, dp: int,
                      offload_optimizer: bool = False,
                      grad_accum_dtype: str | None = None) -> dict[str, int]:
    """Per-GPU parameters, gradients, fp32 master copy and Adam m+v; `cpu` is what offload
    moved off the GPU. Shards round up, as DeepSpeed pads partitions. grad_accum_dtype
    (train.grad_accum_dtype; None = the precision's own) is where DeepSpeed 0.19.8 sums
    low-precision gradients (read from its source):
    - fp32 at ZeRO 2/3: the fp32 gradient partition (4 bytes / parameter / dp);
    - fp32 at ZeRO 1: bf16 without offload is BF16_Optimizer, a full fp32 buffer beside the
      full bf16 gradients (6 bytes / parameter); otherwise a full fp32 `grad_accum` (4)."""
    mixed = precision in ("bf16", "fp16")
    weight = 2 if mixed else 4

    def per_gpu(nbytes: int, sharded_from_stage: int) -> int:
        n = math.ceil(n_params / dp) if zero_stage >= sharded_from_stage else n_params
        return n * nbytes

    gradients = per_gpu(weight, 2)
    if mixed and grad_accum_dtype == "fp32":
        gradients = per_gpu(4, 2)
        if zero_stage == 1 and precision == "bf16" and not offload_optimizer:
            gradients = n_params * (weight + 4)
    out = {"parameters": per_gpu(weight, 3), "gradients": gradients,
           "master_params": per_gpu(4, 1) if mixed else 0, "optimizer_states": per_gpu(8, 1),
           "cpu": 0}
    if offload_optimizer:  # the CPU also keeps an fp32 copy of its gradient shard
        out["cpu"] = out["master_params"] + out["optimizer_states"] + per_gpu(4, 1)
        out["master_params"] = out["optimizer_states"] = 0
    return out


def param_counts(cfg: Config) -> dict[str, int]:
    return _counts(astuple(cfg.model))


@lru_cache(maxsize=16)
def _counts(model_fields: tuple) -> dict[str, int]:
    """Counted on a meta-device model (no memory, no init cost), so they match the model."""
    with torch.device("meta"):
        model = build_model(ModelConfig(*model_fields))
    block = model.blocks[0]
    sharded = sum(p.numel() for n, p in model.named_parameters() if spec_of(n) is not None)
    return {"total": count_params(model), "block": count_params(block), "tp_sharded": sharded,
            "attention": count_params(block.attn) + count_params(block.ln_1),
            "mlp": count_params(block.mlp) + count_params(block.ln_2)}


def tp_rank_params(counts: dict[str, int], tp: int) -> int:
    """Parameters one rank holds under tensor parallelism: its 1/tp of what AutoTP shards
    (harness.parallel.tensor_parallel.LAYER_SPECS: qkv, fc, both projections' weights; llama's wq,
    wk, wv, wo, w1, w2, w3), all of the replicated rest (embeddings and head, norms, the
    projections' biases)."""
    return counts["total"] - counts["tp_sharded"] + math.ceil(counts["tp_sharded"] / tp)


def _comm_buffers(cfg: Config, counts: dict[str, int], device: str) -> int:
    """ZeRO's reduce bucket; ZeRO 1/2 hold two with overlap_comm as resolved for the device
    (DeepSpeed 0.19.8 double-buffers there; ZeRO 3 keeps one and moves the reduction to its
    own stream). ZeRO 3 also holds the gathered parameters of the block in use and the one
    being prefetched."""
    z, weight = cfg.zero, 2 if cfg.train.precision != "fp32" else 4
    if z.stage == 0:
        return 0
    double = z.stage in (1, 2) and overlap_comm(cfg, device)
    buckets = z.reduce_bucket_size * weight * (2 if double else 1)
    return buckets + (2 * counts["block"] * weight if z.stage == 3 else 0)


# ---- activations ----------------------------------------------------------------------
def _segments(cfg: Config, policy: str):
    ac = replace(cfg.activation_checkpointing, policy=policy)
    if policy == "count" and ac.number_checkpoints is None:
        raise HarnessError("policy count needs activation_checkpointing.number_checkpoints")
    return checkpoint_segments(ac, cfg.model.n_layer)


def _act_bytes(cfg: Config) -> int:
    return 4 if cfg.train.precision == "fp32" else 2


def _sharding(cfg: Config) -> tuple[int, bool]:
    """(tensor-parallel size, partition_activations): how a rank's activations shrink."""
    return cfg.parallel.tp_size, cfg.activation_checkpointing.partition_activations


def activation_bytes(cfg: Config, micro: int, policy: str, fused: bool) -> int:
    """Peak bytes saved for backward under `policy`, per rank. fused: a GPU, where
    FlashAttention applies attention dropout inside its kernel (no T x T tensors, unlike a
    CPU's math path) and RMSNorm runs as one kernel."""
    t = cfg.train
    head = head_bytes(cfg.model, micro, _act_bytes(cfg), fused, t.loss_chunk_tokens)
    return predict_peak(cfg.model, micro, policy, _segments(cfg, policy), _act_bytes(cfg),
                        fused, head, *_sharding(cfg))


def _loss_working_bytes(cfg: Config, micro: int) -> int:
    """The loss's fp32 working memory: the log-softmax backward's gradients (2 x 4 B per logit)
    for full logits; chunked, the same for one chunk, made in the forward."""
    tokens = micro * cfg.model.block_size
    if cfg.train.loss_chunk_tokens:
        tokens = min(tokens, cfg.train.loss_chunk_tokens)
    return 2 * tokens * cfg.model.vocab_size * 4


def recompute_share(cfg: Config, policy: str, counts: dict[str, int]) -> float:
    """Extra FLOPs of a policy as a share of a step without it: the recomputed forwards.
    Forward FLOPs per token are a third of flops_per_token: 2 per weight plus attention's
    4 d T per layer."""
    m = cfg.model
    attention = 2 * counts["attention"] + 4 * m.d_model * m.block_size
    per_layer = {"attention": attention, "mlp": 2 * counts["mlp"]}.get(
        policy, attention + 2 * counts["mlp"])
    n_recomputed = 0 if policy == "none" else (
        m.n_layer if policy in ("attention", "mlp") else
        sum(b - a for a, b in _segments(cfg, policy)))
    return n_recomputed * per_layer / flops_per_token(m, counts["total"])


# ---- the whole picture ----------------------------------------------------------------
def predict_memory(cfg: Config, world_size: int, micro_batch: int | None = None,
                   policy: str | None = None, gpu_memory_bytes: float | None = None,
                   device: str | None = None) -> dict:
    """Per-GPU bytes of one training step (device: where it runs; default cuda when
    gpu_memory_bytes is given). Keys: parameters, gradients, master_params, optimizer_states
    (Adam m+v), comm_buffers, model_states (their sum); activations (peak saved for backward
    under `policy`), activations_per_layer / checkpointed_per_layer (what one block keeps
    without / with block checkpointing); logits (the loss backward's fp32 working memory);
    step_transient; cpu (offloaded); peak (estimates torch.cuda.max_memory_allocated);
    required (peak + margin + CUDA overhead on a GPU); fits (None without gpu_memory_bytes)."""
    if world_size < 1:
        raise HarnessError(f"world size {world_size} must be >= 1")
    micro = (micro_batch or cfg.train.micro_batch_size
             or make_plan(cfg, world_size).batch.micro_batch)
    policy = policy or cfg.activation_checkpointing.policy
    if device is None:
        device = "cuda" if gpu_memory_bytes is not None else resolve_device(cfg)
    fused = device == "cuda"
    counts = param_counts(cfg)
    tp = cfg.parallel.tp_size
    if world_size % tp:
        raise HarnessError(f"world size {world_size} is not divisible by "
                           f"parallel.tensor_parallel_size={tp}")
    dp = world_size // tp
    rank_params = tp_rank_params(counts, tp)
    states = model_state_bytes(rank_params, cfg.train.precision, cfg.zero.stage, dp,
                               cfg.zero.offload_optimizer, cfg.train.grad_accum_dtype)
    m, mixed = cfg.model, _act_bytes(cfg) == 2
    parts = block_parts(m, micro, _act_bytes(cfg), fused, tp)
    out = {"n_params": counts["total"], "device": device, "micro_batch": micro, "policy": policy,
           **states, "comm_buffers": _comm_buffers(cfg, counts, device),
           "activations": activation_bytes(cfg, micro, policy, fused),
           "activations_per_layer": parts["input"] + parts["attention"] + parts["mlp"],
           "checkpointed_per_layer": checkpoint_kept(parts, *_sharding(cfg)),
           "logits": _loss_working_bytes(cfg, micro)}
    on_gpu = ("parameters", "gradients", "master_params", "optimizer_states", "comm_buffers")
    out["model_states"] = sum(out[k] for k in on_gpu)
    shard = math.ceil(rank_params / (dp if cfg.zero.stage >= 1 else 1))
    out["step_transient"] = 4 * shard if mixed and not cfg.zero.offload_optimizer else 0
    out["peak"] = out["model_states"] + max(out["activations"] + out["logits"],
                                            out["step_transient"])
    out["required"] = int(out["peak"] * (1 + MARGIN) + (GPU_FIXED_BYTES if fused else 0))
    out["gpu_memory"] = gpu_memory_bytes
    out["fits"] = None if gpu_memory_bytes is None else out["required"] <= gpu_memory_bytes
    return out


def recommend(cfg: Config, world_size: int, gpu_memory_bytes: float,
              target_global_batch: int, speed: Speed | None = None) -> list[dict]:
    """Every (micro_batch, grad_accum, policy) that reaches the global batch and fits, fastest
    first, each with its estimated seconds per step (`step_s`, harness.plan.speed: the
    FLOPs, recompute included, at the assumed speed, plus a fixed cost per micro-step, so
    small micro batches waste more; ZeRO 2/3 gradient traffic per micro-step is not
    modelled) and `relative` to the fastest."""
    speed = speed or Speed(None)
    dp = world_size // cfg.parallel.tp_size  # make_plan refuses a world tp does not divide
    if target_global_batch < 1 or target_global_batch % dp:
        raise HarnessError(f"--target-global-batch={target_global_batch} must be a positive "
                           f"multiple of the data-parallel size {dp} (world size {world_size} "
                           f"/ tensor-parallel {cfg.parallel.tp_size})")
    counts = param_counts(cfg)
    flops = flops_per_token(cfg.model, counts["total"])
    tokens = target_global_batch * cfg.model.block_size
    policies = SEARCH_POLICIES + (("count",) if cfg.activation_checkpointing.number_checkpoints
                                  else ())
    per_rank, found = target_global_batch // dp, []
    for micro in divisors(per_rank):
        fits_any = False
        for policy in policies:
            mem = predict_memory(cfg, world_size, micro, policy, gpu_memory_bytes, "cuda")
            if not mem["fits"]:
                continue
            fits_any = True
            share = recompute_share(cfg, policy, counts)
            accum = per_rank // micro
            step = step_seconds(tokens, flops, share, accum, world_size, speed)
            fixed = accum * MICRO_STEP_OVERHEAD_S / (step - accum * MICRO_STEP_OVERHEAD_S)
            found.append({"micro_batch": micro, "grad_accum": accum, "policy": policy,
                          "cost": step, "step_s": step, "required": mem["required"],
                          "peak": mem["peak"],
                          "why": _why(policy, share, micro, fixed, mem, gpu_memory_bytes)})
        if not fits_any:  # memory grows with the micro batch: no larger one fits either
            break
    found.sort(key=lambda c: (c["cost"], c["required"]))
    for c in found:
        c["relative"] = c["cost"] / found[0]["cost"]
    return found


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending, by trial division up to sqrt(n) (n = 10**12: 10**6 steps,
    not 10**12)."""
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def _why(policy: str, share: float, micro: int, waste: float, mem: dict, gpu: float) -> str:
    redo = "no recompute" if policy == "none" else f"recomputes {share:.0%} more FLOPs"
    fixed = f"{waste:.0%}" if waste < 10 else f"{waste:.0f}x"
    return (f"{redo}; the fixed per-micro-step cost adds {fixed} to micro {micro}'s compute; "
            f"needs {mem['required'] / GB:.1f} of {gpu / GB:.1f} GB")


