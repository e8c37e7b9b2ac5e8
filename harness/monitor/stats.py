"""Running statistics the detector keeps per signal: a rolling median and MAD, an EMA with
its spread, halvings (log2 drops), and the bundle of them one signal needs.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Optional

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution x this = its standard deviation


def median(xs: list[float]) -> float:
    s, n = sorted(xs), len(xs)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class MedianMAD:
    """Robust line through the window: two half-window medians give level and slope, so a
    trend (a loss still falling, a grad norm creeping up) neither lags nor widens the spread."""

    def __init__(self, window: int, min_scale: float):
        self.values: deque[float] = deque(maxlen=window)
        self.min_scale = min_scale

    def count(self) -> int:
        return len(self.values)

    def score(self, x: float) -> tuple[float, float]:
        # plain Python on a list: numpy's per-call overhead was 4x the work at window 64
        v = list(self.values)
        m, h = len(v), len(v) // 2
        c1, c2 = (h - 1) / 2, m - h + (h - 1) / 2  # centres of the two halves
        m1, m2 = median(v[:h]), median(v[m - h:])
        slope = (m2 - m1) / (c2 - c1)
        resid = [vi - (m2 + slope * (i - c2)) for i, vi in enumerate(v)]
        mid = median(resid)
        spread = _MAD_TO_SIGMA * median([abs(r - mid) for r in resid])
        center = m2 + slope * (m - c2)  # the line extrapolated to this step
        return (x - center) / max(spread, self.min_scale), center

    def growth(self) -> float:
        """The line's rise in log units over one window (its slope x the window)."""
        v, h = list(self.values), len(self.values) // 2
        m = len(v)
        return (median(v[m - h:]) - median(v[:h])) / (m - h) * self.values.maxlen

    def push(self, x: float, clip_z: Optional[float]) -> None:
        self.values.append(x)  # medians are already robust: no clipping needed

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in state["values"])


class EMA:
    """Brown's double exponential smoothing (level + trend) with an EMA of squared errors;
    errors are clipped to +-clip_z spreads before they update anything, so a spike can't
    move the baseline."""

    def __init__(self, alpha: float, min_scale: float, window: int):
        self.alpha, self.min_scale, self.window = alpha, min_scale, window
        self.n, self.level, self.trend, self.var = 0, 0.0, 0.0, 0.0

    def count(self) -> int:
        return self.n

    def _spread(self) -> float:
        return max(math.sqrt(self.var), self.min_scale)

    def score(self, x: float) -> tuple[float, float]:
        center = self.level + self.trend
        return (x - center) / self._spread(), center

    def growth(self) -> float:
        return self.trend * self.window  # the per-step trend over one window, as for medians

    def push(self, x: float, clip_z: Optional[float]) -> None:
        err = x - (self.level + self.trend) if self.n else 0.0
        if clip_z is not None:
            bound = clip_z * self._spread()
            err = min(max(err, -bound), bound)
        # plain running averages at first, so the first values do not weigh forever
        first = 1.0 / (self.n + 1)
        gain = max(first, 1.0 - self.alpha**2)
        self.level = x if self.n == 0 else self.level + self.trend + gain * err
        self.trend += (1.0 - self.alpha) ** 2 * err
        self.var += max(first, 1.0 - self.alpha) * (err * err - self.var)
        self.n += 1

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "level": self.level, "trend": self.trend, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = int(state["n"])
        self.level, self.trend = float(state["level"]), float(state["trend"])
        self.var = float(state["var"])


class Halvings(MedianMAD):
    """Loss scale: a value of powers of two, so count halvings below the window's maximum."""

    def __init__(self, window: int):
        super().__init__(window, min_scale=0.0)

    def score(self, x: float) -> tuple[float, float]:
        top = max(self.values)
        return round((top - x) / math.log(2.0), 6), top


class Signal:
    """One watched metric: its statistics, its current run of over-threshold steps, and
    whether each of its rules has already spoken in the current episode. A rule speaks once
    per episode and re-arms only after its signal has been back at its baseline (monitor.
    rearm_z, rearm_steps) for a while: a value hovering at a threshold is one warning."""

    def __init__(self, stat: Any, threshold: float, trend: bool = False, confirm: int = 1,
                 at_once: float = math.inf):
        self.stat, self.threshold, self.trend = stat, threshold, trend
        # a level excursion warns on its `confirm`-th consecutive step, or at once when the
        # value is >= at_once x the baseline, in log units (monitor.grad_confirm and
        # grad_at_once on the confirm_signals, loss_at_once on the loss; 1 and inf otherwise)
        self.confirm, self.at_once = confirm, at_once
        self.run, self.onset = 0, -1
        self.hot = False  # the level rule fired in this episode (the loss: its loss_spike)
        self.warned = False  # the loss only: its one-step (at-once) warning fired
        self.calm = 0  # consecutive steps back at the baseline (z < rearm)
        self.rearm = threshold / 2  # the z under which it is back (monitor.rearm_z or less)
        self.trend_hot = False  # the trend rule fired in this episode
        self.trend_calm = 0  # consecutive steps its growth was back under half its threshold
        self.ceiling: Optional[float] = None  # monitor.ceilings' value for this signal
        self.advised = False  # the ceiling's advice was given (once per run)
        self.grows = False  # watched by the growth rule (monitor.growth_signals)
        self.hist: list[float] = []  # growth rule: its last growth_span + growth_ref - 1 logs
        self.grow_hot = False  # growth rule fired in this episode
        self.grow_calm = 0

    FIELDS = ("run", "onset", "hot", "warned", "calm", "trend_hot", "trend_calm", "advised",
              "hist", "grow_hot", "grow_calm")

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS}

    def load(self, state: dict[str, Any]) -> None:
        for k in self.FIELDS:
            if k in state:  # absent in an older checkpoint: this rule starts armed
                default = getattr(self, k)
                setattr(self, k, list(state[k]) if isinstance(default, list)
                        else type(default)(state[k]))
