"""Config -> plan -> DeepSpeed JSON -> model -> engine, for one process.

Everything that has to happen in a particular order before the first step lives here:
the accelerator choice before deepspeed is imported, the rank environment, seeding,
deepspeed.checkpointing.configure (the engine does not apply that section itself).
"""
from __future__ import annotations

import datetime
import logging
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from harness.common.errors import HarnessError
from harness.config import Config
from harness.model import build_model, count_params, param_groups
from harness.parallel import distributed, peers, tensor_parallel
from harness.parallel.batch import Plan, lr_at, make_plan
from harness.parallel.collectives import Collectives
from harness.train import init_from
from harness.train.compile import compile_model
from harness.train.ds_config import build_ds_config

log = logging.getLogger("harness")


def resolve_device(cfg: Config) -> str:
    """The device to train on, refusing what this machine cannot do (before any build)."""
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise HarnessError("train.device=cuda but torch sees no CUDA GPU here: use "
                           "train.device=auto or cpu, or a CUDA build of torch")
    if device == "cpu" and cfg.train.precision == "fp16":
        raise HarnessError("train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has "
                           "no fp16): use train.precision=bf16 or fp32 on the CPU")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Built:
    engine: Any
    model: nn.Module  # harness.model.gpt.GPT or harness.model.llama.Llama (model.arch)
    plan: Plan
    ds_config: dict[str, Any]
    dist: distributed.DistEnv
    device: str
    lr_scale: list[float]  # a box the LR schedule reads: the spike monitor's lr_cut sets it
    comm: Collectives  # every collective the harness makes, on the engine's device
    n_params: int  # counted before ZeRO 3 partitions them (numel 0 afterwards)
    hosts: list[str]  # hosts[r]: rank r's host name, gathered once at start-up


def import_deepspeed(device: str):
    # pin the accelerator before the first import; detection warns and can pick wrongly
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    # JIT-compiled ops are rebuilt whenever another ninja version built them last: always use
    # the environment's own (deepspeed depends on the ninja package)
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    import deepspeed  # noqa: WPS433 (deliberately late)

    return deepspeed


def skip_shm_comm_op(deepspeed) -> None:
    """Keep DeepSpeed's CPU accelerator from JIT-compiling its shared-memory op
    (deepspeed_shm_comm) in init_distributed: 1-2 minutes of silence on 2 cores with a cold
    extension cache, then rebuilt whenever another venv used that cache. Training never calls
    it: it serves only inference_all_reduce (DeepSpeed's inference-mode tensor-parallel
    layers), which without it falls back to the process group's all_reduce. DeepSpeed reads
    whether the op is compatible from one dict it keeps (deepspeed.ops.__compatible_ops__)."""
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def configure_checkpointing(deepspeed, cfg: Config, plan: Plan, ds: dict[str, Any], model: nn.Module,
                            dist: distributed.DistEnv) -> None:
    if not plan.segments:
        model.set_checkpointing((), "none", None)
        return
    ac = cfg.activation_checkpointing
    if ac.partition_activations and plan.tp_size == 1 and dist.rank == 0:
        log.warning("activation_checkpointing.partition_activations saves nothing without tensor "
                    "parallelism (model-parallel size 1): it only splits checkpoints across "
                    "model-parallel ranks")
    # under tensor parallelism: DeepSpeed's groups (made by deepspeed.initialize), so that
    # partition_activations splits each checkpointed input across the tensor-parallel group
    mpu = tensor_parallel.groups_mpu() if plan.tp_size > 1 else None
    deepspeed.checkpointing.configure(mpu, deepspeed_config=ds)
    model.set_checkpointing(plan.segments, ac.policy, deepspeed.checkpointing.checkpoint)


def start_optimizer_fresh(engine) -> None:
    """DeepSpeed's FP16_UnfusedOptimizer and FP16_Optimizer (ZeRO 0 with bf16 or fp16) take one
    optimizer step on zero gradients when built, to create Adam's state: the step count then
    starts at 1, so the first update is sqrt(1 + beta2) / (1 + beta1) = 0.735 of Adam's, and the
    fp32 masters are decayed once by lr x weight_decay. Drop that state and recopy the masters
    from the weights: the first step is then Adam's first, as at ZeRO 1-3
    (tests/train/test_zero0_bf16_update.py). A checkpoint load replaces both afterwards."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if isinstance(opt, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        opt.optimizer.state.clear()
        opt.refresh_fp32_params()


def build(cfg: Config, dist: distributed.DistEnv | None = None) -> Built:
    dist = dist or distributed.detect()
    distributed.export(dist)
    device = resolve_device(cfg)
    if device == "cuda":  # the GPU this task can see, before NCCL and DeepSpeed bind one
        distributed.bind_device(dist)
    deepspeed = import_deepspeed(device)
    plan = make_plan(cfg, dist.world_size)
    ds = build_ds_config(cfg, plan, device)
    # same initial weights on every rank and every run with this seed
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    init_from.maybe_init(model, cfg)  # model.init_from: before DeepSpeed wraps the model
    model.set_loss(cfg.train.z_loss, cfg.train.loss_chunk_tokens)
    n_params = count_params(model)
    if device == "cuda":  # fp32 matmuls (fp32 runs, the fp32 loss) on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device == "cpu":
        skip_shm_comm_op(deepspeed)
    deepspeed.init_distributed(
        dist_backend="gloo" if device == "cpu" else "nccl",
        timeout=datetime.timedelta(seconds=cfg.parallel.collective_timeout_s))
    peak, lr_scale = plan.lr, [1.0]

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_at(s, plan, cfg) / peak * lr_scale[0])

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=ds, lr_scheduler=scheduler, dist_init_required=True)
    start_optimizer_fresh(engine)
    # after initialize: it makes the tensor-parallel groups that partition_activations splits
    # over (checkpointing.configure also asks the process group for ranks)
    configure_checkpointing(deepspeed, cfg, plan, ds, model, dist)
    if cfg.train.compile:  # the top level and each block (a checkpoint breaks the graph)
        compile_model(engine, model, cfg.activation_checkpointing.policy)
    # per-rank data order and dropout streams differ; weights were already drawn identically.
    # The ranks of one tensor-parallel group share a stream: dropout on their replicated
    # activations must draw the same mask (dp_rank = rank at TP 1)
    seed_everything(cfg.train.seed + 1000 * plan.dp_rank(dist.rank))
    comm = Collectives(engine.device)
    peers.bound_every_group(cfg.parallel.collective_timeout_s)  # DeepSpeed's groups too
    # every rank's host, for the start-up layout check and for naming a rank that goes away
    hosts = peers.gather_hosts(comm, dist.rank, dist.world_size)
    peers.record(dist.rank, hosts, cfg.parallel.collective_timeout_s)
    return Built(engine, model, plan, ds, dist, device, lr_scale, comm, n_params, hosts)
