"""The detector's rules that need no z-score: the trend of a signal's line, the growth rate of
a signal against its own recent past, and the start-up advice. Each rule keeps its state on the
Signal and speaks once per episode (harness.monitor.detector says when it re-arms); the
detector adds the step, signal, value and episode to what a rule returns.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from harness.config.monitor import MonitorConfig
from harness.monitor.stats import Signal, median


def trend(cfg: MonitorConfig, sig: Signal, growth: float) -> Optional[dict[str, Any]]:
    """The line's rise over one window (log units) at or over trend_growth: once per episode;
    re-armed once the rise has stayed under half of it for rearm_steps steps."""
    limit = math.log(cfg.trend_growth)
    sig.trend_calm = sig.trend_calm + 1 if growth < limit / 2 else 0
    if sig.trend_calm >= cfg.rearm_steps:
        sig.trend_hot = False
    if growth < limit or sig.trend_hot:
        return None
    sig.trend_hot = True
    return {"rule": "trend", "growth": round(math.exp(growth), 3),
            "threshold": cfg.trend_growth}


def grows(cfg: MonitorConfig, sig: Signal, x: float) -> Optional[dict[str, Any]]:
    """The value at >= growth_ratio x its own recent past (the median of growth_ref values
    ending growth_span steps ago): a growth RATE, so a bound that grows as much over a whole
    healthy run stays quiet. Armed as soon as those values exist (in the LR warm-up, where
    attention-logit growth starts); once per episode, re-armed once the ratio has stayed under
    the square root of growth_ratio for rearm_steps steps."""
    lx, hist = math.log(x), sig.hist
    full = len(hist) == cfg.growth_span + cfg.growth_ref - 1
    ref = median(hist[:cfg.growth_ref]) if full else None
    hist.append(lx)
    if full:
        hist.pop(0)
    if ref is None:
        return None
    ratio, limit = lx - ref, math.log(cfg.growth_ratio)
    sig.grow_calm = sig.grow_calm + 1 if ratio < limit / 2 else 0
    if sig.grow_calm >= cfg.rearm_steps:
        sig.grow_hot = False
    if ratio < limit or sig.grow_hot:
        return None
    sig.grow_hot = True
    return {"rule": "growth", "growth": float(f"{math.exp(ratio):.4g}"),
            "threshold": cfg.growth_ratio, "span": cfg.growth_span,
            "reference": float(f"{math.exp(ref):.4g}")}


def qk_norm_advice(cfg: MonitorConfig, lr: float, qk_norm: bool) -> list[dict[str, Any]]:
    """The start-up advice: no qk-norm at a peak LR >= monitor.qk_norm_lr (a condition of the
    whole run, said once, at step 0; no action)."""
    if qk_norm or lr < cfg.qk_norm_lr:
        return []
    return [{"event": "advice", "rule": "qk_norm", "step": 0, "signal": "optim/lr",
             "value": lr, "lr": cfg.qk_norm_lr, "level": "advice", "action": None}]
