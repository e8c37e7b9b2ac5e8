"""Spike detector, baselines and replay on synthetic traces.

tests/monitor/spike_trace.csv was written by `python tests/monitor/test_detector.py` (spike_trace
below): 600 steps of noisy training; the update norm triples at 398, the grad norm x5 at 400, the
loss x1.4 from 402, and the grad norm is NaN at 500.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from baselines import BASELINES

from harness.common.errors import HarnessError
from harness.monitor import MonitorConfig, SpikeDetector, replay
from harness.monitor.replay import main as replay_main

GRAD, UPD, LOSS = "optim/grad_norm_preclip", "optim/update_norm", "train/loss"
CSV = Path(__file__).parent / "spike_trace.csv"


def synth(n: int, seed: int = 0, df: float = 8, drift: float = 1.0) -> dict[str, np.ndarray]:
    """Noisy but stable training: heavy-tailed (Student t) log noise, loss decaying to 2.5."""
    rng = np.random.default_rng(seed)
    s = np.arange(n)
    return {
        GRAD: 0.5 * drift ** (s / n) * np.exp(0.12 * rng.standard_t(df, n)),
        UPD: 0.02 * np.exp(0.08 * rng.standard_t(df, n)),
        LOSS: (2.5 + 4 * np.exp(-s / 400)) * np.exp(0.015 * rng.standard_t(df, n)),
    }


def spike_trace() -> dict[str, np.ndarray]:
    tr = synth(600, seed=1)
    tr[UPD][398:410] *= 3
    tr[GRAD][400:420] *= 5
    tr[LOSS][402:417] *= 1.4
    tr[GRAD][500] = np.nan
    return tr


def feed(det, tr, start: int = 0, stop: int | None = None) -> list[dict]:
    events: list[dict] = []
    for i in range(start, stop if stop is not None else len(tr[LOSS])):
        pre = {k: float(v[i]) for k, v in tr.items() if k != UPD}
        events += det.check_pre_step(i, pre)
        if UPD in tr:
            events += det.check_post_step(i, {UPD: float(tr[UPD][i])})
    return events


def kinds(events: list[dict]) -> list[tuple]:
    return [(e["event"], e["step"], e["signal"]) for e in events]


def test_warmup_has_no_events():
    tr = synth(150)
    tr[GRAD][[10, 50, 99]] *= 100
    tr[LOSS][60:70] *= 3
    assert feed(SpikeDetector(MonitorConfig(warmup_steps=100)), tr, stop=100) == []


def test_grad_step_change_is_confirmed_on_its_second_step_and_leads_the_loss():
    tr = synth(400)
    tr[GRAD][300:] *= 5
    tr[LOSS][302:] *= 1.3
    events = feed(SpikeDetector(MonitorConfig()), tr)
    # the grad norm warns once a second step confirms it (grad_confirm 2); the loss's first
    # step over its threshold (x1.3, under loss_at_once) is no event, the second confirms
    assert kinds(events) == [("warning", 301, GRAD), ("loss_spike", 303, LOSS)]
    loss = events[1]
    assert (loss["onset"], loss["warned_at"], loss["lead_steps"]) == (302, 301, 1)
    assert loss["warned_by"] == [GRAD]
    assert loss["episode"] == events[0]["episode"] == 1 and loss["action"] == "alert"
    assert events[0]["action"] is None  # by default only the loss spike is acted on


def test_same_step_warning_is_lead_zero_and_no_warning_is_none():
    tr = synth(400)
    tr[GRAD][299:] *= 5  # confirmed at 300
    tr[LOSS][300:] *= 1.3
    assert feed(SpikeDetector(MonitorConfig()), tr)[-1]["lead_steps"] == 0
    tr = synth(400)
    tr[LOSS][300:] *= 1.3
    (spike,) = feed(SpikeDetector(MonitorConfig()), tr)
    assert spike["event"] == "loss_spike" and spike["warned_at"] is None
    assert spike["lead_steps"] is None


def test_one_step_grad_blip_is_no_event_unless_catastrophic():
    """A one-step gradient-norm blip (clipping absorbs it; the public llm.c log has dozens at
    z 10-58, x2-14 the baseline, with nothing after them) raises nothing and opens no
    episode; a value >= grad_at_once x the baseline warns at once, and `skip` acts on it."""
    tr = synth(400)
    tr[GRAD][250] *= 5  # z ~ 13: over grad_z, one step only
    tr[GRAD][300] *= 500  # a catastrophic gradient
    tr[LOSS][303:] *= 1.3
    events = feed(SpikeDetector(MonitorConfig(action="skip")), tr)
    assert kinds(events) == [("warning", 300, GRAD), ("loss_spike", 304, LOSS)]
    assert events[0]["action"] == "skip" and events[0]["z"] > 10
    assert events[1]["warned_at"] == 300  # the blip at 250 opened no episode
    # grad_confirm=1 (or confirm_signals=[]) is the pre-confirmation rule: every blip warns
    for cfg in (MonitorConfig(grad_confirm=1), MonitorConfig(confirm_signals=[])):
        assert [e["step"] for e in feed(SpikeDetector(cfg), tr)
                if e["signal"] == GRAD] == [250, 300]
    # the update norm is no confirm signal: one step over grad_z warns (a one-step LR spike
    # shows there first, one step before the loss)
    tr = synth(400)
    tr[UPD][250] *= 5
    assert kinds(feed(SpikeDetector(MonitorConfig()), tr)) == [("warning", 250, UPD)]


def test_one_hard_batch_is_no_event_a_broken_one_a_warning():
    """A one-step loss rise over loss_z is one hard batch (no event) unless the loss is at
    least loss_at_once (1.5) x its baseline: then it warns at once, so `skip` can drop it."""
    tr = synth(400)
    tr[LOSS][300] *= 1.3  # z ~ 17 (spread ~1.5%): a hard batch
    assert feed(SpikeDetector(MonitorConfig()), tr) == []
    tr[LOSS][300] *= 2 / 1.3
    (warning,) = feed(SpikeDetector(MonitorConfig(action="skip")), tr)
    assert kinds([warning]) == [("warning", 300, LOSS)] and warning["action"] == "skip"
    assert warning["persist"] == 2 and warning["episode"] is None


def test_slow_drift_gives_no_events():
    tr = synth(2000, seed=3, drift=3.0)  # grad norm x3 over the trace
    events = feed(SpikeDetector(MonitorConfig()), tr)
    # (a lone heavy-tailed loss value may warn: the loss does not drift here)
    assert [e for e in events if e["signal"] != LOSS or e["event"] == "loss_spike"] == []


@pytest.mark.parametrize("stat", ["median_mad", "ema"])
def test_stable_run_false_alarms_at_most_one_per_1000_steps(stat):
    events = feed(SpikeDetector(MonitorConfig(stat=stat)), synth(5000, seed=7))
    assert len(events) <= 5
    assert not [e for e in events if e["event"] == "loss_spike"]


def test_nonfinite_fires_immediately_even_in_warmup():
    det = SpikeDetector(MonitorConfig())
    assert det.check_pre_step(0, {GRAD: float("nan"), LOSS: float("inf")}) == [
        {"event": "nonfinite", "step": 0, "signal": GRAD, "value": "nan", "episode": 1,
         "level": "alarm", "action": "alert"},
        {"event": "nonfinite", "step": 0, "signal": LOSS, "value": "inf", "level": "alarm",
         "action": "alert"},
    ]


@pytest.mark.parametrize("stat", ["median_mad", "ema"])
def test_state_dict_round_trip_gives_identical_events(stat):
    cfg = MonitorConfig(stat=stat)
    tr = spike_trace()
    whole = feed(SpikeDetector(cfg), tr)
    first = SpikeDetector(cfg)
    head = feed(first, tr, stop=401)  # cut inside the episode: warned, loss not yet up
    resumed = SpikeDetector(cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + feed(resumed, tr, start=401) == whole
    assert any(e["event"] == "loss_spike" for e in whole[len(head):])
    other = SpikeDetector(MonitorConfig(stat="median_mad" if stat == "ema" else "ema"))
    other.load_state_dict(first.state_dict())  # a changed monitor.stat relearns, no crash
    assert other.signals == {} and other.episode == first.episode


def test_skip_only_before_the_update():
    cfg = MonitorConfig(action="skip")
    events = feed(SpikeDetector(cfg), spike_trace())
    acts = {(e["step"], e["signal"]): e["action"] for e in events}
    assert acts[(398, UPD)] is None  # the update norm is known too late to skip
    # x5 from 400: confirmed, and skipped, at its second step
    assert acts[(401, GRAD)] == "skip" and acts[(500, GRAD)] == "skip"
    assert (402, LOSS) not in acts  # x1.4: a hard batch, no warning of its own
    assert [e["event"] for e in events if e["step"] == 403] == ["loss_spike"]
    assert acts[(403, LOSS)] is None  # skip acts on warnings (and non-finite values)


def test_lr_cut_and_rollback_escalation():
    det = SpikeDetector(MonitorConfig(action="lr_cut", lr_cut_steps=50))
    (spike,) = [e for e in feed(det, spike_trace(), stop=450) if e["event"] == "loss_spike"]
    assert spike["action"] == "lr_cut"
    assert det.lr_scale(403) == det.lr_scale(452) == 0.5 and det.lr_scale(453) == 1.0

    det = SpikeDetector(MonitorConfig(action="rollback", max_rollbacks=1))
    feed(det, spike_trace(), stop=390)
    saved = det.state_dict()  # the checkpoint the trainer would roll back to
    for expected in ("rollback", "stop"):  # replaying the same batches spikes again
        events = feed(det, spike_trace(), start=390, stop=450)
        assert [e["action"] for e in events if e["event"] == "loss_spike"] == [expected]
        det.rewind(saved)
    assert det.rollbacks == 2


def ramp(tr: dict, start: int, rate: float, stop: int | None = None) -> dict:
    """The update norm grows by `rate` per step from `start` (until `stop`)."""
    n = len(tr[UPD])
    steps = np.clip(np.arange(n) - start, 0, (stop or n) - start)
    tr[UPD] = tr[UPD] * np.exp(rate * steps)
    return tr


# the trend rule's mechanism on an update-norm ramp (issue 16's default; issue 25 moved the
# default to optim/lr: test_episodes)
UPD_TREND = {"trend_signals": [UPD], "trend_growth": 4.0}


def test_steady_update_ramp_warns_by_trend_once():
    tr = ramp(synth(700, seed=2), 300, 0.03, stop=520)  # x1.03 per step: x45 by step 430
    level_only = MonitorConfig(trend_signals=[])
    # the level z-score alone catches at most the ramp's start: its line follows the ramp
    assert len(feed(SpikeDetector(level_only), tr)) <= 1
    events = [e for e in feed(SpikeDetector(MonitorConfig(**UPD_TREND)), tr)
              if e.get("rule") == "trend"]
    steps = [e["step"] for e in events]
    # x4 per 128-step window is 1.1% per step: the half-window medians see it after ~60 steps
    assert len(steps) == 1 and 330 <= steps[0] <= 400  # once per rise (issue 25)
    assert events[0]["growth"] >= 4


def test_ema_statistics_warn_on_the_ramp_too():
    tr = ramp(synth(700, seed=2), 300, 0.03, stop=520)
    events = feed(SpikeDetector(MonitorConfig(stat="ema", **UPD_TREND)), tr)
    trend = [e["step"] for e in events if e.get("rule") == "trend"]
    assert len(trend) == 1 and 330 <= trend[0] <= 400


def test_trend_rule_waits_for_the_lr_warmup():
    tr = ramp(synth(700, seed=2), 0, 0.03, stop=300)  # like a linear LR warm-up's update norm
    cfg = MonitorConfig(warmup_steps=100, trend_after=300, **UPD_TREND)
    assert [e for e in feed(SpikeDetector(cfg), tr) if e.get("rule") == "trend"] == []
    early = MonitorConfig(warmup_steps=100, trend_after=0, **UPD_TREND)
    assert [e for e in feed(SpikeDetector(early), tr) if e.get("rule") == "trend"]


def test_trend_state_round_trip_gives_identical_events():
    tr = ramp(synth(700, seed=2), 300, 0.03, stop=520)
    whole = feed(SpikeDetector(MonitorConfig(**UPD_TREND)), tr)
    first = SpikeDetector(MonitorConfig(**UPD_TREND))
    head = feed(first, tr, stop=420)  # inside the ramp, after its first trend warning
    assert any(e.get("rule") == "trend" for e in head)
    resumed = SpikeDetector(MonitorConfig(**UPD_TREND))
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + feed(resumed, tr, start=420) == whole


def test_loss_scale_halvings_and_group_norm_patterns():
    cfg = MonitorConfig(signals=["optim/loss_scale", "grad_norm/*"])
    det = SpikeDetector(cfg)
    tr = synth(300)
    scale = np.full(300, 65536.0)
    scale[[150, 250]] = 32768.0  # a lone overflow each: normal for fp16
    scale[200:] = 16384.0  # two halvings
    groups = {f"grad_norm/{g}": tr[GRAD] * w for g, w in (("mlp", 1.0), ("head", 0.3))}
    groups["grad_norm/mlp"][260:262] *= 10  # a group norm needs confirmation too
    groups["grad_norm/head"][280] *= 10  # one step: not confirmed
    events = feed(det, {**tr, "optim/loss_scale": scale, **groups})
    assert kinds(events) == [("warning", 200, "optim/loss_scale"),
                             ("warning", 261, "grad_norm/mlp")]
    assert events[0]["z"] == 2.0 and events[0]["baseline"] == 65536.0


def test_config_validation_names_the_key():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(OmegaConf.structured(MonitorConfig))
    assert cfg.validate().resolved_act_on() == ["loss_spike", "nonfinite", "param_jump"]
    bad = [({"action": "explode"}, "monitor.action"), ({"window": 2}, "monitor.window"),
           ({"act_on": ["oops"]}, "monitor.act_on"), ({"loss_z": 0}, "monitor.loss_z"),
           ({"trend_growth": 1.0}, "monitor.trend_growth"),
           ({"trend_after": -1}, "monitor.trend_after"),
           ({"lr_cut_factor": 2.0}, "monitor.lr_cut_factor"), ({"stat": "x"}, "monitor.stat"),
           ({"param_jump": 0}, "monitor.param_jump"),
           ({"update_sample": 1.5}, "monitor.update_sample"),
           ({"grad_confirm": 0}, "monitor.grad_confirm"),
           ({"grad_at_once": 1.0}, "monitor.grad_at_once"),
           ({"confirm_signals": [""]}, "monitor.confirm_signals"),
           # a warning is not worth a restart: rollback and stop follow alarms only
           ({"action": "rollback", "act_on": ["warning"]}, "monitor.act_on"),
           # issue 25 renamed the warning kind: the old name is refused with the new one
           ({"act_on": ["grad_spike"]}, "monitor.act_on: grad_spike is now called warning"),
           ({"loss_at_once": 1.0}, "monitor.loss_at_once"), ({"rearm_z": 0}, "monitor.rearm_z"),
           ({"rearm_steps": 0}, "monitor.rearm_steps"),
           ({"growth_ratio": 1}, "monitor.growth_ratio"),
           ({"growth_span": 0}, "monitor.growth_span")]
    for kwargs, key in bad:
        with pytest.raises(HarnessError, match=key):
            MonitorConfig(**kwargs).validate()


# the grad norm's x5 from 400 is confirmed at 401; the NaN at 500 is an alarm at once
EXPECTED = [("warning", 398, UPD), ("warning", 401, GRAD), ("loss_spike", 403, LOSS),
            ("nonfinite", 500, GRAD)]


def test_replay_csv_gives_expected_events():
    events = replay(CSV, MonitorConfig())
    assert kinds(events) == EXPECTED
    assert events[2]["lead_steps"] == 4 and events[2]["warned_at"] == 398


def test_replay_jsonl_and_main(tmp_path, capsys):
    rows = np.genfromtxt(CSV, delimiter=",", names=True)
    path = tmp_path / "metrics.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"run": "x", "note": "no step: skipped"}) + "\n")
        for r in rows:
            f.write(json.dumps({"step": int(r["step"]), GRAD: r["grad_norm"], LOSS: r["loss"],
                                UPD: r["update_norm"], "optim/lr": 1e-3, "tag": "a"}) + "\n")
        f.write(json.dumps({"step": 510, "event": "warning", GRAD: 99.0}) + "\n")
    assert kinds(replay(path, MonitorConfig())) == EXPECTED
    assert replay_main(path, MonitorConfig()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["event"] for x in lines] == [e[0] for e in EXPECTED]


def test_replay_reads_back_the_nonfinite_values_the_harness_writes(tmp_path):
    """MetricsFile writes NaN/inf as the strings "nan", "inf" (JSON has no such numbers): the
    replay of a run that went NaN must see them, as the live monitor did."""
    from harness.callbacks.loggers import MetricsFile

    rows = np.genfromtxt(CSV, delimiter=",", names=True)
    sink = MetricsFile(tmp_path)
    for r in rows:
        sink._write({"step": int(r["step"]), GRAD: float(r["grad_norm"]), LOSS: float(r["loss"]),
                     UPD: float(r["update_norm"])})
    sink._write({"step": 600, GRAD: float("inf"), LOSS: float("-inf"), UPD: 0.02})
    sink.on_train_end(None)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert '"nan"' in text and '"inf"' in text and "NaN" not in text
    events = replay(tmp_path / "metrics.jsonl", MonitorConfig())
    assert kinds(events)[:len(EXPECTED)] == EXPECTED  # the NaN at 500 among them
    assert [(e["signal"], e["value"]) for e in events if e["step"] == 600] == [
        (GRAD, "inf"), (LOSS, "-inf")]


@pytest.mark.parametrize("text, why", [
    (None, "cannot read"), ("", "empty"), ("loss,grad_norm\n3,1\n", "'step' column"),
    ("step,loss,grad_norm\n1,3,1\n2,3\n", ":3: 2 cells, the header has 3"),
    ("step,loss\n1,3,7\n", ":2: 3 cells, the header has 2"), ("[1, 2]\n", "a JSON object"),
    ("step,loss\n1,abc\n", "not a number"), ("step,loss\n1.5,3\n", "not an integer"),
    ('{"step": 1}\n{oops\n', "not valid JSON"), ('{"loss": 1}\n', "no records"),
])
def test_bad_replay_file_is_a_harness_error(tmp_path, text, why):
    path = tmp_path / "trace.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(HarnessError, match=why) as err:
        replay(path, MonitorConfig())
    assert str(path) in str(err.value)


def test_baselines_fire_on_obvious_spikes_megatron_only_on_extreme():
    tr = synth(400)
    tr[GRAD][300] *= 20
    tr[LOSS][300] *= 4
    extreme = {k: v.copy() for k, v in tr.items()}
    extreme[LOSS][350] *= 30
    for name, cls in BASELINES.items():
        events = feed(cls(), tr)
        steps = {e["step"] for e in events}
        if name == "megatron":
            assert steps == set()
            assert {e["step"] for e in feed(cls(), extreme)} == {350}
        else:
            assert 300 in steps, name


def test_baseline_state_round_trip():
    tr = spike_trace()
    det = BASELINES["olmo"]()
    head = feed(det, tr, stop=390)
    again = BASELINES["olmo"]()
    again.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert head + feed(again, tr, start=390) == feed(BASELINES["olmo"](), tr)


def write_spike_csv(path: Path = CSV) -> None:
    tr = spike_trace()
    lines = ["step,loss,grad_norm,update_norm"]
    lines += [f"{i},{tr[LOSS][i]:.6g},{tr[GRAD][i]:.6g},{tr[UPD][i]:.6g}"
              for i in range(len(tr[LOSS]))]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_spike_csv()


def test_update_norm_pass_only_when_the_monitor_reads_it():
    assert MonitorConfig().watches(UPD)
    off = MonitorConfig(signals=["optim/grad_norm_preclip"], trend_signals=[])
    assert not off.watches(UPD) and off.watches(LOSS) and off.watches(GRAD)
    assert MonitorConfig(signals=["optim/*"], trend_signals=[]).watches(UPD)


def test_trend_after_defaults_to_the_lr_warmup():
    from harness.config import load_config

    assert load_config("tiny", ["optim.warmup_steps=7"]).monitor.trend_after == 7
    assert load_config("tiny", ["monitor.trend_after=0"]).monitor.trend_after == 0


ATTN = "model/attn_logit_bound"


def attn_trace(n: int = 400, grow_at: int = 200) -> dict[str, np.ndarray]:
    """A stable run whose attention-logit bound (a healthy ~8) climbs past 100 from grow_at
    by x1.05 per step (natural attention-logit growth), holds there, then falls back."""
    tr = synth(n, seed=3)
    s = np.arange(n)
    tr[ATTN] = 8.0 * np.exp(0.05 * np.clip(s - grow_at, 0, 80)) * np.exp(
        0.05 * np.random.default_rng(4).standard_normal(n))
    tr[ATTN][340:] = 8.0  # fixed (e.g. by a restart with qk-norm): below half the ceiling
    return tr


def test_attention_bound_ceiling_is_one_advice_per_run():
    tr = attn_trace()
    tr[ATTN][360:380] = 150.0  # over the ceiling again after falling back: still said once
    events = [e for e in feed(SpikeDetector(MonitorConfig()), tr) if e.get("rule") == "ceiling"]
    first = next(i for i, v in enumerate(tr[ATTN]) if v >= 100)
    assert 245 <= first <= 260
    assert [(e["step"], e["event"], e["level"], e["action"]) for e in events] == [
        (first, "advice", "advice", None)]
    off = feed(SpikeDetector(MonitorConfig(attn_ceiling=0)), tr)
    assert not [e for e in off if e.get("rule") == "ceiling"]


def test_ceiling_advice_is_given_in_warm_up_and_survives_a_state_round_trip():
    tr = attn_trace(grow_at=0)  # over the ceiling from step ~52: before warmup_steps (100)
    events = [e for e in feed(SpikeDetector(MonitorConfig()), tr) if e.get("rule") == "ceiling"]
    assert [e["step"] for e in events] == [next(i for i, v in enumerate(tr[ATTN]) if v >= 100)]
    first = SpikeDetector(MonitorConfig())
    head = feed(first, tr, stop=110)
    resumed = SpikeDetector(MonitorConfig())
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + feed(resumed, tr, start=110) == feed(SpikeDetector(MonitorConfig()), tr)
    old = first.state_dict()  # a version-3 checkpoint: the ceiling had warned (ceil_at)
    for s in old["signals"].values():
        s.pop("advised"), s.update(ceil_at=60)
    resumed = SpikeDetector(MonitorConfig())
    resumed.load_state_dict(old)
    assert [e for e in feed(resumed, tr, start=110) if e.get("rule") == "ceiling"] == []


def test_default_signals_are_the_tuned_ones():
    """The issue-16 and 25 tuning (harness/config/monitor.py): the output-logit log-sum-exp is
    not a default signal; the attention bound is watched by its growth rate and its ceiling
    (advice), not by level (issue 25: false warnings on healthy high-LR runs) or trend."""
    cfg = MonitorConfig()
    assert "model/logit_lse_max" not in cfg.signals and ATTN not in cfg.signals
    assert cfg.trend_signals == ["optim/lr"] and cfg.ceilings() == {ATTN: 100.0}
    assert cfg.growth_signals == [ATTN] and (cfg.growth_ratio, cfg.growth_span) == (50.0, 20)
    # gradient norms (only) need a second step over grad_z, or x100 the baseline at once
    assert (cfg.grad_confirm, cfg.grad_at_once, cfg.grad_z) == (2, 100.0, 10.0)
    assert cfg.confirm_signals == [GRAD, "grad_norm/*"] and UPD not in cfg.confirm_signals
    assert cfg.watches(ATTN) and MonitorConfig(signals=[GRAD], trend_signals=[]).watches(ATTN)
    with pytest.raises(HarnessError, match="attn_ceiling"):
        MonitorConfig(attn_ceiling=-1).validate()
