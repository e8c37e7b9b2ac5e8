"""Tensor parallelism (parallel.tensor_parallel_size, DeepSpeed's AutoTP: harness/parallel/tensor_parallel.py)
against a single process with the same global batch, on the real engine with 2 real processes.

gpt2 and llama (GQA: each rank holds its query heads with the key/value head they share).
TP 2 x DP 1 (2 processes, torchrun, gloo), TP 2 x DP 2 (4 processes) and TP 1 x DP 1 (this
process) train the same 5 steps on the same global batch (micro 2 x accumulation 4, or 2 at
DP 2; clipping at 0.5 so the pre-clip norm decides the update). Compared: the loss, the pre-clip
gradient norms and the update-norm pass's signals (update norm, parameter norm, per-group update
ratios) of every step, each counting a sharded tensor's shards once each and a replicated one
(LayerNorms, embeddings, row-parallel biases) once, not TP times (harness.train.grad_norms), and
every parameter after training, the shards gathered across the group.

One launch per world size: every TP 2 x DP 1 run of this module (the cases, the dropout pair,
the activation measurements) in one 2-process launch, every TP 2 x DP 2 run in one 4-process
launch (tests/tp_cases_worker.py, tests/batched.py: each case its own engine, reseeded; one
process start per launch, the selected tests' cases only), module-scoped; a case that fails
fails its own test with its traceback. The TP 1 references train in this process, once per
case.

Tolerances, from a plain-PyTorch run: TP only changes the order of fp32 additions (a
row-parallel layer sums two half-width matmuls through an all-reduce). The same kind of
change in plain PyTorch, micro 2 x 4 against micro 8 x 1 (engine_utils.run_reference), moves
the pre-clip norm by 7.3e-8 relative over 5 steps and the parameters by 9.3e-6 (measured).
TP 2 against TP 1, measured over all 9 cases below: loss 1.1e-7, pre-clip norm 1.3e-7,
per-group grad norms 5.0e-7, update ratios 3.4e-7, update and parameter norms 6.4e-8, the
forward's statistics 1.7e-7 at step 1 and 1.1e-5 later, parameters 1.4e-5, param_jump 2.3e-7.
Bounds: rel REL = 1e-6 (2x the largest), MODEL_REL = 2e-5 for the later forward statistics,
parameters engine_utils.ROUNDING_TOL (3e-5); test_the_tolerance_covers_plain_pytorch_reordering
checks that REL covers the plain-PyTorch reordering and is within 20x of it.
"""
import subprocess
import sys
from pathlib import Path

import batched
import pytest
import torch
from engine_utils import ROUNDING_TOL, child_env, run_harness, run_reference, small_cfg, torchrun

pytestmark = pytest.mark.slow
CASES_WORKER = str(Path(__file__).parents[1] / "tp_cases_worker.py")
BATCH = ["train.micro_batch_size=2", "train.grad_accum_steps=4", "train.max_steps=5",
         "clip.max_norm=0.5", "monitor.update_sample=1"]
REL = 1e-6  # measured <= 5.0e-7 (the module docstring)
MODEL_REL = 2e-5  # the forward's statistics after step 1: measured 1.1e-5
AC = "activation_checkpointing"
TP2 = "parallel.tensor_parallel_size=2"
LLAMA = ["model.arch=llama", "model.n_head=4", "model.n_kv_head=2", "model.ffn_hidden=64"]
CASES = {
    "zero0": ["zero.stage=0"],
    "zero1": ["zero.stage=1"],
    "zero2": ["zero.stage=2"],
    # DeepSpeed's checkpoint with the tensor-parallel groups: each checkpointed input split
    # across the 2 ranks, gathered again for the recompute
    "zero1-partitioned-ac": ["zero.stage=1", f"{AC}.policy=every_layer",
                             f"{AC}.partition_activations=true"],
    # llama (harness/model/llama.py): 4 query heads sharing 2 key/value heads, so each rank holds 2
    # query heads and the 1 key/value head they share (GQA within the rank); wq/wk/wv and the
    # SwiGLU's w1/w3 column-parallel, wo and w2 row-parallel; RMSNorms replicated
    "llama-zero1": ["zero.stage=1", *LLAMA],
    # an untied (replicated) lm_head, the checkpoint's inputs split across the group
    "llama-zero2-untied-partitioned-ac": ["zero.stage=2", *LLAMA, "model.tie_embeddings=false",
                                          f"{AC}.policy=every_layer",
                                          f"{AC}.partition_activations=true"],
}
DP2_CASES = ["zero0", "zero2", "zero1-partitioned-ac"]
PARTITIONED = ["train.micro_batch_size=2", "train.grad_accum_steps=1",
               f"{AC}.policy=every_layer", f"{AC}.partition_activations=true"]
