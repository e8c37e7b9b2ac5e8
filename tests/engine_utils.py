"""Shared by the engine tests: tiny configs, synthetic data, and a plain-PyTorch reference.

The reference repeats the harness's arithmetic with nothing but torch: the same GPT, the same
initial weights (same seed), the same micro-batches, loss / accumulation, clip_grad_norm_,
AdamW with the same parameter groups and LR schedule.
"""
from __future__ import annotations

import numpy as np
import torch

from harness.common.callback import Callback
from harness.config import Config, load_config
from harness.data.sampler import GlobalSampler
from harness.data.shards import Sequences
from harness.data.sources import TrainData
from harness.model import build_model, param_groups
from harness.parallel.batch import lr_at, make_plan
from harness.train.engine import build, seed_everything  # noqa: F401 (re-exported)
from harness.train.trainer import Trainer

# One-ulp gradient differences (a different summation order, ZeRO dividing by 1/clip_coef
# instead of multiplying by it) grow to ~7e-6 in the parameters over 3 AdamW steps at lr 1e-2:
# Adam's normalised update turns tiny gradients' rounding into lr-sized moves. Measured in
# plain PyTorch by test_accumulation's reference gap; 3e-5 leaves 4x headroom.
ROUNDING_TOL = 3e-5

SMALL = ["model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.block_size=16",
         "model.vocab_size=64", "train.global_batch_size=null", "optim.warmup_steps=2", "optim.lr=1e-2", "train.max_steps=3"]


def precision_args(stage: int, precision: str) -> list[str]:
    """Overrides for a precision at a stage: at ZeRO 0 DeepSpeed sums bf16/fp16 gradients in
    their own dtype only (fp32 accumulation is refused there)."""
    args = [f"zero.stage={stage}", f"train.precision={precision}"]
    if stage == 0 and precision != "fp32":
        args += [f"train.grad_accum_dtype={precision}", f"train.reduce_dtype={precision}"]
    return args


def small_cfg(*overrides: str) -> Config:
    return load_config("tiny", [*SMALL, *overrides])


def tokens(vocab: int = 64, n: int = 4096, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.int64)


def make_data(cfg: Config, micro: int, rank: int = 0, dp: int = 1, device="cpu") -> TrainData:
    seqs = Sequences(tokens(cfg.model.vocab_size), cfg.model.block_size)
    return TrainData(seqs, GlobalSampler(len(seqs), cfg.train.seed, micro, rank, dp), device)


class Record(Callback):
    def __init__(self):
        self.metrics = []

    def on_step_end(self, trainer, step, metrics):
        self.metrics.append(metrics)


def run_harness(cfg: Config, dtype=torch.float32, dist=None, callbacks=()):
    """Train cfg.train.max_steps steps on the real DeepSpeed engine; returns (params, metrics)."""
    torch.set_default_dtype(dtype)
    try:
        built = build(cfg, dist)
        rec = Record()
        b = built.plan.batch
        data = make_data(cfg, b.micro_batch, built.plan.dp_rank(built.dist.rank), b.dp_size)
        Trainer(cfg, built, data, [rec, *callbacks]).fit()
        params = {n: p.detach().clone() for n, p in full_params(built.engine)}
        return params, rec.metrics, built
    finally:
        torch.set_default_dtype(torch.float32)


def full_params(engine):
    """Parameters gathered to full size at every ZeRO stage."""
    import deepspeed

    if engine.autotp_size() > 1:  # tensor-parallel shards gathered across the group
        from harness.parallel.tensor_parallel import full_params as tp_full

        yield from tp_full(engine.module)
        return
    for name, p in engine.module.named_parameters():
        if hasattr(p, "ds_id"):  # ZeRO 3 partitioned
            with deepspeed.zero.GatheredParameters([p]):
                yield name, p.detach().clone()
        else:
            yield name, p


