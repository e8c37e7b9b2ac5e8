"""The step-1 pre-clip gradient norm in plain PyTorch, fp32: what the smoke's first step must
reproduce.

The harness builds its model after seed_everything(train.seed) (harness/train/engine.py), so
the same call here gives the same initial weights; the first global batch is the trainer's
(the GlobalSampler over the same shards, micro-batches 0..accum-1 at position 0); each
micro-batch's loss / accum is backpropagated, and torch.nn.utils.clip_grad_norm_ returns the
norm before clipping. No DeepSpeed, no ZeRO, no mixed precision, no activation checkpointing:
what those change is what the check compares. (bench/gpu_reference.py does the same over
several steps, one sample at a time for 1.3B models; the package cannot import bench/, and one
step of a tiny model needs neither, so the few lines are repeated here.)
"""
from __future__ import annotations

import math

import torch

from harness.config import Config
from harness.data.sampler import GlobalSampler
from harness.data.shards import TokenShards
from harness.data.sources import TrainData
from harness.model import build_model
from harness.parallel.batch import make_plan
from harness.train.engine import seed_everything


def step1_norm(cfg: Config, device: str) -> float:
    """The global L2 norm of the first step's accumulated gradient, in fp32 on `device`."""
    if cfg.model.dropout:
        raise ValueError("the reference needs model.dropout=0 (its RNG stream differs)")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32
    try:
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model).float().to(device)  # built on the CPU, as build() does
        model.set_loss(cfg.train.z_loss, 0)  # full logits: the chunked loss's reference too
        batch = make_plan(cfg, 1).batch
        seqs = TokenShards.open(cfg.data.out_dir).sequences("train", cfg.model.block_size)
        data = TrainData(seqs, GlobalSampler(len(seqs), cfg.train.seed, batch.micro_batch, 0, 1),
                         device)
        for k in range(batch.grad_accum):
            x, y = data.micro_batch(0, k)
            (model(x, y) / batch.grad_accum).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        return float(norm)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
