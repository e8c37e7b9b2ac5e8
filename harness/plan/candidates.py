"""`harness plan --gpu`: every layout that fits (ZeRO stage, tensor-parallel size, micro batch,
accumulation, checkpointing policy) with its predicted step time from harness/plan/throughput.py,
fastest first, and the config exactly as given ("as configured") whether it fits or not.

A config becomes a throughput.Workload here: its GEMMs (GPT-2's fused qkv, proj, fc, fc2;
llama's wq wk wv wo w1 w3 w2), the head whole on every tensor-parallel rank (AutoTP replicates
it), the parameters a rank holds (planner.tp_rank_params), F = flops_per_token for MFU, the
policy's recompute share, and the harness's own fixed cost per micro-step
(speed.MICRO_STEP_OVERHEAD_S: launches, DeepSpeed's hooks, the monitor).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from harness.common.errors import HarnessError
from harness.config import Config, validate
from harness.config.model import ffn_hidden
from harness.model.flops import flops_per_token
from harness.parallel.batch import make_plan
from harness.plan.flags import World
from harness.plan.hardware import Hardware
from harness.plan.planner import (SEARCH_POLICIES, divisors, param_counts, predict_memory,
                                  recompute_share, tp_rank_params)
from harness.plan.speed import MICRO_STEP_OVERHEAD_S
from harness.plan.throughput import Gemm, StepTime, Workload, layer_gemms, step_time
from harness.train.ds_config import overlap_comm

ZERO_STAGES = (0, 1, 2, 3)


def workload(cfg: Config, world: World, micro: int, accum: int, policy: str,
             host_s: float = MICRO_STEP_OVERHEAD_S) -> Workload:
    m, tp = cfg.model, cfg.parallel.tp_size
    counts = param_counts(cfg)
    ffn = ffn_hidden(m) if m.arch == "llama" else 4 * m.d_model
    wide = cfg.train.precision == "fp32" or cfg.train.grad_accum_dtype == "fp32"
    return Workload(
        n_layer=m.n_layer, d_model=m.d_model, seq=m.block_size, vocab=m.vocab_size,
        layer_gemms=layer_gemms(m.arch, m.d_model, ffn, m.n_head, m.n_kv_head),
        head=Gemm(m.d_model, m.vocab_size), n_params=counts["total"],
        rank_params=tp_rank_params(counts, tp),
        model_flops_per_token=flops_per_token(m, counts["total"]), micro_batch=micro,
        grad_accum=accum, dp=world.size // tp, tp=tp,
        gpus_per_node=world.gpus_per_node or world.size, zero_stage=cfg.zero.stage,
        recompute=recompute_share(cfg, policy, counts), precision=cfg.train.precision,
        host_s=host_s, grad_bytes=4 if wide else 2, overlap=overlap_comm(cfg, "cuda"))


def row(cfg: Config, world: World, hw: Hardware, micro: int, accum: int, policy: str,
        fits: bool, as_configured: bool = False) -> dict:
    t: StepTime = step_time(workload(cfg, world, micro, accum, policy), hw)
    return {"as_configured": as_configured, "zero_stage": cfg.zero.stage,
            "tp": cfg.parallel.tp_size, "micro_batch": micro, "grad_accum": accum,
            "policy": policy, "fits": bool(fits), "step_time_s": t.total,
            "tokens_per_s_per_gpu": t.tokens_per_s_per_gpu, "mfu": t.mfu,
            "limiter": t.limiter, "tokens_per_step": t.tokens}


def as_configured(cfg: Config, world: World, hw: Hardware, memory: float,
                  target: int) -> dict:
    """The config's own stage, tensor-parallel size, micro batch and policy."""
    dp = world.size // cfg.parallel.tp_size
    micro = cfg.train.micro_batch_size or make_plan(cfg, world.size).batch.micro_batch
    if target % (dp * micro):
        raise HarnessError(f"train.micro_batch_size={micro} x data-parallel {dp} does not "
                           f"divide the global batch {target}: change one of them")
    policy = cfg.activation_checkpointing.policy
    mem = predict_memory(cfg, world.size, micro, policy, memory, "cuda")
    return row(cfg, world, hw, micro, target // (dp * micro), policy, mem["fits"], True)


def variants(cfg: Config, world: World) -> list[Config]:
    """The config at every ZeRO stage and tensor-parallel size (dividing the GPUs per node)
    that its own checks accept (e.g. AutoTP refuses ZeRO 3 and heads it cannot split)."""
    per_node = world.gpus_per_node or world.size
    out = []
    for tp in divisors(per_node):
        if world.size % tp:
            continue
        for stage in ZERO_STAGES:
            v = replace(cfg, zero=replace(cfg.zero, stage=stage),
                        parallel=replace(cfg.parallel, tensor_parallel_size=tp,
                                         model_parallel_size=1))
            try:
                validate(v)
            except HarnessError:
                continue
            out.append(v)
    return out


def search(cfg: Config, world: World, hw: Hardware, memory: float, target: int,
           policies: Optional[tuple] = None) -> list[dict]:
    """Every fitting layout for the global batch `target`, fastest first."""
    policies = policies or SEARCH_POLICIES
    found = []
    for v in variants(cfg, world):
        dp = world.size // v.parallel.tp_size
        if target % dp:
            continue
        per_rank = target // dp
        for micro in divisors(per_rank):
            fits_any = False
            for policy in policies:
                if not predict_memory(v, world.size, micro, policy, memory, "cuda")["fits"]:
                    continue
                fits_any = True
                found.append(row(v, world, hw, micro, per_rank // micro, policy, True))
            if not fits_any:  # memory grows with the micro batch
                break
    found.sort(key=lambda r: (r["step_time_s"], r["zero_stage"], r["tp"], -r["micro_batch"]))
    return found
