"""The calibration split is fixed in code: tuning and held-out parts are disjoint and exactly
what bench/spikes/spike_split.py said before any tuning (changing it means re-tuning from scratch).
The real log's cut by step (first half tunes) was made later, after its events had been seen
and before any tuning on it (spike_split's History)."""

import pytest
import spike_split as split  # noqa: E402


def test_scenarios_and_seeds_are_disjoint_and_fixed():
    assert split.TUNE_SCENARIOS == ("stable", "lr_spike", "lr_ramp", "bad_random",
                                    "scale_weights", "nat_logit")
    # anneal_to_0 (stable runs, cosine to LR 0) was added after issue 16's tuning, held out
    # before any of its runs was recorded
    assert split.HELD_SCENARIOS == ("lr_crash", "high_lr", "bad_repeat", "silent_corrupt",
                                    "nat_attn", "repeat_spans", "anneal_to_0")
    assert split.STABLE_SCENARIOS == ("stable", "anneal_to_0")
    assert split.NEW_IN_ISSUE_16 == ("silent_corrupt", "nat_attn", "nat_logit", "repeat_spans",
                                     "anneal_to_0")
    assert not set(split.TUNE_SCENARIOS) & set(split.HELD_SCENARIOS)
    assert split.TUNE_SEEDS == {"stable": (1, 2, 3, 4), "other": (1, 2, 3)}
    assert split.HELD_SEEDS == {"stable": tuple(range(5, 13)), "other": (4, 5, 6)}
    for kind in ("stable", "other"):
        assert not set(split.TUNE_SEEDS[kind]) & set(split.HELD_SEEDS[kind])
    # the real log is cut by step (changed after its events had been seen, before any tuning
    # on it: see spike_split's History): the first half tunes, the anneal to LR 0 is held out
    assert split.REAL_TUNE_LAST == {"llmc_gpt2_124M_stable": 9780}
    assert split.REAL_FROM == 500


def test_real_log_is_cut_by_step():
    log = "llmc_gpt2_124M_stable"
    assert split.real_part(log, 1) == split.real_part(log, 9780) == "tune"
    assert split.real_part(log, 9781) == split.real_part(log, 19560) == "held_out"
    with pytest.raises(KeyError):
        split.real_part("some_other_log", 1)  # an unknown log is not silently tuned on


def test_every_run_is_in_exactly_one_part():
    scenarios = split.TUNE_SCENARIOS + split.HELD_SCENARIOS
    parts = {(s, k): split.part(s, k) for s in scenarios for k in range(1, 13)}
    assert set(parts.values()) == {"tune", "held_out"}
    assert parts[("stable", 4)] == "tune" and parts[("stable", 5)] == "held_out"
    assert parts[("lr_spike", 3)] == "tune" and parts[("lr_spike", 4)] == "held_out"
    assert all(p == "held_out" for (s, _), p in parts.items() if s in split.HELD_SCENARIOS)
    assert all(split.clean_held_out("anneal_to_0", k) for k in range(1, 13))
    with pytest.raises(KeyError):
        split.part("made_up", 1)


def test_every_suite_scenario_is_split():
    import spike_scenarios

    assert set(spike_scenarios.SCENARIOS) <= set(split.TUNE_SCENARIOS + split.HELD_SCENARIOS)


def test_natural_ground_truth_is_the_gap_to_the_twin():
    """nat_* runs are scored against their twin (spike_scenarios.NATURAL): the onset is the
    first step whose 10-step mean held-out loss is >= 5% over the twin's for 20 steps."""
    import spike_scenarios as sc

    assert (sc.NAT_GAP, sc.NAT_SMOOTH, sc.NAT_HOLD) == (0.05, 10, 20)
    assert set(sc.NATURAL) <= set(split.HELD_SCENARIOS + split.TUNE_SCENARIOS)
    twin = [{"step": s, "eval/heldout_loss": 4.0} for s in range(200)]
    run = [{"step": s, "eval/heldout_loss": 4.0 if s < 100 else 4.4} for s in range(200)]
    # the 10-step mean passes 4.2 (5%) once 6 of its 10 values are 4.4: step 105
    assert sc.twin_gap_onsets(run, twin) == [105]
    blip = [{"step": s, "eval/heldout_loss": 4.4 if 100 <= s < 110 else 4.0} for s in range(200)]
    assert sc.twin_gap_onsets(blip, twin) == []  # over for < 20 steps: no onset
    assert sc.twin_gap_onsets(twin, twin) == []
