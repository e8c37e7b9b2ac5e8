"""Derived speed, memory and clipping metrics, added to each step's metrics before the loggers.

throughput/mfu (GPU with a known peak only), memory/gpu_max_allocated_gb on a GPU or
memory/cpu_rss_gb on a CPU, and optim/clip_rate: the fraction of the last `window` steps
whose gradient was clipped (a run that clips nearly every step has too low a max_norm or
too high a learning rate).
"""
from __future__ import annotations

import logging
import resource
from collections import deque
from typing import Any, Optional

import torch

from harness.callbacks.base import Callback
from harness.flops import mfu, peak_flops
from harness.model import count_params, flops_per_token

log = logging.getLogger("harness")

_GB = 1e9


class Throughput(Callback):
    order = 10  # before the loggers, so they see these keys

    def __init__(self, window: int = 100):
        self.clipped: deque[bool] = deque(maxlen=max(1, window))
        self.flops_per_token = 0.0
        self.peak: Optional[float] = None
        self.world_size = 1
        self.on_gpu = False

    def on_train_start(self, trainer):
        self.flops_per_token = flops_per_token(trainer.cfg.model, count_params(trainer.built.model))
        self.world_size = trainer.built.dist.world_size
        self.on_gpu = trainer.built.device == "cuda"
        if self.on_gpu:
            name = torch.cuda.get_device_name()
            self.peak = peak_flops(name)
            if self.peak is None and trainer.is_main:
                log.warning("no peak FLOP/s known for GPU '%s': throughput/mfu is not reported "
                            "(add it to harness.flops.PEAK_FLOPS)", name)

    def on_step_end(self, trainer, step, metrics):
        if self.peak is not None:
            metrics["throughput/mfu"] = mfu(self.flops_per_token,
                                            metrics["throughput/tokens_per_s"],
                                            self.world_size, self.peak)
        if self.on_gpu:
            metrics["memory/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated() / _GB
        else:
            # ru_maxrss is in KiB on Linux: the peak resident set of this process
            metrics["memory/cpu_rss_gb"] = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GB)
        self.clipped.append(bool(metrics["optim/clipped"]))
        metrics["optim/clip_rate"] = sum(self.clipped) / len(self.clipped)

    # the window survives a restart, so clip_rate does not jump after a resume
    def state_dict(self) -> dict[str, Any]:
        return {"clipped": list(self.clipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipped.clear()
        self.clipped.extend(state.get("clipped", []))
