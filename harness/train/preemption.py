"""Stop at a step boundary on SIGUSR1/SIGTERM (Slurm's preemption and time-limit warnings) and
on Ctrl-C (SIGINT).

The handler only records the signal, so a second USR1/TERM during a save cannot interrupt it.
Ranks agree before acting: the Trainer sums `flag()` over ranks in each step's one packed
all-reduce, so a signal that arrives after a step's all-reduce is acted on after the next step.

Ctrl-C stops the same way (finish the step, save, exit with INTERRUPT_EXIT_CODE), and tells the
person at the terminal so once. A second Ctrl-C aborts at once: the first one hands SIGINT back
to the kernel's default action, which ends the process even while it sits inside a C call (a
collective, a save) where a Python handler would only run once the call returns. The newest
complete checkpoint stays whole (saves are renamed into place when complete).
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

import torch

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# the trainer exits with this after saving on USR1/TERM: "not done, run me again" (the batch
# script requeues on it)
REQUEUE_EXIT_CODE = 42
# 128 + SIGINT, what a shell reports for a Ctrl-C: distinct from the requeue code (42), so that
# the batch script does not requeue a run a person stopped on purpose
INTERRUPT_EXIT_CODE = 128 + signal.SIGINT


class StopSignals:
    def __init__(self):
        self.received: Optional[str] = None
        self.interrupted = False  # a Ctrl-C (SIGINT) among the signals received
        self.seen: set[str] = set()  # every signal received, not only the first
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process
            print("\nCtrl-C: stopping after this step and saving a checkpoint; press Ctrl-C "
                  "again to abort at once (losing the steps since the last checkpoint)",
                  file=sys.stderr, flush=True)
        self.received = self.received or signal.Signals(signum).name
        self.seen.add(signal.Signals(signum).name)

    @property
    def terminated(self) -> bool:
        """SIGTERM was seen here. Under Slurm (scancel, a time limit without a warning signal,
        `scontrol requeue`, most preemptions) it reaches every process of the job step at
        once: helper processes this one started, such as W&B's service, are ending too."""
        return "SIGTERM" in self.seen

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
        # a fill, not a copy from pageable host memory (which would sync the GPU stream)
        return torch.full((1,), 1.0 if self.received else 0.0, device=device)
