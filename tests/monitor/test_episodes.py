"""Issue 25: a warning means "look now". Each rule speaks once per episode and re-arms only
after its signal has been back at its baseline for monitor.rearm_steps steps; a condition of the
whole run (an attention bound over its ceiling, no qk-norm at a high LR) is one `advice`.

The signals here are noise-free, so every expectation is closed-form: a constant signal's
robust spread is 0, floored at min_scale (0.01 in log units), so x1.2 is z = ln 1.2 / 0.01 = 18
and the baseline stays the constant (a few pulses never move a 128-step median).
"""
from __future__ import annotations

import json
import math

import numpy as np

from harness.monitor import MonitorConfig, SpikeDetector
from harness.monitor.detector import qk_norm_advice

GRAD, UPD, LOSS = "optim/grad_norm_preclip", "optim/update_norm", "train/loss"
ATTN = "model/attn_logit_bound"
N = 700


def flat(n: int = N) -> dict[str, np.ndarray]:
    return {GRAD: np.full(n, 1.0), UPD: np.full(n, 0.02), LOSS: np.full(n, 3.0)}


def pulses(x: np.ndarray, starts: list[int], length: int, factor: float) -> np.ndarray:
    for s in starts:
        x[s:s + length] *= factor
    return x


def feed(det: SpikeDetector, tr: dict, start: int = 0, stop: int | None = None) -> list[dict]:
    events = []
    for i in range(start, len(tr[LOSS]) if stop is None else stop):
        events += det.check_pre_step(i, {k: float(v[i]) for k, v in tr.items() if k != UPD})
        events += det.check_post_step(i, {UPD: float(tr[UPD][i])})
    return events


def steps(events: list[dict], signal: str, event: str = "warning") -> list[int]:
    return [e["step"] for e in events if e["signal"] == signal and e["event"] == event]


def test_one_warning_per_episode_rearmed_only_after_the_baseline():
    """Pulses of 5 steps: the first warns at its first step; one that starts 3 steps after
    (before rearm_steps = 10 calm steps) belongs to the same episode and is silent; one that
    starts after 10 calm steps warns again. The gradient norm the same, one step later
    (confirmation); the loss's pulses are loss_spike alarms (its second step), same rule."""
    tr = flat()
    pulses(tr[UPD], [200, 208, 240], 5, 2.0)  # 208 is 3 steps after the first pulse's end
    pulses(tr[GRAD], [300, 307, 330], 4, 2.0)  # 307: 3 steps after; 330: 19 steps after
    pulses(tr[LOSS], [400, 405, 450], 3, 1.2)  # 405: 2 steps after; 450: 47 steps after
    events = feed(SpikeDetector(MonitorConfig()), tr)
    assert steps(events, UPD) == [200, 240]
    assert steps(events, GRAD) == [301, 331]
    assert steps(events, LOSS, "loss_spike") == [401, 451]
    assert steps(events, LOSS) == []  # x1.2 is under loss_at_once: no one-step warning
    assert len(events) == 6


def test_rearm_counts_calm_steps_exactly():
    """A gap of rearm_steps - 1 calm steps is the same episode, rearm_steps is a new one."""
    cfg = MonitorConfig()
    for gap, expected in ((cfg.rearm_steps - 1, [200]), (cfg.rearm_steps, [200, 205 + 10])):
        tr = flat()
        pulses(tr[UPD], [200, 205 + gap], 5, 2.0)
        assert steps(feed(SpikeDetector(cfg), tr), UPD) == expected, gap


def test_a_value_hovering_over_the_rearm_level_is_one_warning():
    """40 steps alternating between z 18 and z 4 (over rearm_z = 3, under grad_z = 10): the
    signal never gets back to its baseline, so it is one warning, not 20."""
    tr = flat()
    tr[UPD][200:240] *= np.where(np.arange(40) % 2 == 0, 1.2, 1.04)
    assert steps(feed(SpikeDetector(MonitorConfig()), tr), UPD) == [200]


def test_one_hard_batch_is_no_event_and_a_broken_one_warns_once():
    """A one-step loss rise under loss_at_once (1.5) x the baseline is a hard batch: nothing;
    one at x2 warns at once; a second x2 batch 3 steps later is the same episode."""
    tr = flat()
    tr[LOSS][[200, 230, 260]] *= 1.4  # z 34 each: hard batches
    tr[LOSS][[300, 303]] *= 2.0
    tr[LOSS][[350]] *= 2.0  # 46 calm steps later: a new episode
    events = feed(SpikeDetector(MonitorConfig()), tr)
    assert [(e["event"], e["step"]) for e in events] == [("warning", 300), ("warning", 350)]