ACTIVATION_CASES = {"partitioned": [],
                    "partitioned-cpu-contiguous": [f"{AC}.cpu_checkpointing=true",
                                                   f"{AC}.contiguous_memory_optimization=true"]}
DROPOUT = ["zero.stage=1", "model.dropout=0.1", "train.micro_batch_size=2",
           "train.grad_accum_steps=2", "train.max_steps=3", TP2]
DROPOUT_CASES = {"plain": DROPOUT,
                 "ckpt": [*DROPOUT, f"{AC}.policy=every_layer",
                          f"{AC}.partition_activations=true", f"{AC}.cpu_checkpointing=true",
                          f"{AC}.contiguous_memory_optimization=true"]}


def _launch(tmp: Path, n: int, cases: list[tuple[str, str, list[str]]]) -> batched.Outcome:
    """One torchrun launch of n ranks running every (name, kind, overrides) in order
    (tests/batched.py: relaunched for the cases after one that fails)."""
    out = tmp / "out"
    return batched.launch(lambda spec: torchrun(n, CASES_WORKER, str(spec), str(out)), out,
                          {name: {"kind": kind, "overrides": overrides}
                           for name, kind, overrides in cases}, child_env(), nproc=n)


def _selected_cases(request, test_name: str) -> set:
    return {p["case"] for p in batched.launched_params(request, test_name)}


@pytest.fixture(scope="module")
def tp2(request, tmp_path_factory) -> batched.Outcome:
    """Every TP 2 x DP 1 case of the selected tests from one 2-process launch (one start, one
    rendezvous): the 6 training cases, the 2 dropout runs, the 2 activation measurements.
    A case that fails fails its own test, with its traceback (tests/batched.py)."""
    train = _selected_cases(request, "test_tp2_matches_tp1_loss_norm_and_parameters")
    dropout = batched.selected(request,
                               "test_checkpointed_tp2_gradients_equal_uncheckpointed_with_dropout")
    activation = _selected_cases(
        request, "test_partition_activations_halves_the_checkpointed_bytes_at_tp2")
    return _launch(tmp_path_factory.mktemp("tp2"), 2, [
        *((f"train-{c}", "train", [*CASES[c], *BATCH, TP2]) for c in CASES if c in train),
        *((f"dropout-{c}", "train", args) for c, args in DROPOUT_CASES.items() if dropout),
        *((f"activation-{c}", "activation", [*PARTITIONED, *extra, TP2])
          for c, extra in ACTIVATION_CASES.items() if c in activation)])


@pytest.fixture(scope="module")
def tp2dp2(request, tmp_path_factory) -> batched.Outcome:
    """The selected TP 2 x DP 2 training cases from one 4-process launch."""
    selected = _selected_cases(request, "test_tp2_dp2_matches_tp1_with_the_same_global_batch")
    return _launch(tmp_path_factory.mktemp("tp2dp2"), 4, [
        (f"train-{c}", "train", [*CASES[c], *BATCH, TP2, "train.grad_accum_steps=2"])
        for c in DP2_CASES if c in selected])


@pytest.fixture(scope="module")
def tp1():
    """tp1(case) -> (params, metrics) of the TP 1 run in this process, trained once per case
    (the TP 2 x DP 1 and TP 2 x DP 2 tests of a case compare with the same run)."""
    done = {}

    def get(case: str):
        if case not in done:
            done[case] = run_harness(small_cfg(*CASES[case], *BATCH))[:2]
        return done[case]

    return get


