"""Every logged gradient number is the same at 2 ranks as at 1 rank, and equals plain PyTorch.

2 real processes (torchrun, gloo) x accumulation 2 against 1 process x accumulation 4: the same
8 samples per step in the same micro-batches of 2, so the two runs differ only in where the
micro-batch gradients are summed. At every ZeRO stage, fp32 and bf16, optimizer offload
included (ZeRO 1-3), and zero.overlap_comm on at ZeRO 2: the pre-clip global norm, the
per-group norms, the clip coefficient, the loss, the update-norm pass the monitor reads
(update norm, parameter norm, per-group update ratios at ZeRO 0-2, the parameter jump), and
the forward's statistics (mean log(Z)^2, max log Z, the attention-logit bounds: means summed
over ranks, maxima maxed).

The 2-rank runs share one torchrun launch (tests/batched.py: the ranks train every case in turn,
an engine each, and a case that fails fails its own test); the 1-rank runs train in this process.

Tolerances:
- fp32, and bf16 with fp32 accumulation (the default): the micro-batch gradients are
  bit-identical in both runs (same weights, same micro-batch), and only the order of fp32
  additions differs: rel 1e-4 as the issue asks (measured: <= 1e-6).
- bf16 accumulated in bf16 (ZeRO 0 only): the sum is rounded to bf16 (8 significant bits) in a
  different order, an error of up to 2^-8 relative per element: rel 4e-3.
Later steps start from weights that differ by such rounding; Adam turns it into lr-sized
moves (see engine_utils.ROUNDING_TOL), so steps 2-3 are compared at 10x the tolerance, and
under bf16 at 1e-2: a master-weight difference that flips a bf16 rounding of the weights moves
their gradients by up to 2^-8 relative (measured 1.9e-3 with optimizer offload at ZeRO 2).
The attention-logit bounds of ZeRO 0's bf16-summed llama case at steps 2-3: rel 3e-2. They
are maxima over products of bf16 weights, whose rounding flips with the summation order;
measured 0.9% alone and 2.1% inside the whole suite (another summation order), since ZeRO 0 takes
Adam's full first step (it took 0.735 of it before harness.train.engine.start_optimizer_fresh).
"""
from pathlib import Path

import batched
import pytest
import torch
from engine_utils import child_env, plain_grads, precision_args, run_harness, small_cfg, torchrun

from harness.callbacks.memory import PeakMemory
from harness.callbacks.throughput import Throughput
from harness.model import layer_group

pytestmark = pytest.mark.slow
WORKER = str(Path(__file__).parents[1] / "norm_worker.py")
TWO = ["train.micro_batch_size=2", "train.grad_accum_steps=2"]
ONE = ["train.micro_batch_size=2", "train.grad_accum_steps=4"]
MODERN = ("model.arch=llama", "model.n_kv_head=1", "model.qk_norm=true", "train.z_loss=0.01",
          "train.loss_chunk_tokens=8")  # issue 13's model and loss
CASES = [(s, p, False, ()) for s in (0, 1, 2, 3) for p in ("fp32", "bf16")] + [
    (1, "fp32", True, ()), (2, "bf16", True, ()), (3, "bf16", True, ()),
    (3, "bf16", False, MODERN), (0, "fp32", False, MODERN),
    (2, "bf16", False, ("zero.overlap_comm=true",))]  # the double-buffered reduction


def case_args(stage, precision, offload, extra) -> list[str]:
    args = [*precision_args(stage, precision), "clip.max_norm=0.5", *extra]
    if offload:
        args.append("zero.offload_optimizer=true")
    return args


def case_id(stage, precision, offload, extra) -> str:
    return f"{stage}-{precision}{'-offload' if offload else ''}{'-llama' if extra else ''}"


@pytest.fixture(scope="module")
def two_rank_runs(request, tmp_path_factory):
    """One torchrun launch for every selected case (tests/batched.py): the 2 ranks train each
    case in turn, an engine each, and write OUT/<case>/rankR.pt."""
    params = batched.launched_params(request,
                                     "test_two_ranks_log_what_one_rank_and_plain_pytorch_log")
    cases = {case_id(**p): [*case_args(**p), *TWO] for p in params}
    out = tmp_path_factory.mktemp("two_ranks")
    return batched.launch(lambda spec: torchrun(2, WORKER, "--cases", str(spec), str(out)),
                          out, cases, child_env())


