"""The planner: model-state arithmetic by hand, activation predictions against the exact meter
on small CPU models, recommendations that fit and are ordered by the cost model, bad input."""
import math

import pytest
from engine_utils import make_data, small_cfg

from harness.common.errors import HarnessError
from harness.config import load_config
from harness.model import count_params
from harness.model.gpt import GPT
from harness.model.memory import measure_step
from harness.plan import command, planner
from harness.train.engine import build

GB = 1e9
AC = "activation_checkpointing"


def test_seed_7b_mixed_precision_arithmetic():
    # the seeds: 7B x 2 B = 14 GB params, 14 GB grads, 7B x 8 B = 56 GB Adam m+v;
    # the fp32 master copy is another 7B x 4 B = 28 GB: 16 B/param in all
    s = planner.model_state_bytes(7_000_000_000, "bf16", zero_stage=0, dp=1)
    assert (s["parameters"], s["gradients"], s["optimizer_states"], s["master_params"]) == \
        (14 * GB, 14 * GB, 56 * GB, 28 * GB)
    fp32 = planner.model_state_bytes(7_000_000_000, "fp32", zero_stage=0, dp=1)
    assert (fp32["parameters"], fp32["gradients"], fp32["optimizer_states"],
            fp32["master_params"]) == (28 * GB, 28 * GB, 56 * GB, 0)


def test_zero2_on_8_gpus_by_hand():
    # 1.3B bf16, ZeRO 2 over 8 ranks: params whole (2.6 GB), grads / 8 (0.325 GB),
    # master 5.2 / 8 = 0.65 GB, Adam 10.4 / 8 = 1.3 GB: 4.875 GB per GPU
    s = planner.model_state_bytes(1_300_000_000, "bf16", zero_stage=2, dp=8)
    assert s == {"parameters": 2.6 * GB, "gradients": 0.325 * GB, "master_params": 0.65 * GB,
                 "optimizer_states": 1.3 * GB, "cpu": 0}
    assert planner.model_state_bytes(1_300_000_000, "bf16", 1, 8)["gradients"] == 2.6 * GB
    assert planner.model_state_bytes(1_300_000_000, "bf16", 3, 8)["parameters"] == 0.325 * GB
    # gradients summed in fp32 (the default under bf16): 4 bytes each, 6 with BF16_Optimizer
    fp32_sum = lambda stage, **kw: planner.model_state_bytes(  # noqa: E731
        1_300_000_000, "bf16", stage, 8, grad_accum_dtype="fp32", **kw)["gradients"]
    assert fp32_sum(2) == fp32_sum(3) == 0.65 * GB
    assert fp32_sum(1) == 7.8 * GB and fp32_sum(1, offload_optimizer=True) == 5.2 * GB
    off = planner.model_state_bytes(1_300_000_000, "bf16", 2, 8, offload_optimizer=True)
    assert off["master_params"] == off["optimizer_states"] == 0
    assert off["cpu"] == pytest.approx((0.65 + 1.3 + 0.65) * GB)  # + its fp32 grad shard


def test_parameter_count_matches_the_model():
    cfg = small_cfg("model.bias=false")
    assert planner.predict_memory(cfg, 1, device="cpu")["n_params"] == count_params(GPT(cfg.model))


SHAPES = {
    "A": ["model.n_layer=4", "model.d_model=64", "model.block_size=32", "model.n_head=2"],
    "B": ["model.n_layer=6", "model.d_model=96", "model.block_size=48", "model.n_head=3"],
    "C": ["model.n_layer=8", "model.d_model=32", "model.block_size=64", "model.n_head=4"],
}
CASES = [  # (policy, dropout, shape, precision, extra overrides)
    ("none", 0.0, "A", "fp32", []),
    ("every_layer", 0.1, "A", "fp32", []),
    ("mlp", 0.1, "A", "fp32", []),
    ("every_k", 0.0, "B", "fp32", [f"{AC}.every_k=2"]),
    ("sqrt", 0.1, "B", "fp32", []),
    ("none", 0.0, "B", "bf16", ["train.grad_accum_dtype=bf16"]),
    ("count", 0.0, "C", "fp32", [f"{AC}.number_checkpoints=3"]),
    ("attention", 0.0, "C", "fp32", []),
    ("none", 0.0, "A", "fp32", ["model.vocab_size=4096"]),  # the logits dominate
    ("attention", 0.1, "C", "fp32", []),
]