def tp_ranks(launch: batched.Outcome, name: str) -> list[dict]:
    out = launch.dir(name)  # fails with the case's own traceback if it failed
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(launch.nproc)]


def _rel(a: float, b: float) -> float:
    return abs(a / b - 1)


def _compared(ref: dict) -> list[str]:
    """The keys compared: loss, the pre-clip norms, the update-norm pass's signals (the
    update, parameter norm and per-group update ratios: replicated tensors counted once), the
    forward's statistics (mean log(Z)^2 and max log Z of the replicated head, the attention
    bound of each rank's heads, maxed over the group)."""
    return [k for k in ref if k in ("train/loss", "optim/grad_norm_preclip", "optim/update_norm",
                                    "optim/param_norm", "train/z_loss")
            or k.startswith(("grad_norm/", "update_ratio/", "model/"))]


def _assert_matches_tp1(ranks: list[dict], single_params: dict, single: list[dict]) -> None:
    assert len(single) == len(ranks[0]["metrics"]) == 5
    keys = _compared(single[0])
    assert "optim/update_norm" in keys and any(k.startswith("update_ratio/") for k in keys)
    assert "train/z_loss" in keys and "model/attn_logit_bound" in keys
    for step, ref in enumerate(single):
        for r in ranks:  # every rank logs the same numbers
            m = r["metrics"][step]
            for key in keys:
                # a product of two maxima of weights that Adam moved apart by rounding
                # (measured 1.1e-5 after step 1, bound MODEL_REL 2e-5)
                tol = MODEL_REL if step and key.startswith("model/") else REL
                assert _rel(m[key], ref[key]) < tol, (step, key, m[key], ref[key])
            assert m["optim/clipped"] == ref["optim/clipped"], step
            # logged every step, 0 by definition on the first (nothing to compare with);
            # weights change only in the optimizer: 0 up to rounding (measured 2.3e-7, bound 1e-6)
            assert m["optim/param_jump"] < 1e-6 if step else m["optim/param_jump"] == 0.0, step
    assert any(m["optim/clipped"] for m in single)  # the norm decided some updates
    for r in ranks:  # gathered to full size: the shapes and values of the TP 1 run
        assert set(r["params"]) == set(single_params)
        for name, p in single_params.items():
            assert r["params"][name].shape == p.shape, name
            assert (r["params"][name] - p).abs().max().item() < ROUNDING_TOL, name


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_tp1_loss_norm_and_parameters(tp2, tp1, case):
    _assert_matches_tp1(tp_ranks(tp2, f"train-{case}"), *tp1(case))


@pytest.mark.parametrize("case", DP2_CASES)
def test_tp2_dp2_matches_tp1_with_the_same_global_batch(tp2dp2, tp1, case):
    """4 processes: 2 tensor-parallel groups of 2, each group a data-parallel rank with half of
    the global batch (accumulation 2 instead of 4: global batch 8 either way)."""
    ranks = tp_ranks(tp2dp2, f"train-{case}")
    assert len(ranks) == 4
    _assert_matches_tp1(ranks, *tp1(case))


def test_the_tolerance_covers_plain_pytorch_reordering():
    """The reference for the tolerances: the same 5 steps in plain PyTorch, micro 2 x 4
    against micro 8 x 1 (only the order of fp32 additions differs)."""
    cfg = small_cfg("zero.stage=0", *BATCH)
    cfg8 = small_cfg("zero.stage=0", *BATCH[2:], "train.micro_batch_size=8",
                     "train.grad_accum_steps=1")
    pa, na, _ = run_reference(cfg, 2, 4)
    pb, nb, _ = run_reference(cfg8, 8, 1)
    norm_gap = max(_rel(a, b) for a, b in zip(na, nb))  # measured 7.3e-8
    assert norm_gap < REL < 20 * norm_gap  # covered, and not loose
    gap = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert 0 < gap < ROUNDING_TOL


