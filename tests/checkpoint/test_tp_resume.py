"""Checkpoints at tensor parallelism (parallel.tensor_parallel_size=2): resuming at TP 2 x DP 2
(4 real processes, gloo) is bit-identical to the uninterrupted run; resuming at another
data-parallel size goes through harness.checkpoint.reshard as at TP 1; another TP size is refused.

ZeRO 1 throughout: the resume restores the optimizer's flat partitions of the sharded model;
with dropout 0.1 it also restores the RNG streams (the ranks of a group share a dropout stream,
engine.build). Dropout is off where the data-parallel size changes: each data-parallel rank
draws its own masks, so another DP size draws other ones (as at TP 1,
tests/checkpoint/test_reshard.py).

Every TP 2 x DP 2 run in one 4-process launch, every TP 2 x DP 1 run in one 2-process launch
(test_reshard.launch_cases, tests/batched.py: one process start per launch, the selected
tests' runs only), module-scoped; a run that fails fails its own test with its traceback.
"""
import json
from pathlib import Path

import batched
import pytest
import torch
from engine_utils import ROUNDING_TOL, max_diff
from test_reshard import STEP3, assert_same_state, case, launch, launch_cases, results

pytestmark = pytest.mark.slow
TP2 = ["parallel.tensor_parallel_size=2"]
DROPOUT = "model.dropout=0.1"


@pytest.fixture(scope="module")
def four_ranks(request, tmp_path_factory, shards_dir):
    """Every TP 2 x DP 2 run of this module from one 4-process launch, in this order: the
    dropout run that stops at 3 (stop3), the ZeRO 1 run saving at 3 and 6 (tp2dp2), the
    uninterrupted dropout run (ref), then stop3's run directory resumed (resumed). stop3 and
    resumed lie apart: whatever stop3 left in the processes was overwritten by two other
    runs (or, after a run between them failed, the relaunch's processes are fresh), so only
    what the checkpoint restores can make resumed equal ref. Without
    test_resume_at_tp2_dp2_is_bit_identical in the selection, tp2dp2 alone."""
    tmp = tmp_path_factory.mktemp("four")
    tp2dp2 = {"tp2dp2": case(tmp / "tp2dp2", shards_dir, 0, 1, *TP2, "checkpoint.every=3")}
    if batched.selected(request, "test_resume_at_tp2_dp2_is_bit_identical"):
        cases = {"stop3": case(tmp / "run", shards_dir, 3, 1, *TP2, DROPOUT),
                 **tp2dp2,
                 "ref": case(tmp / "ref_run", shards_dir, 0, 1, *TP2, DROPOUT),
                 "resumed": case(tmp / "run", shards_dir, 0, 1, *TP2, DROPOUT)}
    else:
        cases = tp2dp2
    outcome = launch_cases(4, tmp / "out", cases)
    outcome.run_dirs = {name: _run_dir(c) for name, c in cases.items()}
    return outcome


@pytest.fixture(scope="module")
def tp2dp2(four_ranks):
    """4 ranks, ZeRO 1, 6 steps, saving at 3 and 6: the reference and a TP 2 x DP 2 checkpoint."""
    ranks, _, end = results(four_ranks, "tp2dp2")
    assert end["step_count"] == 6
    out, run = four_ranks.dir("tp2dp2"), four_ranks.run_dirs["tp2dp2"]
    meta = json.loads((run / STEP3 / "meta.json").read_text())
    assert meta["world_size"] == 4 and meta["tensor_parallel_size"] == 2
    return {"ranks": ranks, "step3": run / STEP3, "saved3": torch.load(out / "saved3.pt")}


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory, shards_dir, four_ranks):
    """Every TP 2 x DP 1 run of the selected tests from one 2-process launch: tp2dp2's step 3
    resumed (dp1, converted first: rank 0 of a 2-process world does not convert for the
    others), a bf16 run (bf16) and an untied llama run (llama)."""
    tmp = tmp_path_factory.mktemp("two")
    llama = ["model.arch=llama", "model.n_head=4", "model.n_kv_head=2", "model.ffn_hidden=64",
             "model.tie_embeddings=false"]
    cases = {}
    if batched.selected(request, "test_tp2_dp2_checkpoint_resumes_at_tp2_dp1") and \
            four_ranks.ok("tp2dp2"):  # else test_tp2_dp2_checkpoint_resumes_at_tp2_dp1 fails
        from harness.checkpoint.reshard import convert  # with tp2dp2's error

        step3 = four_ranks.run_dirs["tp2dp2"] / STEP3
        convert(step3)
        cases["dp1"] = case(tmp / "run", shards_dir, 0, 1, *TP2, f"checkpoint.resume={step3}")
    if batched.selected(request, "test_a_bf16_tp2_checkpoint_gives_its_fp32_masters"):
        cases["bf16"] = case(tmp / "bf16_run", shards_dir, 0, 1, *TP2, "train.precision=bf16")
    if batched.selected(request, "test_a_llama_tp2_checkpoint_reads_whole"):
        cases["llama"] = case(tmp / "llama_run", shards_dir, 0, 1, *TP2, *llama)
    outcome = launch_cases(2, tmp / "out", cases)
    outcome.run_dirs = {name: _run_dir(c) for name, c in cases.items()}
    return outcome


