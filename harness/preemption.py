"""Stop at a step boundary on SIGUSR1/SIGTERM (Slurm's preemption and time-limit warnings).

The handler only records the signal, so a second signal during a save cannot interrupt it.
Ranks agree before acting: the Trainer sums `flag()` over ranks in each step's one packed
all-reduce, so a signal that arrives after a step's all-reduce is acted on after the next step.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    def __init__(self):
        self.received: Optional[str] = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def flag(self, device) -> torch.Tensor:
        """1 if this rank saw a signal: summed over ranks in the step's one all-reduce, so that
        a signal seen by any rank stops all of them after the same step."""
        return torch.tensor([1.0 if self.received else 0.0], device=device)
