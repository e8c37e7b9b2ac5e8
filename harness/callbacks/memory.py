"""Peak memory per report, max over ranks: the rank that runs out first is the one to watch.

memory/gpu_max_allocated_gb (GPU): torch.cuda.max_memory_allocated since the previous report,
reset after each read, so a report is that interval's peak, not the run's.
memory/cpu_rss_gb (CPU): the process's peak resident set (getrusage's ru_maxrss), which
cannot be reset: the run's peak so far.

Read in on_step_end, after engine.step(), so the first report holds the optimizer states the
first step allocates. Reports: the process's first step, every train.log_every steps, the
last; steps in between carry no memory key. One all-reduce (max) and one host sync per report,
on the same steps on every rank. An evaluation or checkpoint save made in a step's
on_step_end (callbacks after this one) counts in the next report.
"""
from __future__ import annotations

import resource

import torch

from harness.common.callback import Callback

KEY = {"cuda": "memory/gpu_max_allocated_gb", "cpu": "memory/cpu_rss_gb"}


def peak_memory_gb(kind: str, device: torch.device) -> float:
    """This process's peak since the last reset (GPU) or since it started (CPU)."""
    if kind == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def reset_peak(kind: str, device: torch.device) -> None:
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class PeakMemory(Callback):
    order = 10  # before the loggers, so they see the key

    def __init__(self):
        self.every, self.first_step, self.last_step = 1, 1, 0
        self.kind = "cpu"  # the engine's device type: which memory is reported

    def on_train_start(self, trainer):
        self.kind = trainer.built.device
        self.every = trainer.cfg.train.log_every
        self.first_step, self.last_step = trainer.step + 1, trainer.cfg.train.max_steps

    def reports(self, step: int) -> bool:
        return step % self.every == 0 or step in (self.first_step, self.last_step)

    def on_step_end(self, trainer, step, metrics):
        if not self.reports(step):
            return
        comm = trainer.built.comm
        peak = torch.tensor([peak_memory_gb(self.kind, comm.device)], device=comm.device)
        reset_peak(self.kind, comm.device)  # the next report: the next interval's peak
        metrics[KEY[self.kind]] = comm.all_reduce(peak, "max").item()