def _measured_and_predicted(policy, dropout, shape, precision, extra, micro=4):
    cfg = small_cfg(*SHAPES[shape], f"model.dropout={dropout}", f"train.precision={precision}",
                    f"train.micro_batch_size={micro}", "train.grad_accum_steps=1",
                    f"{AC}.policy={policy}", *extra)
    built = build(cfg)
    x, y = make_data(cfg, micro).micro_batch(0, 0)
    measured = measure_step(built.engine.module, x, y)["peak"]
    return measured, planner.predict_memory(cfg, 1, device="cpu")["activations"]


# The saved-bytes meter is exact and deterministic: measured at most 0.79% apart from the
# planner (attention-p0.1-C), under 0.2% in 7 of the 10 cases; bound 1% (as test_llama_memory
# and test_tp_memory). A forgotten dropout mask moves it 1.9-5.2%:
# test_a_forgotten_dropout_mask_fails_the_bound. (A forgotten logsumexp, b*h*t fp32, is
# 0.1-0.9% of these shapes: too small for any one bound over all cases to see.)
REL = 0.01


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-p{c[1]}-{c[2]}-{c[3]}")
def test_activation_prediction_within_1_percent(case):
    measured, predicted = _measured_and_predicted(*case)
    assert predicted == pytest.approx(measured, rel=REL)


def test_a_forgotten_dropout_mask_fails_the_bound(monkeypatch):
    """The bound above can fail: without the MLP's dropout mask (b*t*d) the planner is 4.3%
    below the meter at sqrt-p0.1-B (the old 10% bound let it pass)."""
    import harness.model.memory as memory

    real = memory.block_parts

    def without_mask(cfg, micro, act_bytes=4, fused=False, tp=1):
        parts = dict(real(cfg, micro, act_bytes, fused, tp))
        parts["mlp"] -= micro * cfg.block_size * cfg.d_model * act_bytes
        return parts

    monkeypatch.setattr(memory, "block_parts", without_mask)
    measured, predicted = _measured_and_predicted("sqrt", 0.1, "B", "fp32", [])
    assert predicted != pytest.approx(measured, rel=REL)
    assert predicted == pytest.approx(measured, rel=0.10)


def test_gpu_dropout_uses_the_fused_attention_path():
    cfg = small_cfg(*SHAPES["C"], "model.dropout=0.1")
    cpu = planner.predict_memory(cfg, 1, device="cpu")["activations"]
    gpu = planner.predict_memory(cfg, 1, device="cuda")["activations"]
    no_dropout = planner.predict_memory(small_cfg(*SHAPES["C"]), 1, device="cuda")["activations"]
    assert no_dropout < gpu < cpu  # masks kept, T x T matrices not


def test_recompute_shares():
    cfg = small_cfg("model.n_layer=8", f"{AC}.every_k=2")
    counts = planner.param_counts(cfg)
    share = {p: planner.recompute_share(cfg, p, counts) for p in planner.SEARCH_POLICIES}
    assert share["none"] == 0
    assert share["every_layer"] == share["sqrt"] < 1 / 3  # one extra forward of the blocks
    assert share["every_k"] == pytest.approx(share["every_layer"] / 2)
    assert share["attention"] + share["mlp"] == pytest.approx(share["every_layer"])


def _gpt2_small(*extra):
    return load_config("gpt2-small", list(extra))


