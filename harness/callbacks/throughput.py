"""Derived speed, memory and clipping metrics, added to each step's metrics before the loggers.

throughput/mfu (GPU with a known peak only) and optim/clip_rate: the fraction of the last `window` steps
whose gradient was clipped (a run that clips nearly every step has too low a max_norm or
too high a learning rate).

memory/gpu_max_allocated_gb (GPU): the largest peak over ranks of torch.cuda.max_memory_allocated
since the previous report, read AFTER the optimizer step (this hook runs after engine.step(),
so the first report holds the optimizer states the first step allocates) on the first step of
the process, every train.log_every steps and at the last; the peak is reset after each read,
so a report is that interval's peak, not the run's. One all-reduce (max) per report; steps in
between carry no value. An evaluation or checkpoint save made in a step's on_step_end counts in
the next report.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Optional

import torch

from harness.common.callback import Callback
from harness.model.flops import flops_per_token, mfu, peak_flops

log = logging.getLogger("harness")
GPU_MEMORY_KEY = "memory/gpu_max_allocated_gb"

class Throughput(Callback):
    order = 10  # before the loggers, so they see these keys

    def __init__(self, window: int = 100):
        self.clipped: deque[bool] = deque(maxlen=max(1, window))
        self.flops_per_token = 0.0
        self.peak: Optional[float] = None
        self.world_size = 1
        self.gpu_memory = False  # report GPU memory (on_train_start: the engine is on a GPU)
        self.every, self.first_step, self.last_step = 1, 1, 0

    def on_train_start(self, trainer):
        # counted before ZeRO 3 partitioned the parameters (numel 0 afterwards)
        self.flops_per_token = flops_per_token(trainer.cfg.model, trainer.built.n_params)
        self.world_size = trainer.built.dist.world_size
        self.gpu_memory = trainer.built.device == "cuda"
        self.every = trainer.cfg.train.log_every
        self.first_step, self.last_step = trainer.step + 1, trainer.cfg.train.max_steps
        if trainer.built.device == "cuda":
            name, precision = torch.cuda.get_device_name(), trainer.cfg.train.precision
            self.peak = peak_flops(name, precision)  # fp32 runs: against the TF32 peak
            if self.peak is None and trainer.is_main:
                log.warning("no %s peak FLOP/s known for GPU '%s': throughput/mfu is not "
                            "reported (add it to harness.model.flops)", precision, name)

    def on_step_end(self, trainer, step, metrics):
        if self.peak is not None:
            metrics["throughput/mfu"] = mfu(self.flops_per_token,
                                            metrics["throughput/tokens_per_s"],
                                            self.world_size, self.peak)
        self.clipped.append(bool(metrics["optim/clipped"]))
        metrics["optim/clip_rate"] = sum(self.clipped) / len(self.clipped)
        if self.gpu_memory:
            self._gpu_memory(trainer, step, metrics)

    def _gpu_memory(self, trainer, step: int, metrics: dict[str, Any]) -> None:
        metrics.pop(GPU_MEMORY_KEY, None)  # the trainer's, read before the step
        # the same steps on every rank (a collective follows)
        if step % self.every and step not in (self.first_step, self.last_step):
            return
        device = trainer.built.comm.device
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 1e9], device=device)
        torch.cuda.reset_peak_memory_stats(device)  # the next report: the next interval's peak
        metrics[GPU_MEMORY_KEY] = trainer.built.comm.all_reduce(peak, "max").item()

    # the window survives a restart, so clip_rate does not jump after a resume
    def state_dict(self) -> dict[str, Any]:
        return {"clipped": list(self.clipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipped.clear()
        self.clipped.extend(state.get("clipped", []))
