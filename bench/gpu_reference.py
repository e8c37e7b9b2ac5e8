"""bench/gpu_check.py's reference: plain PyTorch in fp32 on the same weights and batches.

harness.model.build_model after harness.train.engine.seed_everything(train.seed), as
harness.train.engine.build does; each step's global batch drawn from the same shards by the
trainer's GlobalSampler; loss / accumulation backward, one sample at a time (the mean over
equal-length samples splits exactly, and 1.3B parameters' fp32 activations for a whole micro
batch would not fit); clip_grad_norm_; torch.optim.AdamW with the harness's parameter groups
(harness.model.param_groups) and its learning rate schedule (harness.parallel.batch.lr_at).
No DeepSpeed, no mixed precision, no ZeRO, no checkpointing: what those change is what the
check compares.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from harness.data.sampler import GlobalSampler
from harness.data.shards import TokenShards
from harness.data.sources import TrainData
from harness.model import build_model, param_groups
from harness.parallel.batch import lr_at, make_plan
from harness.train.engine import seed_everything


@dataclass
class Reference:
    norms: list[float] = field(default_factory=list)  # pre-clip, per step
    losses: list[float] = field(default_factory=list)  # train/loss, per step
    initial: dict[str, torch.Tensor] = field(default_factory=dict)  # fp32, on the CPU
    final: dict[str, torch.Tensor] = field(default_factory=dict)  # after `steps` updates


def reference_run(cfg, device: str, steps: int, keep_params: bool) -> Reference:
    if cfg.model.dropout:
        raise ValueError("the reference needs model.dropout=0 (its RNG stream differs)")
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    torch.set_default_dtype(torch.float32)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(device)  # built on the CPU as build() does: same weights
    model.set_loss(cfg.train.z_loss, 0)  # the full-logits loss: the chunked one's reference
    plan = make_plan(cfg, 1)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=plan.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps)
    seqs = TokenShards.open(cfg.data.out_dir).sequences("train", cfg.model.block_size)
    batch = plan.batch
    data = TrainData(seqs, GlobalSampler(len(seqs), cfg.train.seed, batch.micro_batch, 0, 1),
                     device)
    out = Reference()
    if keep_params:
        out.initial = _params(model)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for k in range(batch.grad_accum):
            x, y = data.micro_batch(step * batch.global_batch, k)  # what the trainer draws
            for i in range(len(x)):
                part = model(x[i:i + 1], y[i:i + 1]) / (batch.grad_accum * len(x))
                part.backward()
                loss += part.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip.max_norm or math.inf)
        out.norms.append(norm.item())
        out.losses.append(loss)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, plan, cfg)
        opt.step()
    if keep_params:
        out.final = _params(model)
    del model, opt, data
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
