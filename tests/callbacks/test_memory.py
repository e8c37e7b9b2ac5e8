"""PeakMemory: read after the optimizer step, reset per report, only on report steps.

No GPU here: the allocator's counters are faked (the real ones run in bench/gpu_check.py).
"""
import torch
from engine_utils import small_cfg

from harness.callbacks.memory import PeakMemory
from harness.train.engine import build

BATCH = ["train.micro_batch_size=2", "train.grad_accum_steps=1"]


class _GpuPeakMemory(PeakMemory):
    """PeakMemory as on a GPU engine: the test runs on the CPU engine (no GPU here), so only the
    switch on_train_start sets from the device is forced; the memory code is the real one."""

    def on_train_start(self, trainer):
        super().on_train_start(trainer)
        self.kind = "cuda"


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
    Trainer(cfg, built, make_data(cfg, 2), [_GpuPeakMemory(), rec]).fit()
    reported = {m["step"]: m["memory/gpu_max_allocated_gb"] for m in rec.metrics
                if "memory/gpu_max_allocated_gb" in m}
    # the first step, every log_every=3 steps, the last: each the peak since the previous read
    assert reported == {1: 50.0, 3: 13.0, 6: 14.0, 7: 10.0}
    assert events == ["step1", "read", "reset", "step2", "step3", "read", "reset", "step4",
                      "step5", "step6", "read", "reset", "step7", "read", "reset"]
