"""Published spike rules, re-implemented from their descriptions, to compare SpikeDetector with.

Same interface as SpikeDetector (check_pre_step / check_post_step / state_dict /
load_state_dict), events of the same shape with action None. Unlike SpikeDetector they fire on
every step over their threshold (that is how their alarm rates are quoted), and they treat a
non-finite value the same way: a `nonfinite` event, value kept out of the statistics.

    fixed      grad norm > a fixed threshold (the clip value: "this step was clipped")
    zclip      ZClip: EMA mean/var of the grad norm, alpha 0.97, z > 2.5 after 25 values
    olmo       OLMo-core: |z| > 6 of grad norm and loss vs the previous 128, after 64 values
    megatron   Megatron-Core: loss >= 10 x the max of the first 100 losses
    lightning  Lightning SpikeDetection: loss above its running mean of 10 by > rtol 2 x mean
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import numpy as np

GRAD = "optim/grad_norm_preclip"
LOSS = "train/loss"


class _Baseline:
    watches: tuple[str, ...] = (GRAD,)

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}  # plain JSON values only, so checkpoints stay simple

    def check_pre_step(self, step: int, signals: dict[str, float]) -> list[dict[str, Any]]:
        return self._update(step, signals)

    check_post_step = check_pre_step  # no actions here, so the phase makes no difference

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = copy.deepcopy(state)

    def _update(self, step: int, signals: dict[str, float]) -> list[dict[str, Any]]:
        events = []
        for name in self.watches:
            if name not in signals:
                continue
            x = float(signals[name])
            if not math.isfinite(x):
                events.append(_event("nonfinite", step, name, str(x)))
                continue
            found = self._check(name, x)
            if found is not None:
                kind = "loss_spike" if name == LOSS else "warning"
                events.append(dict(_event(kind, step, name, x), **found))
        return events

    def _check(self, name: str, x: float) -> Optional[dict[str, Any]]:
        """Update the statistics with x; return extra event fields if x is a spike."""
        raise NotImplementedError


def _event(kind: str, step: int, name: str, value: Any) -> dict[str, Any]:
    return {"event": kind, "step": step, "signal": name, "value": value, "action": None}


class FixedThreshold(_Baseline):
    def __init__(self, threshold: float = 1.0):
        super().__init__()
        self.threshold = threshold

    def _check(self, name: str, x: float) -> Optional[dict[str, Any]]:
        return {"baseline": self.threshold} if x > self.threshold else None


class ZClipBaseline(_Baseline):
    def __init__(self, alpha: float = 0.97, z: float = 2.5, warmup: int = 25):
        super().__init__()
        self.alpha, self.z, self.warmup = alpha, z, warmup
        self.state = {"first": [], "mean": 0.0, "var": 0.0}

    def _check(self, name: str, x: float) -> Optional[dict[str, Any]]:
        s = self.state
        if len(s["first"]) < self.warmup:  # the EMA starts from the first values' mean/var
            s["first"].append(x)
            s["mean"], s["var"] = float(np.mean(s["first"])), float(np.var(s["first"]))
            return None
        std = math.sqrt(s["var"]) or 1e-12
        z = (x - s["mean"]) / std
        kept = min(x, s["mean"] + self.z * std)  # ZClip feeds the clipped norm back
        s["mean"] = self.alpha * s["mean"] + (1 - self.alpha) * kept
        s["var"] = self.alpha * s["var"] + (1 - self.alpha) * (kept - s["mean"]) ** 2
        return {"z": round(z, 3), "baseline": s["mean"]} if z > self.z else None


class OLMoBaseline(_Baseline):
    watches = (GRAD, LOSS)

    def __init__(self, window: int = 128, min_values: int = 64, sigma: float = 6.0):
        super().__init__()
        self.window, self.min_values, self.sigma = window, min_values, sigma
        self.state = {GRAD: [], LOSS: []}

    def _check(self, name: str, x: float) -> Optional[dict[str, Any]]:
        hist = self.state[name]
        found = None
        if len(hist) >= self.min_values:
            mean, std = float(np.mean(hist)), float(np.std(hist))
            z = (x - mean) / std if std > 0 else 0.0
            if abs(z) > self.sigma:
                found = {"z": round(z, 3), "baseline": mean}
        hist.append(x)
        del hist[: -self.window]
        return found


class MegatronBaseline(_Baseline):
    watches = (LOSS,)

    def __init__(self, factor: float = 10.0, first: int = 100):
        super().__init__()
        self.factor, self.first = factor, first
        self.state = {"n": 0, "max": -math.inf}

    def _check(self, name: str, x: float) -> Optional[dict[str, Any]]:
        s = self.state
        if s["n"] < self.first:
            s["n"] += 1
            s["max"] = max(s["max"], x)
            return None
        limit = self.factor * s["max"]
        return {"baseline": limit} if x >= limit else None


class LightningBaseline(_Baseline):
    watches = (LOSS,)

    def __init__(self, window: int = 10, rtol: float = 2.0):
        super().__init__()
        self.window, self.rtol = window, rtol
        self.state = {"hist": []}

    def _check(self, name: str, x: float) -> Optional[dict[str, Any]]:
        hist = self.state["hist"]
        if hist:
            mean = float(np.mean(hist))
            if x - mean > self.rtol * abs(mean):
                return {"baseline": mean}  # a spike stays out of the running mean
        hist.append(x)
        del hist[: -self.window]
        return None


BASELINES = {
    "fixed": FixedThreshold,
    "zclip": ZClipBaseline,
    "olmo": OLMoBaseline,
    "megatron": MegatronBaseline,
    "lightning": LightningBaseline,
}