def plain_training(cfg: Config):
    """The harness's model, AdamW groups and LR schedule in plain PyTorch: (model, opt, sched)."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    plan = make_plan(cfg, 1)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=plan.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, plan, cfg) / plan.lr)
    return model, opt, sched


def run_reference(cfg: Config, micro: int, accum: int, dtype=torch.float32, loss_fn=None):
    """Plain PyTorch: returns (params, per-step pre-clip norms, per-step clipped grads).
    loss_fn(model, x, y): the loss written out in a test (default: the model's own)."""
    loss_fn = loss_fn or (lambda model, x, y: model(x, y))
    torch.set_default_dtype(dtype)
    try:
        model, opt, sched = plain_training(cfg)
        data = make_data(cfg, micro)
        norms, clipped = [], []
        global_batch = micro * accum
        for step in range(cfg.train.max_steps):
            for k in range(accum):
                x, y = data.micro_batch(step * global_batch, k)
                (loss_fn(model, x, y) / accum).backward()
            params = [p for p in model.parameters()]
            if cfg.clip.max_norm > 0:
                norms.append(torch.nn.utils.clip_grad_norm_(params, cfg.clip.max_norm).item())
            else:
                norms.append(torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in params])).item())
            clipped.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return dict(model.named_parameters()), norms, clipped
    finally:
        torch.set_default_dtype(torch.float32)


def plain_grads(cfg: Config, micro: int, accum: int, dtype=torch.float32,
                accum_dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The first step's accumulated gradient in plain PyTorch: the model in `dtype` (bf16 as
    DeepSpeed casts it), each micro-batch's gradient / accum summed in `accum_dtype`."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(dtype)
    model.set_loss(cfg.train.z_loss, 0)  # full logits: the chunked loss's reference too
    data = make_data(cfg, micro)
    grads = {n: torch.zeros_like(p, dtype=accum_dtype) for n, p in model.named_parameters()}
    for k in range(accum):
        x, y = data.micro_batch(0, k)
        model.zero_grad()
        (model(x, y) / accum).backward()
        for n, p in model.named_parameters():
            grads[n] += p.grad.to(accum_dtype)
    return {n: g.float() for n, g in grads.items()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


def child_env(**extra) -> dict:
    """Environment for a subprocess: without the rank variables an in-process engine build
    exported (a child would try to reuse this process's MASTER_PORT), one thread per rank."""
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command for `nproc` local ranks under torchrun --standalone; args: the script (or
    -m module) and its arguments. --standalone: torchrun's agent binds its rendezvous store on
    port 0 itself and the ranks join that store (torchrun gives them its MASTER_PORT and
    TORCHELASTIC_USE_AGENT_STORE=True, which init_process_group's env:// honours), so no port
    is picked, closed and handed on for another process to take in between."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *args]


ADDRESS_IN_USE = ("eaddrinuse", "address already in use")


def retry_on_port_clash(launch, attempts: int = 3):
    """For launchers that need a port number up front (the deepspeed launcher, ranks started
    by hand): launch(port) -> (result, output text) with a port that was free a moment ago;
    when rank 0 then found it taken (another process bound it in between: its output says
    EADDRINUSE), again with a new port."""
    import socket

    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result, output = launch(port)
        if not any(m in output.lower() for m in ADDRESS_IN_USE):
            return result
    raise AssertionError(f"{attempts} ports taken before rank 0 bound them:\n{output[-3000:]}")


class StopAt(Callback):
    """Ends the loop after `step`, as a crash right after a save would (minus the crash)."""

    order = 0

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            trainer.stop_reason = "test"


def final_params(cfg: Config, stop_at: int | None = None) -> dict[str, torch.Tensor]:
    """`harness train`'s trainer (harness.train.run.make_trainer) fitted in this process, to
    max_steps or stopped after step `stop_at`: its parameters."""
    from harness.train.run import make_trainer  # the whole train command: only where used

    trainer, _ = make_trainer(cfg)
    if stop_at:
        trainer.callbacks.insert(0, StopAt(stop_at))
    trainer.fit()
    return {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
