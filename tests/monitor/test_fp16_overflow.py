"""fp16 overflow steps in the monitor: the metrics such a step produces, with the loss scale from
DeepSpeed's own DynamicLossScaler, are a loss-scale metric, not a `nonfinite` alarm, and never
make `skip` drop the step (the trainer's side: tests/train/test_fp16_cpu.py).

Unproven until a GPU runs fp16: that a real engine's overflow step logs exactly these metrics
(inf pre-clip norms, optim/overflow true, the scale before the halving)."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from deepspeed.runtime.fp16 import loss_scaler as ds_scaler
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

from harness.callbacks.spike_monitor import SpikeMonitor
from harness.monitor import MonitorConfig, SpikeDetector, replay

OVERFLOWS = {60, 61, 130, 131, 132, 133}  # routine fp16 overflows: the scale drops 3 times


def _steps(n=200, seed=0):
    """(step, pre-step signals) of an fp16 run: a healthy loss and gradient norm, and on each
    overflow step what the trainer measures: inf norms, the scale the gradients carried."""
    rng = np.random.default_rng(seed)
    scaler = DynamicLossScaler(init_scale=65536.0, scale_window=1000, min_scale=1.0,
                               delayed_shift=2, consecutive_hysteresis=False)
    for step in range(1, n + 1):
        over = step in OVERFLOWS
        norm = math.inf if over else float(np.exp(rng.normal(0.0, 0.1)))
        yield step, {"train/loss": 3.0 + 0.01 * rng.normal(), "optim/lr": 1e-3,
                     "optim/grad_norm_preclip": norm, "grad_norm/mlp": norm,
                     "grad_norm/attention": math.nan if over else norm / 2,
                     "optim/loss_scale": scaler.cur_scale, "optim/overflow": over}
        scaler.update_scale(over)  # what engine.step() does with it


@pytest.fixture(autouse=True)
def _rank0(monkeypatch):  # the scaler logs on rank 0 through deepspeed.comm
    monkeypatch.setattr(ds_scaler.dist, "get_rank", lambda *a, **k: 0)


@pytest.mark.parametrize("action", ["alert", "skip", "stop", "rollback"])
def test_overflow_steps_are_no_alarm_and_never_skipped(action):
    cfg = MonitorConfig(action=action, warmup_steps=20, window=32,
                        signals=["optim/grad_norm_preclip", "grad_norm/*", "optim/loss_scale"])
    mon = SpikeMonitor(cfg)
    trainer = SimpleNamespace(skip_update=False, built=SimpleNamespace(lr_scale=[1.0]))
    events, skipped = [], []
    for step, signals in _steps():
        trainer.skip_update = False
        mon.on_before_step(trainer, step, signals)
        if trainer.skip_update:
            skipped.append(step)
        events += mon._pending
    # hysteresis 2: the first pair costs one halving, each overflow of the burst one more
    # (hysteresis is refilled only after scale_window clean steps); step 132 is the first
    # whose scale is 2 halvings below the window's max: the loss-scale rule's one warning (a
    # metric and an event line; `skip` may act on it, and the trainer still hands
    # that overflow step to engine.step()). Nothing else: no nonfinite, no alarm at all.
    assert [(e["event"], e["level"], e["signal"], e["step"]) for e in events] == [
        ("warning", "warning", "optim/loss_scale", 132)]
    assert skipped == ([132] if action == "skip" else [])


def test_a_nonfinite_norm_without_overflow_is_still_an_alarm():
    """bf16/fp32, or fp16 with a finite gradient and a non-finite loss: still `nonfinite`."""
    det = SpikeDetector(MonitorConfig())
    events = det.check_pre_step(5, {"optim/grad_norm_preclip": math.inf,
                                    "optim/overflow": False})
    assert [e["event"] for e in events] == ["nonfinite"]
    events = det.check_pre_step(6, {"optim/grad_norm_preclip": math.inf, "train/loss": math.nan,
                                    "optim/overflow": True})
    assert [(e["event"], e["signal"]) for e in events] == [("nonfinite", "train/loss")]


def test_replay_reads_the_overflow_flag(tmp_path):
    """A metrics.jsonl of an fp16 run (non-finite values as the strings the harness writes)
    replays without nonfinite alarms."""
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as fh:
        for step, signals in _steps():
            row = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                   for k, v in signals.items()}
            fh.write(json.dumps({"step": step, **row}) + "\n")
    events = replay(path, MonitorConfig(warmup_steps=20, window=32))
    assert not [e for e in events if e["event"] == "nonfinite"]
