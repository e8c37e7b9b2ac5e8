"""The calibration split of the spike suite: what the monitor's defaults may be tuned on, and
what every reported figure is measured on. Fixed here, in code, BEFORE any tuning of issue 16;
tests/test_spike_split.py pins it (disjoint, and exactly these names and seeds).

A run (scenario, seed) is in the TUNING part only when its scenario is a tuning scenario AND
its seed a tuning seed; everything else is HELD OUT: the held-out scenarios at every seed, and
the tuning scenarios at the held-out seeds. Stable runs (the false-alarm denominator) are split
by seed alone. Real logs: none is tuned on; the llm.c GPT-2 124M log is held out.

Why these scenarios are held out: each is a different mechanism from every tuning scenario
(a one-step LR glitch and an LR ramp are tuned on; a crash, a sustained high LR, a
single-token data pathology, a silent weight corruption and natural instabilities are not),
so a held-out figure says whether the rules transfer, not whether they were fitted.

History (honesty): the defaults before issue 16 were tuned on seeds 1-3 of every scenario then
in the suite (stable 1-4). Seeds 4-6 and stable seeds 5-12 were never tuned on by anyone:
`clean_held_out` selects those, plus the scenarios new in issue 16, and is reported apart.
"""
from __future__ import annotations

TUNE_SCENARIOS = ("stable", "lr_spike", "lr_ramp", "bad_random", "scale_weights", "nat_logit")
HELD_SCENARIOS = ("lr_crash", "high_lr", "bad_repeat", "silent_corrupt", "nat_attn",
                  "repeat_spans")
# the suite runs up to 6 seeds per instability and 12 stable seeds
TUNE_SEEDS = {"stable": (1, 2, 3, 4), "other": (1, 2, 3)}
HELD_SEEDS = {"stable": tuple(range(5, 13)), "other": (4, 5, 6)}
NEW_IN_ISSUE_16 = ("silent_corrupt", "nat_attn", "nat_logit", "repeat_spans")

# real stable logs (name -> part); shared/data/<name>.csv, a copy in tests/data/
REAL_LOGS = {"llmc_gpt2_124M_stable": "held_out"}


def _seeds(scenario: str, seeds: dict) -> tuple[int, ...]:
    return seeds["stable" if scenario == "stable" else "other"]


def part(scenario: str, seed: int) -> str:
    """"tune" or "held_out" for one suite run."""
    if scenario not in TUNE_SCENARIOS + HELD_SCENARIOS:
        raise KeyError(f"scenario {scenario!r} is in neither part of the split")
    tuned = scenario in TUNE_SCENARIOS and seed in _seeds(scenario, TUNE_SEEDS)
    return "tune" if tuned else "held_out"


def clean_held_out(scenario: str, seed: int) -> bool:
    """Held out from every tuning so far, the pre-issue-16 defaults' included."""
    return seed in _seeds(scenario, HELD_SEEDS) or scenario in NEW_IN_ISSUE_16
