"""Derived speed and clipping metrics, added to each step's metrics before the loggers.

throughput/mfu (GPU with a known peak only) and optim/clip_rate: the fraction of the last
`window` steps whose gradient was clipped (a run that clips nearly every step has too low a
max_norm or too high a learning rate). Memory: harness.callbacks.memory.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Optional

import torch

from harness.common.callback import Callback
from harness.model.flops import flops_per_token, mfu, peak_flops

log = logging.getLogger("harness")

class Throughput(Callback):
    order = 10  # before the loggers, so they see these keys

    def __init__(self, window: int = 100):
        self.clipped: deque[bool] = deque(maxlen=max(1, window))
        self.flops_per_token = 0.0
        self.peak: Optional[float] = None
        self.world_size = 1

    def on_train_start(self, trainer):
        # counted before ZeRO 3 partitioned the parameters (numel 0 afterwards)
        self.flops_per_token = flops_per_token(trainer.cfg.model, trainer.built.n_params)
        self.world_size = trainer.built.dist.world_size
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

    # the window survives a restart, so clip_rate does not jump after a resume
    def state_dict(self) -> dict[str, Any]:
        return {"clipped": list(self.clipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipped.clear()
        self.clipped.extend(state.get("clipped", []))