def plain_first_step(cfg, micro: int, accum: int, dtype) -> dict[str, float]:
    """clip_grad_norm_'s input on a plain copy (see engine_utils.plain_grads): global and
    per-group norms."""
    grads = plain_grads(cfg, micro, accum, dtype)
    # clip_grad_norm_'s own arithmetic, on parameters that carry the fp32 sums as .grad
    holders = [torch.nn.Parameter(torch.empty_like(g)) for g in grads.values()]
    for h, g in zip(holders, grads.values()):
        h.grad = g
    total = torch.nn.utils.clip_grad_norm_(holders, float("inf")).item()
    groups: dict[str, float] = {}
    for n, g in grads.items():
        groups[layer_group(n)] = groups.get(layer_group(n), 0.0) + g.double().norm().item() ** 2
    return {"optim/grad_norm_preclip": total,
            **{f"grad_norm/{k}": v ** 0.5 for k, v in groups.items()}}


def same_everywhere(m: dict) -> dict:
    """What every rank must log identically: all but the per-rank wall-clock timings."""
    return {k: v for k, v in m.items() if not k.startswith("throughput/")}


def norm_keys(m: dict) -> list[str]:
    return [k for k in m if k == "optim/grad_norm_preclip" or k.startswith("grad_norm/")]


@pytest.mark.parametrize("stage, precision, offload, extra", CASES,
                         ids=lambda v: "llama" if v == MODERN else None)
def test_two_ranks_log_what_one_rank_and_plain_pytorch_log(two_rank_runs, stage, precision,
                                                           offload, extra):
    args = case_args(stage, precision, offload, extra)
    bf16_sum = stage == 0 and precision == "bf16"
    rel = 4e-3 if bf16_sum else 1e-4
    d = two_rank_runs.dir(case_id(stage, precision, offload, extra))
    r0, r1 = [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(2)]
    _, one, built = run_harness(small_cfg(*args, *ONE), callbacks=[Throughput(), PeakMemory()])
    # every rank logs the same numbers, and makes as many collectives as a single rank
    assert [norm_keys(m) for m in r0["metrics"]] == [norm_keys(m) for m in one]
    # (memory too: the largest peak over ranks)
    assert [same_everywhere(m) for m in r0["metrics"]] == [same_everywhere(m) for m in r1["metrics"]]
    # PeakMemory's all-reduce: on its report steps (first, last), every rank logs the max
    assert "memory/cpu_rss_gb" in r0["metrics"][0] and "memory/cpu_rss_gb" in one[0]
    assert r0["calls"] == r1["calls"] == built.comm.calls
    plain_groups = [k for k in one[0] if k.startswith("grad_norm/")]
    for step, (two, single) in enumerate(zip(r0["metrics"], one)):
        tol = rel if step == 0 else 1e-2 if precision == "bf16" else 10 * rel
        forward = [k for k in single if k.startswith("model/") or k == "train/z_loss"]
        assert len(forward) == 2 + 1 + 2  # z_loss, lse max, the bound's max and per layer
        # the update-norm pass: update norm, parameter norm, per-group update ratios (ZeRO 0-2)
        update = [k for k in single if k in ("optim/update_norm", "optim/param_norm")
                  or k.startswith("update_ratio/")]
        assert len(update) == 2 + (0 if stage == 3 else len(plain_groups))  # ZeRO 3: mixed
        for key in [*norm_keys(single), "optim/clip_coef", "train/loss", "optim/lr", *update,
                    *forward]:
            # a maximum over the attention of bf16 weights: see the docstring
            at = 3e-2 if bf16_sum and step and key.startswith("model/attn_logit_bound") else tol
            assert two[key] == pytest.approx(single[key], rel=at), (step, key)
        if step:  # nothing wrote the weights between steps: rounding only, on both
            assert max(two["optim/param_jump"], single["optim/param_jump"]) < 1e-6, step
        for key in ("optim/clipped", "optim/clip_rate", "optim/skipped", "train/tokens_seen"):
            assert two[key] == single[key], (step, key)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    plain = plain_first_step(small_cfg(*args, *ONE), 2, 4, dtype)
    # the same arithmetic (bf16: the same bf16 micro-batch gradients, summed in fp32; measured
    # 6e-8), except where DeepSpeed sums in bf16 (ZeRO 0 bf16: measured 4.3e-4). The bf16 llama
    # (qk_norm, z-loss) at ZeRO 3: 2.6e-5 on the computed sampler's first batch (below 1e-5 on
    # the stored permutation's): a bf16 rounding that one side does and the other not, not
    # yet found; held at the 1e-4 the ranks are held to
    ref_rel = rel if bf16_sum else 1e-4 if precision == "bf16" and extra else 1e-5
    for key, value in plain.items():
        assert one[0][key] == pytest.approx(value, rel=ref_rel), key
        assert r0["metrics"][0][key] == pytest.approx(value, rel=ref_rel), key