def test_trend_warns_once_per_rise_and_rearms_after_it_stops():
    """Two LR ramps after the warm-up (x1.03 per step, x46 per window; a schedule gone wrong)
    550 steps apart: one trend warning each, not one every episode_gap steps while it rises.
    The episode stays open in silence while the LR keeps rising, so a loss spike long after
    the warning still names it (warned_at, lead_steps)."""
    tr = flat(1300)
    n = np.arange(1300)
    tr["optim/lr"] = 1e-3 * np.ones(1300)
    for a, b in ((300, 420), (850, 970)):
        tr["optim/lr"] *= np.exp(0.03 * np.clip(n - a, 0, b - a))
    tr[LOSS][415:420] *= 1.2
    events = feed(SpikeDetector(MonitorConfig()), tr)
    trend = [e for e in events if e.get("rule") == "trend"]
    assert len(trend) == 2 and trend[0]["signal"] == "optim/lr"
    assert 300 < trend[0]["step"] < 420 and 850 < trend[1]["step"] < 970
    (spike,) = [e for e in events if e["event"] == "loss_spike"]
    assert spike["warned_at"] == trend[0]["step"] and spike["lead_steps"] > 20
    assert spike["episode"] == trend[0]["episode"] != trend[1]["episode"]
    # a healthy schedule (cosine after a warm-up) never rises after its warm-up: no trend
    tr["optim/lr"] = 1e-3 * np.minimum(n / 50, 0.55 + 0.45 * np.cos(np.pi * n / 1300))
    assert [e for e in feed(SpikeDetector(MonitorConfig()), tr)
            if e.get("rule") == "trend"] == []


def test_growth_rule_closed_form_and_rearm():
    """The attention bound flat at 1 to step 29, then x1.5 per step to 1e4: its ratio to the
    median of the 5 values ending 20 steps before (1 while those are flat) is 1.5^(s-29),
    which reaches growth_ratio 50 at s = 29 + ceil(ln 50 / ln 1.5) = 39: one warning, in the
    LR warm-up (no window needed). Flat at 1e4 it re-arms; a second growth warns again."""
    cfg = MonitorConfig()
    n = np.arange(N)
    bound = np.minimum(1.5 ** np.clip(n - 29, 0, None), 1e4)
    bound[400:] = 1e4 * np.minimum(1.5 ** (n[400:] - 400), 1e3)
    tr = {**flat(), ATTN: bound}
    events = [e for e in feed(SpikeDetector(cfg), tr) if e["signal"] == ATTN]
    first = 29 + math.ceil(math.log(cfg.growth_ratio) / math.log(1.5))
    growth = [e for e in events if e.get("rule") == "growth"]
    assert [e["step"] for e in growth] == [first, 400 + first - 29] == [39, 410]
    assert growth[0]["reference"] == 1.0 and growth[0]["growth"] >= 50
    # the bound's size is advice: said once for the run, at the first step over the ceiling
    advice = [e for e in events if e["event"] == "advice"]
    assert [(e["step"], e["level"], e["action"]) for e in advice] == [(41, "advice", None)]
    assert 1.5 ** (41 - 29) >= 100 > 1.5 ** (40 - 29)


def test_slow_growth_over_a_whole_run_is_quiet():
    """A healthy bound grows x25 over 300 steps (0.3 -> 7.7 in the suite's stable runs): a
    rate of x1.1 per 20 steps, never x50."""
    tr = {**flat(300), ATTN: 0.3 * 25 ** (np.arange(300) / 300)}
    assert [e for e in feed(SpikeDetector(MonitorConfig()), tr) if e["signal"] == ATTN] == []


def test_episode_state_survives_a_checkpoint():
    """Cut inside an episode (after the warning, before the re-arm) and resumed: the same
    events as one uninterrupted run, so a resumed run does not warn again."""
    tr = flat()
    pulses(tr[UPD], [200, 208], 5, 2.0)
    n = np.arange(N)
    tr[ATTN] = np.minimum(1.5 ** np.clip(n - 29, 0, None), 1e4)
    whole = feed(SpikeDetector(MonitorConfig()), tr)
    first = SpikeDetector(MonitorConfig())
    head = feed(first, tr, stop=206)
    resumed = SpikeDetector(MonitorConfig())
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + feed(resumed, tr, start=206) == whole
    assert steps(whole, UPD) == [200]


def test_no_qk_norm_at_a_high_lr_is_one_advice_at_start_up():
    cfg = MonitorConfig()
    (advice,) = qk_norm_advice(cfg, 0.1, qk_norm=False)
    assert (advice["event"], advice["level"], advice["rule"]) == ("advice", "advice", "qk_norm")
    assert advice["action"] is None and advice["value"] == 0.1
    assert qk_norm_advice(cfg, 0.1, qk_norm=True) == []
    assert qk_norm_advice(cfg, 3e-3, qk_norm=False) == []  # the suite's stable LR


def test_a_still_hot_signal_opens_no_episode_after_a_spike():
    """The gradient norm x2 for 30 steps warns once (301); the loss spike at 303 names it and
    closes the episode. A second loss spike (321) while the gradient norm is still up names
    no warning: none was given since (a signal that stays up keeps an OPEN episode open, it
    does not open a silent one)."""
    tr = flat()
    tr[GRAD][300:330] *= 2.0
    pulses(tr[LOSS], [302, 320], 3, 1.2)
    events = feed(SpikeDetector(MonitorConfig()), tr)
    assert steps(events, GRAD) == [301]
    first, second = [e for e in events if e["event"] == "loss_spike"]
    assert (first["step"], first["warned_at"], first["warned_by"]) == (303, 301, [GRAD])
    assert (second["step"], second["warned_at"], second["lead_steps"]) == (321, None, None)