ACT_WORKER = str(Path(__file__).parents[1] / "tp_activation_worker.py")


def _activations(out: Path, overrides: list[str], n: int) -> list[dict]:
    import json

    if n == 1:
        cmd = [sys.executable, ACT_WORKER, str(out), *overrides]
    else:
        cmd = torchrun(n, ACT_WORKER, str(out), *overrides)
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(n)]


def _activation(launch: batched.Outcome, name: str) -> list[dict]:
    import json

    out = launch.dir(name)  # fails with the case's own traceback if it failed
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(launch.nproc)]


@pytest.mark.parametrize("case", list(ACTIVATION_CASES))
def test_partition_activations_halves_the_checkpointed_bytes_at_tp2(tp2, case):
    """The bytes DeepSpeed's checkpoint holds for backward on each rank (the saved-bytes
    meter's view of ctx.deepspeed_saved_tensors, the partitions included): per layer one
    input of micro x seq x d_model fp32, plus a 3-element int64 size tensor per input.
    TP 1: 2 layers x 2 x 16 x 32 x 4 B = 8192 B (+ 48 B of sizes); TP 2: half of the
    activation on each rank, 4096 B (+ 48 B). Measured: 8240 and 4144 B. TP 1 is measured in
    this process (tp_activation_worker.measure, a fresh engine), TP 2 in the module's launch."""
    from tp_activation_worker import measure

    one = measure([*PARTITIONED, *ACTIVATION_CASES[case]])
    two = _activation(tp2, f"activation-{case}")
    sizes = 2 * 3 * 8  # the size tensor of each of the 2 checkpointed inputs
    activation = 2 * 2 * 16 * 32 * 4
    assert one["checkpointed"] == activation + sizes
    for r in two:
        assert r["checkpointed"] == activation // 2 + sizes  # 4144 B: the bytes, exactly
        assert r["forward"] < one["forward"] and r["peak"] < one["peak"]
        assert r["devices"] == ["cpu"]  # on a CPU-only machine the host is the device
        assert r["loss"] == pytest.approx(one["loss"], rel=REL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cpu_checkpointing_holds_the_checkpointed_inputs_in_host_memory(tmp_path):
    """On a GPU, one rank (NCCL refuses two ranks on one device, so TP 2 cannot run on a
    single GPU): with cpu_checkpointing the inputs DeepSpeed's checkpoint keeps for backward
    lie in host memory, the same bytes; without it on the GPU. On this CPU-only machine the
    host is the device, so only a GPU can tell them apart (`make test ARGS="-m gpu"`)."""
    base = [*PARTITIONED, "train.device=cuda"]
    on_gpu = _activations(tmp_path / "gpu", base, 1)[0]
    on_host = _activations(tmp_path / "host", [*base, f"{AC}.cpu_checkpointing=true"], 1)[0]
    assert on_gpu["devices"] == ["cuda"] and on_host["devices"] == ["cpu"]
    assert on_host["checkpointed"] == on_gpu["checkpointed"]
    assert on_host["loss"] == pytest.approx(on_gpu["loss"], rel=REL)


def test_checkpointed_tp2_gradients_equal_uncheckpointed_with_dropout(tp2):
    """Dropout 0.1 at TP 2: partition_activations + contiguous memory + cpu_checkpointing give
    the same losses and pre-clip norms as no checkpointing (DeepSpeed's checkpoint replays the
    RNG state for the recompute; the ranks of a group share a dropout stream: engine.build)."""
    plain = tp_ranks(tp2, "dropout-plain")
    ckpt = tp_ranks(tp2, "dropout-ckpt")
    for name, p in plain[0]["params"].items():  # the group drew the same dropout masks
        assert torch.equal(plain[1]["params"][name], p), name
    for a, b in zip(plain[0]["metrics"], ckpt[0]["metrics"]):
        for key in ("train/loss", "optim/grad_norm_preclip"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
    for name, p in plain[0]["params"].items():
        assert (ckpt[0]["params"][name] - p).abs().max().item() < 1e-6, name
