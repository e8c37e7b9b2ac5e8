"""Token budgets in a mix (data.mix[i].tokens): the shares they give, the refusals (budgets and
weights mixed, a sum other than the run's tokens, a budget over max_repeats, a new split on
resume), and a budget-defined run drawing each source within its binomial error of its
budget, over real prepared shards (run.build_data) and over a long run's sampler."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mix_corpus import mix_cfg, one_process_built, prepared_root

import harness.train.mix_run as mix_run
import harness.train.run as run_mod
from harness.common.errors import HarnessError
from harness.config import load_config, to_yaml
from harness.data.mix_prepare import MixShards
from harness.data.mixture import MixtureSampler

# the tiny preset at block_size 64: a global batch of 16, 1,024 tokens a step
BLOCK_SIZE, PER_STEP = 64, 16 * 64


def _budgets(root: Path, web: int, code: int, extra: str = "") -> str:
    return (f"data.mix=[{{name: web, sources: [{root / 'web'}], tokens: {web}}}, "
            f"{{name: code, sources: [{root / 'code'}], tokens: {code}{extra}}}]")


def _cfg(root: Path, web: int, code: int, steps: int, extra: str = ""):
    return load_config("tiny", [_budgets(root, web, code, extra), f"data.out_dir={root / 'out'}",
                                "data.vocab_size=384", "model.vocab_size=384",
                                f"model.block_size={BLOCK_SIZE}", f"train.max_steps={steps}",
                                "optim.warmup_steps=10"])



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return prepared_root(tmp_path_factory, "mixbudget")


def test_shares_are_the_budgets_over_their_sum(tmp_path):
    cfg = _cfg(Path("r"), 3_000_000, 1_000_000, 100)
    assert cfg.data.mix_budgets() == [3_000_000, 1_000_000]
    assert cfg.data.mix_shares() == [0.75, 0.25]
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(str(tmp_path / "c.yaml")).data.mix == cfg.data.mix
    weighted = mix_cfg(Path("r"))  # no budgets: the weights, as before
    assert weighted.data.mix_budgets() == [] and weighted.data.mix_shares() == [0.7, 0.3]


@pytest.mark.parametrize("mix, message", [
    ("[{name: a, sources: [a], tokens: 1000}, {name: b, sources: [b], weight: 2}]",
     r"^data.mix\[0\].tokens=1000 is a token budget but data.mix\[1\].tokens is not set "
     r"\(data.mix\[1\].weight applies\): give every source a budget \(data.mix\[i\].tokens\) "
     r"or none$"),
    ("[{name: a, sources: [a]}, {name: b, sources: [b], tokens: 5}]",
     r"^data.mix\[1\].tokens=5 is a token budget but data.mix\[0\].tokens is not set"),
    ("[{name: a, sources: [a], tokens: 1000, weight: 0.5}]",
     r"^data.mix\[0\].tokens=1000 and data.mix\[0\].weight=0.5 are both set: .* drop "
     r"data.mix\[0\].weight$"),
    ("[{name: a, sources: [a], tokens: -1}]", r"^data.mix\[0\].tokens=-1 must be an integer"),
    ("[{name: a, sources: [a], tokens: 1.5}]", r"data.mix\[0\].tokens.* must be a whole number"),
    ("[{name: a, sources: [a], tokens: 1}, {name: b, sources: [b], tokens: 100000}]",
     r"^data.mix\[0\].tokens=1 is a share of 1e-05 of the samples, below the 1/65536"),
])
def test_mixed_or_bad_budgets_refused_naming_the_key(mix, message):
    with pytest.raises(HarnessError, match=message) as err:
        load_config("tiny", [f"data.mix={mix}"])
    assert "\n" not in str(err.value)


def test_budgets_sum_against_the_run_tokens(root):
    """300 steps train 307,200 tokens: budgets summing to that, or within one step of it, start;
    a sum 50 steps off is refused, naming the max_steps that matches."""
    shards = MixShards(_cfg(root, 250_000, 57_200, 300).data)
    for web in (250_000, 250_000 + PER_STEP, 250_000 - PER_STEP):
        cfg = _cfg(root, web, 57_200, 300)
        data = run_mod.build_data(cfg, one_process_built(cfg), shards)
        assert data.source_names == ("web", "code")
    for web, fix in ((250_000 + PER_STEP + 1, 301), (250_000 - 50 * PER_STEP, 250)):
        cfg = _cfg(root, web, 57_200, 300)
        with pytest.raises(HarnessError, match=rf"^data.mix's token budgets sum to [\d,]+ tokens "
                                               rf"but train.max_steps=300 trains 307,200 \(1,024 "
                                               rf"a step: global batch 16 x block_size 64\): set "
                                               rf"train.max_steps={fix} to match the budgets, "
                                               rf"or change data.mix\[i\].tokens$"):
            run_mod.build_data(cfg, one_process_built(cfg), shards)


def test_a_budget_over_max_repeats_is_refused(root):
    """code holds ~1,400 sequences of 64 (~90k tokens): a 100k budget capped at one epoch is
    refused in the budget's terms; 70k passes (and so do its exact draws)."""
    shards = MixShards(_cfg(root, 1, 1, 100).data)
    have = len(shards.parts[1].sequences("train", BLOCK_SIZE)) * BLOCK_SIZE
    assert 70_000 < have < 100_000
    over = _cfg(root, 307_200 - 100_000, 100_000, 300, ", max_repeats: 1")
    with pytest.raises(HarnessError, match=rf"^data.mix\[1\].tokens=100000 is 1.\d\d epochs of "
                                           rf"'code' \({have:,} tokens: [\d,]+ sequences of 64\), "
                                           rf"over data.mix\[1\].max_repeats=1: raise "
                                           rf"data.mix\[1\].max_repeats, lower the budget"):
        run_mod.build_data(over, one_process_built(over), shards)
    under = _cfg(root, 307_200 - 70_000, 70_000, 300, ", max_repeats: 1")
    run_mod.build_data(under, one_process_built(under), shards)


