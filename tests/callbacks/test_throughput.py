"""Throughput's FLOPs per token come from the model as defined, whatever ZeRO did to it."""
from types import SimpleNamespace

import torch

from engine_utils import small_cfg

from harness.callbacks.throughput import Throughput
from harness.model import count_params
from harness.model.flops import flops_per_token
from harness.model.gpt import GPT
from harness.train.engine import build

BATCH = ["train.micro_batch_size=2", "train.grad_accum_steps=1"]


def _flops(stage: int) -> tuple[float, int]:
    cfg = small_cfg(*BATCH, f"zero.stage={stage}")
    built = build(cfg)
    cb = Throughput()
    cb.on_train_start(SimpleNamespace(cfg=cfg, built=built, is_main=True, step=0))
    return cb.flops_per_token, sum(p.numel() for p in built.engine.module.parameters())


def test_flops_per_token_are_the_same_at_zero0_and_zero3():
    cfg = small_cfg(*BATCH)
    expected = flops_per_token(cfg.model, count_params(GPT(cfg.model)))
    (f0, numel0), (f3, numel3) = _flops(0), _flops(3)
    assert numel3 < numel0  # ZeRO 3 really emptied the parameters (the trap)
    assert f0 == f3 == expected


class _GpuThroughput(Throughput):
    """Throughput as on a GPU engine: the test runs on the CPU engine (no GPU here), so only the
    switch on_train_start sets from the device is forced; the memory code is the real one."""

    def on_train_start(self, trainer):
        super().on_train_start(trainer)
        self.gpu_memory = True


def test_gpu_peak_memory_is_read_after_the_step_and_reset_per_interval(monkeypatch):
    """The real trainer and engine (CPU), with torch.cuda.max_memory_allocated and
    reset_peak_memory_stats faked as an allocator whose peak each optimizer step raises to the
    GB listed for it. Step 1 allocates the most (Adam's states): a read before the step would
    miss it, and a never-reset peak would report 50 GB for ever."""
    from engine_utils import Record, make_data

    from harness.train.trainer import Trainer

    step_peaks = [50, 12, 13, 11, 14, 12, 10]
    cfg = small_cfg(*BATCH, f"train.max_steps={len(step_peaks)}", "train.log_every=3")
    built = build(cfg)
    events, alloc = [], {"peak": 1.0, "steps": 0}
    real_step = built.engine.step

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        alloc["peak"] = max(alloc["peak"], step_peaks[alloc["steps"]])
        alloc["steps"] += 1
        events.append(f"step{alloc['steps']}")
        return out

    def read(device=None):
        events.append("read")
        return alloc["peak"] * 1e9

    def reset(device=None):
        events.append("reset")
        alloc["peak"] = 1.0  # what is allocated between steps

    built.engine.step = step
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", read)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    rec = Record()
    Trainer(cfg, built, make_data(cfg, 2), [_GpuThroughput(), rec]).fit()
    reported = {m["step"]: m["memory/gpu_max_allocated_gb"] for m in rec.metrics
                if "memory/gpu_max_allocated_gb" in m}
    # the first step, every log_every=3 steps, the last: each the peak since the previous read
    assert reported == {1: 50.0, 3: 13.0, 6: 14.0, 7: 10.0}
    assert events == ["step1", "read", "reset", "step2", "step3", "read", "reset", "step4",
                      "step5", "step6", "read", "reset", "step7", "read", "reset"]