def _run_dir(case: dict) -> Path:
    """The train.run_dir of a case."""
    (arg,) = [a for a in case["overrides"] if a.startswith("train.run_dir=")]
    return Path(arg.split("=", 1)[1])


def test_resume_at_tp2_dp2_is_bit_identical(four_ranks):
    ref, _, _ = results(four_ranks, "ref")
    _, _, saved = results(four_ranks, "stop3")  # stops at 3
    ranks, start, end = results(four_ranks, "resumed")
    assert_same_state(start, saved)  # rank 0's shard of everything Adam carries
    assert end["step_count"] == 6
    for resumed, uninterrupted in zip(ranks, ref):  # gathered across each group
        assert max_diff(resumed, uninterrupted) == 0.0


def test_tp2_dp2_checkpoint_resumes_at_tp2_dp1(tp2dp2, two_ranks):
    """Half the data-parallel ranks: the universal checkpoint re-partitions the ZeRO state;
    the global batch (8) stays, the accumulation doubles (sums in another order: ROUNDING_TOL,
    as harness.checkpoint.reshard's tests at TP 1). The run: two_ranks's dp1."""
    ranks, start, end = results(two_ranks, "dp1")
    assert_same_state(start, tp2dp2["saved3"])
    assert end["step_count"] == 6 and set(end["step"]) == {6.0}
    assert max_diff(ranks[0], ranks[1]) == 0.0
    assert max_diff(ranks[0], tp2dp2["ranks"][0]) <= ROUNDING_TOL


def test_tp2_checkpoint_is_refused_at_tp1(tmp_path, shards_dir, tp2dp2):
    step3 = tp2dp2["step3"]
    launch(1, tmp_path / "a", tmp_path / "run", shards_dir, 0, 1, f"checkpoint.resume={step3}",
           refused=(
               f"{step3} was saved at parallel.tensor_parallel_size=2"))


def test_eval_and_export_read_a_tp2_checkpoint_whole(tp2dp2):
    """harness.checkpoint.io (eval, sample, export) joins the ranks' shards as AutoTP cut
    them: exactly the parameters DeepSpeed's own gather gives in the training processes."""
    from harness.checkpoint import io as checkpoint_io

    state = checkpoint_io.state_dict(tp2dp2["step3"].parent / "step00000006")
    for name, p in tp2dp2["ranks"][0].items():
        assert torch.equal(state[name], p), name


def test_a_bf16_tp2_checkpoint_gives_its_fp32_masters(two_ranks):
    """bf16 at ZeRO 1 (BF16_Optimizer): each tensor-parallel rank's optimizer files hold its
    shards' fp32 masters; joined, they round to the bf16 weights the processes trained with."""
    from harness.checkpoint import io as checkpoint_io

    ranks, _, _ = results(two_ranks, "bf16")
    state = checkpoint_io.state_dict(two_ranks.run_dirs["bf16"] / "checkpoints" / "step00000006")
    assert any(not torch.equal(state[n], p.float()) for n, p in ranks[0].items())  # masters
    for name, p in ranks[0].items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name].to(p.dtype), p), name


def test_a_llama_tp2_checkpoint_reads_whole(two_ranks):
    """llama's shards (wq, wk, wv, w1, w3 cut by rows, wo and w2 by columns, an untied lm_head
    replicated) joined by harness.checkpoint.io: the parameters DeepSpeed's gather gives."""
    from harness.checkpoint import io as checkpoint_io

    ranks, _, _ = results(two_ranks, "llama")
    state = checkpoint_io.state_dict(two_ranks.run_dirs["llama"] / "checkpoints" /
                                     "step00000006")
    assert "blocks.0.attn.wk.weight" in ranks[0] and "lm_head.weight" in ranks[0]
    for name, p in ranks[0].items():
        assert torch.equal(state[name], p), name