def _within_binomial(drawn: np.ndarray, budgets: list[int], samples: int) -> None:
    total = sum(budgets)
    for c, budget in enumerate(budgets):
        p = budget / total
        sigma = np.sqrt(samples * p * (1 - p))
        assert abs(drawn[c] - samples * p) <= 3 * sigma, (c, drawn[c], samples * p)
        assert abs(drawn[c] * BLOCK_SIZE - budget) <= 3 * sigma * BLOCK_SIZE


def test_a_budget_run_draws_each_source_within_its_binomial_error(root):
    """The training stream of build_data over the real shards: 300 steps of 16 samples, each
    source's draws (MixtureSampler.drawn_by, and counted batch by batch) near its budget."""
    cfg = _cfg(root, 250_000, 57_200, 300)
    built = one_process_built(cfg)
    data = run_mod.build_data(cfg, built, MixShards(cfg.data))
    drawn = data.sampler.drawn_by(300 * 16)
    accum = built.plan.batch.grad_accum
    counted = np.bincount(np.concatenate([data.sources(16 * s, k) for s in range(300)
                                          for k in range(accum)]), minlength=2)
    assert drawn.tolist() == counted.tolist() and drawn.sum() == 300 * 16
    _within_binomial(drawn, [250_000, 57_200], 300 * 16)


def test_a_long_budget_run_draws_each_source_within_its_binomial_error():
    """Three budgets of a 1,000-step run of 512 x 64 tokens (~7.8 blocks of 65,536 samples,
    the last one cut): the sampler's exact draws, source by source, near their budgets."""
    budgets = [21_000_000, 9_700_000, 2_068_000]  # 32,768,000 = 1,000 x 512 x 64
    mix = ", ".join(f"{{name: s{i}, sources: [s{i}], tokens: {t}}}" for i, t in enumerate(budgets))
    cfg = load_config("tiny", [f"data.mix=[{mix}]"])
    sampler = MixtureSampler(("s0", "s1", "s2"), [10**6, 10**5, 10**4],
                             [(0, cfg.data.mix_shares())], 1234, 8, 0, 1)
    drawn = sampler.drawn_by(1000 * 512)
    assert drawn.sum() == 1000 * 512
    _within_binomial(drawn, budgets, 1000 * 512)


def test_budgets_on_resume_are_weights(root):
    """mix_run.mix_phases: budgets scaled together (a longer run) resume the checkpoint's shares;
    another split is refused unless data.mix_reweight=true, like new weights."""
    cfg = _cfg(root, 240_000, 60_000, 300)
    shards = MixShards(cfg.data)
    meta = json.loads(json.dumps({"step": 30, "consumed_samples": 480,
                                  "data_mix": mix_run.mix_meta(shards, [(0, [0.8, 0.2])])}))
    longer = _cfg(root, 480_000, 120_000, 600)
    assert mix_run.mix_phases(longer, shards, meta, Path("ck")) == [(0, [0.8, 0.2])]
    other = _cfg(root, 150_000, 150_000, 300)
    with pytest.raises(HarnessError, match=r"^data.mix's weights \(shares web 0.5, code 0.5\) "
                                           r"differ .*data.mix_reweight=true"):
        mix_run.mix_phases(other, shards, meta, Path("ck"))
    other.data.mix_reweight = True
    assert mix_run.mix_phases(other, shards, meta, Path("ck")) == [(0, [0.8, 0.2]),
                                                                    (480, [0.5, 0.5])]