def test_recommend_returns_only_fitting_configs_fastest_first():
    cfg, gpu = _gpt2_small(), 24 * GB
    found = planner.recommend(cfg, 8, gpu, 512)
    assert found
    for c in found:
        assert c["micro_batch"] * c["grad_accum"] * 8 == 512
        assert c["required"] <= gpu
        mem = planner.predict_memory(cfg, 8, c["micro_batch"], c["policy"], gpu)
        assert mem["fits"] and mem["required"] == c["required"]
    costs = [c["cost"] for c in found]
    assert costs == sorted(costs)
    # everything that fits is offered: micro 64 without checkpointing does not
    offered = {(c["micro_batch"], c["policy"]) for c in found}
    assert (64, "none") not in offered
    assert not planner.predict_memory(cfg, 8, 64, "none", gpu)["fits"]
    assert found[0]["policy"] == "none" and found[0]["why"]


def test_more_memory_allows_bigger_micro_batches():
    cfg = _gpt2_small()
    small = planner.recommend(cfg, 8, 24 * GB, 512)[0]
    big = planner.recommend(cfg, 8, 80 * GB, 512)[0]
    assert big["micro_batch"] > small["micro_batch"] and big["cost"] < small["cost"]


def test_tight_memory_needs_checkpointing():
    cfg = _gpt2_small()
    need = {p: planner.predict_memory(cfg, 1, 1, p, 80 * GB)["required"]
            for p in ("none", "every_layer")}
    found = planner.recommend(cfg, 1, (need["none"] + need["every_layer"]) / 2, 64)
    assert found and all(c["policy"] != "none" for c in found)


@pytest.mark.parametrize("text,expected", [("80GB", 80e9), ("80GiB", 80 * 2**30),
                                           ("24G", 24 * 2**30), ("1.5 TB", 1.5e12),
                                           ("1024", 1024)])
def test_parse_size(text, expected):
    assert command.parse_size(text) == expected


@pytest.mark.parametrize("text", ["80XB", "", "GB", "-3GB", "0GB", "eighty"])
def test_bad_gpu_memory_names_the_flag(text):
    with pytest.raises(HarnessError, match="--gpu-memory"):
        command.parse_size(text)


@pytest.mark.parametrize("argv,flag", [(["--gpu-memory", "80XB"], "--gpu-memory"),
                                       (["--world-size", "two"], "--world-size"),
                                       (["--target-global-batch", "7", "--world-size", "2"],
                                        "--target-global-batch")])
def test_main_reports_bad_flags(argv, flag, capsys):
    assert command.main(argv) == 2
    assert f"error: {flag}" in capsys.readouterr().err


