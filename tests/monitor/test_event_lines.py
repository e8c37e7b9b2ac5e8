"""Monitor events as people read them (harness.monitor.events.describe, the console's line) and
what `harness monitor replay` says beside its JSON lines.

The events are the real detector's, on tests/monitor/spike_trace.csv (precursor levels, a
confirmed loss spike, a NaN) and on a synthetic trace with a loss-scale halving, a broken batch
(the loss x2 for one step), an LR ramp after the warm-up, a parameter jump and an attention
bound that grows x125 in one step past its ceiling; plus the start-up advice (no qk-norm at LR
0.1).
Each line is checked against its own event and the config's thresholds.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from harness.monitor import MonitorConfig, SpikeDetector, replay
from harness.monitor.detector import qk_norm_advice
from harness.monitor.events import describe
from harness.monitor.replay import main as replay_main

CSV = Path(__file__).parent / "spike_trace.csv"
LOSS = "train/loss"


def synthetic_events(cfg: MonitorConfig) -> list[dict]:
    rng, det, events = np.random.default_rng(0), SpikeDetector(cfg), []
    for i in range(380):
        pre = {LOSS: 3.0 * (2 if i == 200 else 1) * math.exp(0.01 * rng.standard_normal()),
               "optim/grad_norm_preclip": 0.5 * math.exp(0.1 * rng.standard_normal()),
               "optim/loss_scale": 65536.0 / (4 if i >= 300 else 1),  # 2 halvings at 300
               "model/attn_logit_bound": 1000.0 if i >= 360 else 8.0,
               "optim/lr": 1e-3 * 1.03 ** max(0, i - 250)}  # an LR ramp from 250
        post = {"optim/update_norm": 0.02 * math.exp(0.05 * rng.standard_normal()),
                "optim/param_jump": 1e-3 if i == 350 else 0.0}
        events += det.check_pre_step(i, pre) + det.check_post_step(i, post)
    return events


@pytest.fixture(scope="module")
def events() -> list[dict]:
    cfg = MonitorConfig(action="skip")
    found = replay(CSV, cfg) + synthetic_events(cfg) + qk_norm_advice(cfg, 0.1, qk_norm=False)
    rules = {(e["event"], e.get("rule")) for e in found}
    assert rules == {("warning", "level"), ("warning", "trend"), ("warning", "growth"),
                     ("advice", "ceiling"), ("advice", "qk_norm"), ("loss_spike", None),
                     ("nonfinite", None), ("param_jump", None)}
    return found


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?", line.replace(",", ""))]


def shows(line: str, x: float) -> bool:
    """`x` is printed in the line (to its 4 significant digits)."""
    return any(math.isclose(n, x, rel_tol=1e-3) for n in numbers(line))


def test_each_event_is_one_sentence_naming_its_signal_value_and_action(events):
    for e in events:
        line = describe(e)
        assert "\n" not in line and "{" not in line, line  # a sentence, not raw JSON
        assert line.startswith(f"[monitor {e['level']}] step {e['step']}: "), line
        assert e["signal"] in line and line.endswith(f"; action: {e['action'] or 'none'}"), line
        assert shows(line, e["value"]) if e["event"] != "nonfinite" else "is nan" in line, line


def test_level_events_carry_and_show_the_threshold_they_crossed(events):
    cfg = MonitorConfig()
    for e in [e for e in events if e.get("rule", "level") == "level" and "z" in e]:
        want = (cfg.loss_z if e["signal"] == LOSS else cfg.loss_scale_halvings
                if e["signal"].endswith("loss_scale") else cfg.grad_z)
        line = describe(e)
        assert e["threshold"] == want and e["z"] >= want
        assert shows(line, e["z"]) and shows(line, want) and shows(line, e["baseline"]), line
    trend = [e for e in events if e.get("rule") == "trend"]
    assert all(e["threshold"] == cfg.trend_growth and f"x{e['growth']:.4g}" in describe(e)
               for e in trend)
    growth = next(e for e in events if e.get("rule") == "growth")
    assert growth["threshold"] == cfg.growth_ratio
    assert all(shows(describe(growth), x) for x in (growth["growth"], growth["reference"],
                                                     cfg.growth_ratio, cfg.growth_span))
    ceiling = next(e for e in events if e.get("rule") == "ceiling")
    assert f"reached {cfg.attn_ceiling:g}" in describe(ceiling) and "once" in describe(ceiling)
    qk = next(e for e in events if e.get("rule") == "qk_norm")
    assert "model.qk_norm=true" in describe(qk) and shows(describe(qk), cfg.qk_norm_lr)


def test_the_loss_warning_reads_as_the_loss_not_a_gradient_spike(events):
    """The issue's line `[grad_spike] step 117: {"signal": "train/loss", ...}`: the loss's
    first step over loss_z (at >= loss_at_once x its baseline) is a warning of kind
    `warning`; its line names the loss and what would confirm it."""
    first = next(e for e in events if e["signal"] == LOSS and e["event"] == "warning")
    assert first["persist"] == MonitorConfig().loss_persist and first["episode"] is None
    line = describe(first)
    assert line.startswith(f"[monitor warning] step {first['step']}: {LOSS} ")
    assert "grad" not in line and "its first step over" in line
    assert f"{first['persist']} steps over in a row" in line and "loss_spike" in line


def test_a_loss_spike_names_its_onset_and_its_warnings(events):
    spike = next(e for e in events if e["event"] == "loss_spike")
    line = describe(spike)
    assert line.startswith(f"[monitor alarm] step {spike['step']}: loss spike: {LOSS} ")
    assert f"since step {spike['onset']}" in line
    assert f"first warned at step {spike['warned_at']} by {', '.join(spike['warned_by'])}" in line
    assert f"({spike['lead_steps']} steps ahead)" in line


def test_other_events_and_unknown_ones():
    rollback = {"event": "rollback", "step": 9, "from_step": 12, "to_step": 8,
                "checkpoint": "step00000008", "resume_sample": 1234, "skipped_samples": 64}
    assert describe(rollback) == ("[monitor] step 9: rolled back from step 12 to checkpoint "
                                  "step00000008 (step 8), resuming at sample 1,234 (64 samples "
                                  "skipped)")
    overflow = {"event": "loss_scale_min", "level": "alarm", "step": 3,
                "signal": "optim/loss_scale", "value": 1.0, "action": "stop"}
    assert describe(overflow) == ("[monitor alarm] step 3: fp16 overflow at the minimum loss "
                                  "scale 1; action: stop")
    odd = {"event": "new_kind", "level": "warning", "step": 4, "x": 1, "action": None}
    assert describe(odd) == '[monitor warning] step 4: new_kind {"x": 1, "action": null}; ' \
                            'action: none'
    torn = {"event": "loss_spike", "level": "alarm", "step": 5, "signal": LOSS}  # fields lost
    assert describe(torn).startswith("[monitor alarm] step 5: loss_spike {")


# ---- `harness monitor replay` says what it read ----------------------------------------------
def _flat_metrics(path: Path, steps: range) -> None:
    path.write_text("".join(json.dumps({"step": s, LOSS: 3.0, "optim/grad_norm_preclip": 0.5,
                                        "optim/lr": 1e-3}) + "\n" for s in steps)
                    + json.dumps({"step": 7, "event": "warning"}) + "\n")  # not a step


def test_replay_without_events_says_so_with_the_steps_read(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _flat_metrics(path, range(1, 31))
    assert replay_main(path, MonitorConfig()) == 0
    out, err = capsys.readouterr()
    assert out == ""  # stdout stays JSON lines only (none here)
    assert err.strip() == f"replayed 30 steps (1-30) of {path}: no events"


def test_replay_with_events_counts_them_by_kind(capsys):
    assert replay_main(CSV, MonitorConfig()) == 0
    out, err = capsys.readouterr()
    kinds = [json.loads(ln)["event"] for ln in out.splitlines()]
    steps = len(CSV.read_text().splitlines()) - 1  # the header
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds)))
    assert err.strip() == (f"replayed {steps} steps (0-{steps - 1}) of {CSV}: "
                           f"{len(kinds)} events ({counts})")
