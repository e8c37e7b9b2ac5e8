"""bench/spikes/attn_growth.py's scoring on synthetic recorded runs (no training): a run without
qk-norm whose held-out loss falls behind its twin's is damaged from the twin-gap onset, and
the growth rule's warning on it is a hit with a closed-form lead; undamaged runs count false
warnings; the split by seed (1-3 tuning, 4+ held out) holds."""
import math

import attn_growth as ag


def run(seed: int, qk: bool, bound, held) -> dict:
    rows = [[s, 4.0, held(s), 0.5, 0.02, 1e-3, 1e-3, bound(s)] for s in range(1, 201)]
    assert len(rows[0]) == len(ag.KEYS)
    return {"seed": seed, "lr": 0.1, "qk": qk, "final_eval": held(200), "trace": rows}


def test_damage_hits_and_false_warnings_in_closed_form(capsys):
    fast = lambda s: min(1.5 ** max(s - 30, 0), 1e4)  # noqa: E731  x1.5 per step from 30
    slow = lambda s: 0.3 * 1.01 ** s  # noqa: E731  x1.2 per 20 steps: a healthy bound
    flat = lambda s: 6.0  # noqa: E731  the qk-norm twins'
    behind = lambda s: 4.5 if s >= 60 else 4.0  # noqa: E731  noqk held-out loss from 60
    even = lambda s: 4.0  # noqa: E731
    runs = [run(1, False, fast, behind), run(1, True, flat, even),  # tuning: damaged + twin
            run(4, False, slow, even), run(4, True, flat, even)]  # held out: all undamaged
    ag.traces(runs)
    # the twin gap: the 10-step mean of 4.0 / 4.5 passes 1.05 x 4.0 with 5 values at 4.5
    assert [r["onset"] for r in runs] == [64, None, None, None]
    tune = ag.score(runs, {}, "tuning")
    # the 20-step ratio 1.5^(s - 30) (its reference flat at 1 until step 30 + 20) reaches x50
    # at s = 30 + ceil(ln 50 / ln 1.5) = 40: lead 64 - 40
    first = 30 + math.ceil(math.log(50) / math.log(1.5))
    growth = tune["warning:growth:model/attn_logit_bound"]
    assert growth["hit"] == [64 - first] == [24] and not growth["false"]
    assert tune["ANY:warning:-"]["hit"] == [24]
    held = ag.score(runs, {}, "held-out")
    assert all(not d["false"] and not d["hit"] for d in held.values())
    out = capsys.readouterr().out
    assert "tuning part: 1 damaged runs, 1 undamaged" in out
    assert "held-out part: 0 damaged runs, 2 undamaged" in out
