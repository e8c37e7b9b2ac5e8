"""The spike monitor in the loop: feeds harness.monitor.SpikeDetector and carries out actions.

Before the update it sees the loss and pre-clip gradient norms (so `skip` can drop that very
update); after it, the update norm, parameter norm and jump, per-group update ratios and the LR.
Advice (level "advice": a condition of the whole run, e.g. no qk-norm at a high LR, said once
at start-up or when first seen) and warnings (level "warning": precursors, once per episode)
are metrics and event lines; alarms (loss
spikes, non-finite values, parameter jumps) are what wandb.alert and lr_cut / rollback / stop
follow; `skip` may act on warnings. Actions (monitor.action): alert (events only), skip,
lr_cut (LR x lr_cut_factor for lr_cut_steps), rollback (PaLM's recipe: back to the newest
checkpoint saved BEFORE the first warning, then skip the data window that led to the spike),
stop (end the run with a clear message and exit code 3). Every rank reaches the same decision:
all signals are already averaged over the data-parallel ranks.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from harness.checkpoint.checkpointer import Checkpointer, complete_checkpoints, load
from harness.common.callback import Callback
from harness.config.monitor import is_post_step
from harness.monitor import MonitorConfig, SpikeDetector
from harness.monitor.detector import qk_norm_advice

log = logging.getLogger("harness")


class SpikeMonitor(Callback):
    order = 20  # after Throughput, before the checkpointer and the loggers

    def __init__(self, cfg: MonitorConfig, checkpointer: Optional[Checkpointer] = None):
        self.cfg = cfg
        self.detector = SpikeDetector(cfg)
        self.checkpointer = checkpointer
        self._rewinding = False
        self._pending: list[dict[str, Any]] = []

    def on_train_start(self, trainer):
        if trainer.step == 0:  # a resumed run said it when it started
            for event in qk_norm_advice(self.cfg, trainer.plan.lr, trainer.cfg.model.qk_norm):
                trainer.emit(event)

    def on_before_step(self, trainer, step, signals):
        events = self.detector.check_pre_step(step, signals)
        if any(e["action"] == "skip" for e in events):
            trainer.skip_update = True
        # the schedule computes the next step's LR inside this step's engine.step()
        trainer.built.lr_scale[0] = self.detector.lr_scale(step)
        self._pending = events

    def on_step_end(self, trainer, step, metrics):
        post = {k: v for k, v in metrics.items() if is_post_step(k)}
        events = self._pending + self.detector.check_post_step(step, post)
        self._pending = []
        for event in events:
            metrics[f"monitor/{event['event']}"] = 1
            trainer.emit(event)
        for event in events:
            if event["action"] == "stop":
                trainer.stop_reason = f"monitor: {event['event']} at step {event['step']}"
            elif event["action"] == "rollback":
                self._rollback(trainer, event)
                break

    def _rollback(self, trainer, event: dict[str, Any]) -> None:
        first_warning = event.get("warned_at") or event.get("onset") or event["step"]
        root = self.checkpointer.root if self.checkpointer else None
        before = ([c for c in complete_checkpoints(root) if _step_of(c) < first_warning]
                  if root else [])
        if not before:
            trainer.stop_reason = (f"monitor: rollback needs a checkpoint from before step "
                                   f"{first_warning}; none exists (lower checkpoint.every)")
            return
        target, spike_from, spike_at = before[-1], trainer.step, trainer.consumed_samples
        self._rewinding = True
        try:
            meta = load(trainer, target)
        finally:
            self._rewinding = False
        window = self.cfg.rollback_skip_batches * trainer.plan.batch.global_batch
        # skip at least past every batch the bad trajectory saw
        trainer.consumed_samples = max(meta["consumed_samples"] + window, spike_at)
        trainer.norms.forget_params()  # the weights changed on purpose: no param_jump
        self.checkpointer.discard_after(trainer.step, trainer.built.dist.rank)
        self.checkpointer.last_saved_step = trainer.step
        trainer.emit({"event": "rollback", "from_step": spike_from, "to_step": trainer.step,
                      "checkpoint": target.name, "resume_sample": trainer.consumed_samples,
                      "skipped_samples": trainer.consumed_samples - meta["consumed_samples"]})

    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._rewinding:  # statistics from before the spike, but count this rollback
            self.detector.rewind(state)
        else:
            self.detector.load_state_dict(state)


def _step_of(path) -> int:
    return int(path.name.removeprefix("step"))
