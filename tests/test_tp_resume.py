"""Checkpoints at tensor parallelism (parallel.tensor_parallel_size=2): resuming at TP 2 x DP 2
(4 real processes, gloo) is bit-identical to the uninterrupted run; resuming at another
data-parallel size goes through harness.reshard as at TP 1; another TP size is refused.

ZeRO 1 throughout: the resume restores the optimizer's flat partitions of the sharded model;
with dropout 0.1 it also restores the RNG streams (the ranks of a group share a dropout stream,
engine.build). Dropout is off where the data-parallel size changes: each data-parallel rank
draws its own masks, so another DP size draws other ones (as at TP 1, tests/test_reshard.py).
"""
import json

import pytest
import torch

from engine_utils import ROUNDING_TOL, max_diff
from test_reshard import STEP3, assert_same_state, launch

pytestmark = pytest.mark.slow
TP2 = ["parallel.tensor_parallel_size=2"]
DROPOUT = "model.dropout=0.1"


@pytest.fixture(scope="module")
def tp2dp2(tmp_path_factory, shards_dir):
    """4 ranks, ZeRO 1, 6 steps, saving at 3 and 6: the reference and a TP 2 x DP 2 checkpoint."""
    tmp = tmp_path_factory.mktemp("tp2dp2")
    ranks, _, end = launch(4, tmp / "out", tmp / "run", shards_dir, 0, 1, *TP2,
                           "checkpoint.every=3")
    assert end["step_count"] == 6
    meta = json.loads((tmp / "run" / STEP3 / "meta.json").read_text())
    assert meta["world_size"] == 4 and meta["tensor_parallel_size"] == 2
    return {"ranks": ranks, "step3": tmp / "run" / STEP3,
            "saved3": torch.load(tmp / "out" / "saved3.pt")}


def test_resume_at_tp2_dp2_is_bit_identical(tmp_path, shards_dir):
    ref, _, _ = launch(4, tmp_path / "ref", tmp_path / "ref_run", shards_dir, 0, 1, *TP2, DROPOUT)
    run = tmp_path / "run"
    _, _, saved = launch(4, tmp_path / "a", run, shards_dir, 3, 1, *TP2, DROPOUT)  # stops at 3
    ranks, start, end = launch(4, tmp_path / "b", run, shards_dir, 0, 1, *TP2, DROPOUT)
    assert_same_state(start, saved)  # rank 0's shard of everything Adam carries
    assert end["step_count"] == 6
    for resumed, uninterrupted in zip(ranks, ref):  # gathered across each group
        assert max_diff(resumed, uninterrupted) == 0.0


def test_tp2_dp2_checkpoint_resumes_at_tp2_dp1(tmp_path, shards_dir, tp2dp2):
    """Half the data-parallel ranks: the universal checkpoint re-partitions the ZeRO state;
    the global batch (8) stays, the accumulation doubles (sums in another order: ROUNDING_TOL,
    as harness.reshard's tests at TP 1)."""
    resume = f"checkpoint.resume={tp2dp2['step3']}"
    # rank 0 of a 2-process world does not convert for the others: convert first
    from harness.reshard import convert

    convert(tp2dp2["step3"])
    ranks, start, end = launch(2, tmp_path / "b", tmp_path / "run", shards_dir, 0, 1, *TP2,
                               resume)
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
    """harness.checkpoint_io (eval, sample, export) joins the ranks' shards as AutoTP cut
    them: exactly the parameters DeepSpeed's own gather gives in the training processes."""
    from harness import checkpoint_io

    state = checkpoint_io.state_dict(tp2dp2["step3"].parent / "step00000006")
    for name, p in tp2dp2["ranks"][0].items():
        assert torch.equal(state[name], p), name


def test_a_bf16_tp2_checkpoint_gives_its_fp32_masters(tmp_path, shards_dir):
    """bf16 at ZeRO 1 (BF16_Optimizer): each tensor-parallel rank's optimizer files hold its
    shards' fp32 masters; joined, they round to the bf16 weights the processes trained with."""
    from harness import checkpoint_io

    run = tmp_path / "run"
    ranks, _, _ = launch(2, tmp_path / "out", run, shards_dir, 0, 1, *TP2,
                         "train.precision=bf16")
    state = checkpoint_io.state_dict(run / "checkpoints" / "step00000006")
    assert any(not torch.equal(state[n], p.float()) for n, p in ranks[0].items())  # masters
    for name, p in ranks[0].items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name].to(p.dtype), p), name


def test_a_llama_tp2_checkpoint_reads_whole(tmp_path, shards_dir):
    """llama's shards (wq, wk, wv, w1, w3 cut by rows, wo and w2 by columns, an untied lm_head
    replicated) joined by harness.checkpoint_io: the parameters DeepSpeed's gather gives."""
    from harness import checkpoint_io

    llama = ["model.arch=llama", "model.n_head=4", "model.n_kv_head=2", "model.ffn_hidden=64",
             "model.tie_embeddings=false"]
    run = tmp_path / "run"
    ranks, _, _ = launch(2, tmp_path / "out", run, shards_dir, 0, 1, *TP2, *llama)
    state = checkpoint_io.state_dict(run / "checkpoints" / "step00000006")
    assert "blocks.0.attn.wk.weight" in ranks[0] and "lm_head.weight" in ranks[0]
    for name, p in ranks[0].items():
        assert torch.equal(state[name], p), name
