"""Replay of a real stable run through the default monitor: at most 1 event per 1000 steps.

tests/monitor/llmc_gpt2_124M_stable.csv.gz: llm.c GPT-2 124M on FineWeb (A100, 19,560 steps,
LR warm-up 700 steps, cosine to 0; columns step, loss, grad_norm, lr). No instability happened
in it, so every event is a false one, warnings (quiet precursors) as much as alarms.

Calibration split (bench/spikes/spike_split.py, REAL_TUNE_LAST): steps <= 9,780 may be tuned on,
later steps (the anneal to LR 0) are held out. The split was made after the log's events
under the earlier defaults had been seen, before any tuning on it; the whole-log figure is
therefore NOT a held-out figure (half of it was tuned on) and is asserted separately.
Measured with the defaults of this commit (issue 25): held-out half 1 warning (the grad-norm
level warning confirmed at step 10,823) in 9,779 steps = 0.10 / 1000, 0 alarms; tuning half
(from step 500) 0 warnings; whole log 1 event. Issue 16's defaults gave 6 on the held-out half
(0.61 / 1000): the other 5 were the loss's first step over z 6, one hard batch each (x1.07-1.08
its baseline), which is no event now (loss_at_once 1.5: the log's largest one-step loss rise
over z 6 is x1.081, at step 15,313; its tuning half's x1.069). Before the gradient norm's
confirmation rule (grad_confirm 1) the held-out half had 31 (3.17 / 1000).
"""
from pathlib import Path

import spike_split as split  # noqa: E402

from harness.monitor import MonitorConfig, SpikeDetector, replay
from harness.monitor.replay import read_trace

LOG = Path(__file__).parent / "llmc_gpt2_124M_stable.csv.gz"
NAME = "llmc_gpt2_124M_stable"


def _per_1000(events: list[dict], steps: set[int], level: str) -> float:
    return 1000 * sum(1 for e in events if e["step"] in steps and e["level"] == level) / len(steps)


def test_real_stable_log_under_one_event_per_1000_steps():
    trace = read_trace(LOG)
    assert len(trace) == 19559  # steps 1-19560, one step missing in the log
    det = SpikeDetector(MonitorConfig())
    events = replay(LOG, MonitorConfig(), det)
    assert det.warm_end == 700  # inferred from the logged (rounded) LR
    held = {s for s, _ in trace if split.real_part(NAME, s) == "held_out"}
    whole = {s for s, _ in trace if s >= split.REAL_FROM}  # the convention
    assert len(held) == 9779 and min(held) == 9781
    # the held-out half (the anneal to LR 0): measured 0 alarms, 1 warning (0.10 / 1000)
    assert _per_1000(events, held, "alarm") == 0.0, events
    assert _per_1000(events, held, "warning") <= 1.0, events
    # the whole log from step 500 (half of it tuned on): measured 0 alarms, 1 warning (0.05)
    assert _per_1000(events, whole, "alarm") == 0.0
    assert _per_1000(events, whole, "warning") <= 1.0
    # every step, the LR warm-up included: measured 1 event (0.05 / 1000)
    assert 1000 * len(events) / len(trace) <= 1.0
    assert [(e["step"], e["event"]) for e in events] == [(10823, "warning")]
    assert not [e for e in events if e["action"]]  # the default only logs


def test_one_step_gradient_blips_of_the_real_log_stay_quiet():
    """The log's gradient-norm blips (44 one-step excursions over z 10, up to x14 the
    baseline) warned before the confirmation rule; now one does, confirmed by its second
    step (10,823 after 10,822). A rule change that lets the blips through fails here.
    Unconfirmed they are 40 warnings: 4 blips come within rearm_steps (10) calm steps of the
    one before (the same episode); re-armed at once below z 5 (grad_confirm=1, rearm_steps=1,
    rearm_z=5: issue 16's rule) they are the 44 (measured; not replayed here, ~15 s)."""
    events = replay(LOG, MonitorConfig())
    grad = [e["step"] for e in events if e["signal"] == "optim/grad_norm_preclip"]
    assert grad == [10823]
    unconfirmed = replay(LOG, MonitorConfig(grad_confirm=1))
    assert sum(e["signal"] == "optim/grad_norm_preclip" for e in unconfirmed) == 40


def test_the_cli_replay_reads_the_warm_up_from_the_log(capsys):
    """`harness monitor replay LOG` gives the events of the Python replay: the end of the LR
    warm-up comes from the log's own LR (700), not from the default preset's warmup_steps."""
    import json

    from harness.cli import main

    assert main(["monitor", "replay", str(LOG)]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert cli == replay(LOG, MonitorConfig())
    assert main(["monitor", "replay", str(LOG), "monitor.trend_after=10"]) == 0
    assert len(capsys.readouterr().out.splitlines()) != len(cli)  # the explicit value is used