def test_main_prints_the_tables(capsys):
    assert command.main(["--config", "gpt2-small", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    for line in ("Adam m + v", "fp32 master parameters", "peak allocated",
                 "activations by checkpointing policy", "fastest configurations"):
        assert line in out


def test_the_search_walks_divisors_not_every_integer(monkeypatch):
    assert planner.divisors(1) == [1]
    assert planner.divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36]
    assert planner.divisors(97) == [1, 97]
    # the work counted, not timed (a wall clock flakes on a shared machine): trial divisions
    # up to sqrt(n), and a walk past it stops at once instead of running for hours
    n, seen = 125 * 10**9, []  # 1.25e11 per rank below; 2^9 x 5^12: 10 x 13 divisors

    class Counted(int):
        def __mod__(self, d):
            seen.append(d)
            assert len(seen) <= math.isqrt(n) + 1, "trial division past sqrt(n)"
            return int(self) % d

    assert len(planner.divisors(Counted(n))) == 130 and len(seen) == math.isqrt(n)
    # one memory prediction per (divisor, policy) tried: at most 130 x the policies
    calls = []
    real = planner.predict_memory
    monkeypatch.setattr(planner, "predict_memory",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = load_config("gpt2-small")
    found = planner.recommend(cfg, 8, 80e9, 10**12)
    assert found and all(10**12 % (c["micro_batch"] * 8) == 0 for c in found)
    assert 0 < len(calls) <= 130 * len(planner.SEARCH_POLICIES)
    assert all(125 * 10**9 % micro == 0 for _, _, micro, *_ in calls)


@pytest.mark.parametrize("argv,flag", [(["--target-global-batch", "1000000000000"],
                                        "--target-global-batch"),
                                       (["--world-size", "0"], "--world-size"),
                                       (["--top", "\u00b2"], "--top"),
                                       (["--gpu-memory", "9" * 400 + "GB"], "--gpu-memory")])
def test_plan_numbers_are_range_checked(argv, flag, capsys):
    assert command.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}=") and err.count("\n") == 1


def test_tensor_parallel_model_states_by_hand():
    """gpt2-small at TP 2 on 8 GPUs (data-parallel 4), ZeRO 1, bf16: each rank holds half of
    every block's qkv (3d^2 + 3d), fc (4d^2 + 4d) and both projection weights (d^2, 4d^2),
    all of the rest; the fp32 master and Adam states are sharded over the 4 data-parallel
    ranks only."""
    from harness.plan.planner import model_state_bytes, predict_memory

    cfg = load_config("gpt2-small", ["parallel.tensor_parallel_size=2", "zero.stage=1",
                                     "train.precision=bf16", "train.global_batch_size=32",
                                     "train.micro_batch_size=8"])
    d, L = 768, 12
    total = count_params(GPT(cfg.model))
    sharded = L * (12 * d * d + 7 * d)
    rank = total - sharded // 2
    mem = predict_memory(cfg, 8, device="cuda")
    want = model_state_bytes(rank, "bf16", 1, 4, False, "fp32")
    assert mem["n_params"] == total
    for key in ("parameters", "gradients", "master_params", "optimizer_states"):
        assert mem[key] == want[key], key
    assert mem["master_params"] == 4 * -(-rank // 4)
    one = predict_memory(load_config("gpt2-small", ["zero.stage=1", "train.precision=bf16",
                                                    "train.global_batch_size=32",
                                                    "train.micro_batch_size=8"]), 4,
                         device="cuda")
    assert mem["parameters"] < one["parameters"] == 2 * total


def test_tensor_parallel_activations_by_hand():
    """gpt2-small, bf16 on a GPU, micro 8, at TP 2: per rank, qkv's output, attention's output
    and logsumexp (6 of 12 heads), fc's and GELU's outputs are halved; the LayerNorms (input,
    output, statistics) and the residual stream are whole. partition_activations halves what
    a checkpoint keeps (measured on 2 real ranks: tests/plan/test_tp_memory.py)."""
    base = ["train.precision=bf16", "train.global_batch_size=16", "train.micro_batch_size=8",
            "parallel.tensor_parallel_size=2"]
    u, stats = 8 * 1024 * 768 * 2, 2 * 8 * 1024 * 4
    lse = 8 * 6 * 1024 * 4
    attention = stats + u + 3 * u // 2 + u // 2 + lse
    mlp = u + stats + u + 8 * u // 2
    mem = planner.predict_memory(_gpt2_small(*base), 2, device="cuda")
    assert mem["activations_per_layer"] == u + attention + mlp
    assert mem["checkpointed_per_layer"] == u
    split = planner.predict_memory(_gpt2_small(*base, f"{AC}.policy=every_layer",
                                               f"{AC}.partition_activations=true"), 2,
                                   device="cuda")
    assert split["checkpointed_per_layer"] == u // 2
    one = planner.predict_memory(_gpt2_small(*base[:3]), 1, device="cuda")
    assert one["activations_per_layer"] - mem["activations_per_layer"] == \
        (4 * u + 8 * 1024 * 12 * 4 + 8 * u) // 2
