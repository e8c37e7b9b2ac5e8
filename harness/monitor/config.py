"""The `monitor` config section: what the spike detector watches and what the trainer does.

Defaults are chosen from public evidence (shared/reference/spike-research.md) and then set on
recorded runs (bench/spike_suite.py; tuned on one set of seeds, checked on others):
- Statistics are robust (medians and MAD of the log value over 128 steps, the window OLMo-core
  uses, with a slope term), so one spike does not move the baseline and the baseline follows
  slow drift such as the grad norm growing over training or the loss still falling.
- `grad_z` 10: gradient norms are heavy-tailed; at OLMo's 6 sigma, blips that clipping absorbs
  gave 6 false alarms / 1000 stable steps, at 10 none on the tuning seeds and 1 / 1000 on
  held-out seeds, with no precursor lost (real ones scored z 15-200).
- The loss needs `loss_persist` 2 steps above `loss_z` 6 to be a spike, so one hard batch is
  not one; its first step over is already a warning. `min_scale` 0.01 means a change under
  ~z x 1% of the value never alarms, which keeps a very smooth large-batch loss from alarming
  on a 2% wobble.
- The trend rule (update norm x4 over a window) catches a steady ramp that the level z absorbs.
- Nothing is acted on unless `action` says so: the default only logs ("alert").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Optional

from harness.errors import HarnessError, check_number

ACTIONS = ("alert", "skip", "lr_cut", "rollback", "stop")
EVENT_KINDS = ("grad_spike", "loss_spike", "nonfinite")
STATS = ("median_mad", "ema")


@dataclass
class MonitorConfig:
    enabled: bool = True
    # precursor signals (fnmatch patterns over metric keys); add "grad_norm/*" for the
    # per-layer-group norms. Keys ending in "loss_scale" use the halving rule, not a z-score.
    signals: list[str] = field(
        default_factory=lambda: [
            "optim/grad_norm_preclip",
            "optim/update_norm",
            "optim/loss_scale",
        ]
    )
    loss_signal: str = "train/loss"
    warmup_steps: int = 100  # no alarms before this step: early training swings are normal
    window: int = 128  # history per signal; alarms also need window // 2 values first
    stat: str = "median_mad"  # or "ema" (ZClip-like mean/var of the log, outliers clipped)
    ema_alpha: float = 0.98  # only for stat=ema: the discount (memory ~ 1 / (1 - alpha) steps)
    min_scale: float = 0.01  # floor on the log-space spread (~1% of the value)
    grad_z: float = 10.0  # warning (grad_spike) threshold for precursor signals
    loss_z: float = 6.0  # loss threshold, one-sided (only rises matter)
    loss_persist: int = 2  # consecutive steps over loss_z before a loss_spike is confirmed
    loss_scale_halvings: int = 2  # warn when the loss scale is 2^k below its window max
    # A steady ramp is absorbed by the level statistics' trend line, so it never scores a
    # high z: these signals also warn when that line rises by `trend_growth` x over one
    # window, and warn again every episode_gap steps while it keeps rising. Not the grad norm
    # by default: it legitimately grows 2-3x per window early in training.
    trend_signals: list[str] = field(default_factory=lambda: ["optim/update_norm"])
    trend_growth: float = 4.0
    # the trend rule arms one window after this step; null = the end of the LR warm-up
    # (optim.warmup_steps), during which the update norm rises by design
    trend_after: Optional[int] = None
    episode_gap: int = 20  # warnings further apart than this start a new episode
    action: str = "alert"  # alert | skip | lr_cut | rollback | stop
    # event kinds that trigger `action`; None picks [grad_spike, nonfinite] for skip (act on
    # the gradient before it is applied) and [loss_spike, nonfinite] for the others
    act_on: Optional[list[str]] = None
    lr_cut_factor: float = 0.5
    lr_cut_steps: int = 200
    rollback_skip_batches: int = 200  # PaLM skipped 200-500 batches after a restart
    max_rollbacks: int = 3  # after this many rollbacks the action becomes "stop"

    def watches(self, metric: str) -> bool:
        """Whether the detector reads `metric` (a precursor or trend signal, or the loss)."""
        patterns = [*self.signals, *self.trend_signals, self.loss_signal]
        return any(fnmatchcase(metric, p) for p in patterns)

    def resolved_act_on(self) -> list[str]:
        if self.act_on is not None:
            return list(self.act_on)
        if self.action == "skip":
            return ["grad_spike", "nonfinite"]
        return ["loss_spike", "nonfinite"]

    def validate(self) -> "MonitorConfig":
        _one_of("monitor.action", self.action, ACTIONS)
        _one_of("monitor.stat", self.stat, STATS)
        for kind in self.act_on or []:
            _one_of("monitor.act_on", kind, EVENT_KINDS)
        if not self.signals or not all(isinstance(s, str) and s for s in self.signals):
            raise HarnessError("monitor.signals must be a non-empty list of metric names")
        if not all(isinstance(s, str) and s for s in self.trend_signals):
            raise HarnessError("monitor.trend_signals must list metric names ([] turns the "
                               "trend rule off)")
        if not self.loss_signal:
            raise HarnessError("monitor.loss_signal must name the loss metric (e.g. train/loss)")
        _at_least("monitor.window", self.window, 8, high=1_000_000)
        if self.trend_after is not None:
            _at_least("monitor.trend_after", self.trend_after, 0)
        for key in ("warmup_steps", "episode_gap", "rollback_skip_batches", "max_rollbacks"):
            _at_least(f"monitor.{key}", getattr(self, key), 0)
        for key in ("loss_persist", "lr_cut_steps", "loss_scale_halvings"):
            _at_least(f"monitor.{key}", getattr(self, key), 1)
        for key, usual in (("grad_z", 10), ("loss_z", 6), ("min_scale", 0.01)):
            check_number(f"monitor.{key}", getattr(self, key), 0, low_open=True,
                         fix=f"e.g. {usual}")
        check_number("monitor.trend_growth", self.trend_growth, 1, low_open=True,
                     fix="e.g. 4; monitor.trend_signals=[] turns the trend rule off")
        check_number("monitor.ema_alpha", self.ema_alpha, 0, 1, low_open=True, high_open=True,
                     fix="e.g. 0.98")
        check_number("monitor.lr_cut_factor", self.lr_cut_factor, 0, 1, low_open=True,
                     fix="e.g. 0.5")
        return self


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise HarnessError(f"{key} must be one of {'|'.join(allowed)} (got {value!r})")


def _at_least(key: str, value: object, low: int, high: int = 2**31 - 1) -> None:
    check_number(key, value, low, high, integer=True)
