"""The calibration split of the spike suite: what the monitor's defaults may be tuned on, and
what every reported figure is measured on. Fixed here, in code, BEFORE any tuning of issue 16;
tests/bench/test_spike_split.py pins it (disjoint, and exactly these names and seeds).

A run (scenario, seed) is in the TUNING part only when its scenario is a tuning scenario AND
its seed a tuning seed; everything else is HELD OUT: the held-out scenarios at every seed, and
the tuning scenarios at the held-out seeds. Stable runs (the false-alarm denominator) are split
by seed alone. Real logs: the llm.c GPT-2 124M log (19,560 steps) is cut by step: steps <=
REAL_TUNE_LAST["llmc_gpt2_124M_stable"] (9,780, the first half) may be tuned on, later steps
are held out (`real_part`). Issue 16 allows tuning on at most one real log; this is the only
one, and only its first half.

Why the first half tunes and the second is held out (not interleaved blocks): the log's LR
warms up to its peak by step 700 and then anneals by cosine to 0 at step 19,560; at step 9,780
it is still at half its peak. The anneal's end (LR near 0, the loss's and the gradient norm's
spread shrinking, a z-score's denominator with it) is only in the held-out half, so a rule
tuned on the first half meets a regime there that it was not fitted to: the harder test, and
the one the issue asks for ("robust to the end of a schedule"). Interleaved blocks would let
the tuning part see every regime and make the held-out figure flatter than it deserves.

Why these scenarios are held out: each is a different mechanism from every tuning scenario
(a one-step LR glitch and an LR ramp are tuned on; a crash, a sustained high LR, a
single-token data pathology, a silent weight corruption and natural instabilities are not),
so a held-out figure says whether the rules transfer, not whether they were fitted.
`anneal_to_0` (stable runs whose cosine ends at LR 0, not at the suite's 10% floor: the end of
a schedule that only the real log's held-out half had) was added after issue 16's tuning and
put here, held out at every seed, before any of its runs was recorded: nothing is tuned on it.

History (honesty): the defaults before issue 16 were tuned on seeds 1-3 of every scenario then
in the suite (stable 1-4). Seeds 4-6 and stable seeds 5-12 were never tuned on by anyone:
`clean_held_out` selects those, plus the scenarios new in issue 16, and is reported apart.
The real log was first split off whole as held out (REAL_LOGS = held_out, nothing tuned on
it). That changed in a later session of issue 16, AFTER its events under the then-defaults had
been seen (0 alarms, 2.62 warnings / 1000 steps after step 500: grad-norm level warnings at
z >= 10 with no loss spike after them, loss warnings, some in the anneal): a log whose
failures have been looked at is no longer held out in any honest sense, so it was cut in two
by step BEFORE any tuning against it, and only the first half was tuned on. Caveat: the lead
had seen events in both halves (the anneal's included) before the cut, so the held-out half is
held out from tuning, not from sight. Any figure on the WHOLE log is no longer a held-out
figure and is labelled "whole log (half tuned on)" wherever it is reported.
"""
from __future__ import annotations

TUNE_SCENARIOS = ("stable", "lr_spike", "lr_ramp", "bad_random", "scale_weights", "nat_logit")
HELD_SCENARIOS = ("lr_crash", "high_lr", "bad_repeat", "silent_corrupt", "nat_attn",
                  "repeat_spans", "anneal_to_0")
# the suite runs up to 6 seeds per instability and 12 stable seeds
TUNE_SEEDS = {"stable": (1, 2, 3, 4), "other": (1, 2, 3)}
HELD_SEEDS = {"stable": tuple(range(5, 13)), "other": (4, 5, 6)}
NEW_IN_ISSUE_16 = ("silent_corrupt", "nat_attn", "nat_logit", "repeat_spans", "anneal_to_0")
# stable scenarios: no instability, every step counts in the false-alarm denominator
STABLE_SCENARIOS = ("stable", "anneal_to_0")

# real stable logs: shared/data/<name>.csv, a copy in tests/monitor/; name -> the last step of
# its tuning part (later steps are held out; None: held out whole)
REAL_TUNE_LAST = {"llmc_gpt2_124M_stable": 9780}
REAL_FROM = 500  # the issue's convention: events per 1000 steps after step 500


def _seeds(scenario: str, seeds: dict) -> tuple[int, ...]:
    return seeds["stable" if scenario in STABLE_SCENARIOS else "other"]


def part(scenario: str, seed: int) -> str:
    """"tune" or "held_out" for one suite run."""
    if scenario not in TUNE_SCENARIOS + HELD_SCENARIOS:
        raise KeyError(f"scenario {scenario!r} is in neither part of the split")
    tuned = scenario in TUNE_SCENARIOS and seed in _seeds(scenario, TUNE_SEEDS)
    return "tune" if tuned else "held_out"


def clean_held_out(scenario: str, seed: int) -> bool:
    """Held out from every tuning so far, the pre-issue-16 defaults' included."""
    return seed in _seeds(scenario, HELD_SEEDS) or scenario in NEW_IN_ISSUE_16


def real_part(log: str, step: int) -> str:
    """"tune" or "held_out" for one step of a real log."""
    last = REAL_TUNE_LAST[log]  # KeyError: a log the split does not know
    return "tune" if last is not None and step <= last else "held_out"
