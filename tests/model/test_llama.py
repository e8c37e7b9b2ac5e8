"""model.arch=llama (harness/model/llama.py): the block against a reference written here from the
equations, GQA head sharing, the real DeepSpeed engine with activation checkpointing, the
planner's counts and FLOPs."""
import math

import pytest
import torch
from engine_utils import ROUNDING_TOL, make_data, max_diff, run_harness, run_reference, small_cfg

from harness.config import ModelConfig, load_config
from harness.config.model import ffn_hidden
from harness.model import build_model, count_params, layer_group
from harness.model.flops import flops_per_token
from harness.model.gpt import GPT
from harness.model.llama import Llama
from harness.plan import planner
from harness.train.engine import build, seed_everything

LLAMA = ["model.arch=llama", "model.n_kv_head=1"]  # SMALL has 2 query heads: shared by both
AC = "activation_checkpointing"


def tiny(**kw) -> ModelConfig:
    base = {"arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32,
            "block_size": 16, "vocab_size": 64, "rope_theta": 10000.0}
    return ModelConfig(**{**base, **kw})


# ---- the reference: the equations, nothing from harness.model.llama --------------------------------
def ref_rmsnorm(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_rope(x, theta):
    """x (b, h, t, d): at position p, pair (x_i, x_{i+d/2}) rotated by p * theta^(-2i/d)."""
    t, d = x.shape[-2:]
    out = torch.empty_like(x)
    for p in range(t):
        for i in range(d // 2):
            a = p * theta ** (-2 * i / d)
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[:, :, p, i], x[:, :, p, i + d // 2]
            out[:, :, p, i] = x1 * c - x2 * s
            out[:, :, p, i + d // 2] = x1 * s + x2 * c
    return out


def ref_attention(x, w, n_head, n_kv, theta):
    b, t, d = x.shape
    dh = d // n_head
    q = (x @ w["wq"].T).view(b, t, n_head, dh).transpose(1, 2)
    k = (x @ w["wk"].T).view(b, t, n_kv, dh).transpose(1, 2)
    v = (x @ w["wv"].T).view(b, t, n_kv, dh).transpose(1, 2)
    q, k = ref_rope(q, theta), ref_rope(k, theta)
    k = k.repeat_interleave(n_head // n_kv, dim=1)  # query head h reads kv head h // group
    v = v.repeat_interleave(n_head // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    return y @ w["wo"].T


def ref_swiglu(x, w):
    gate = x @ w["w1"].T
    return (gate * torch.sigmoid(gate) * (x @ w["w3"].T)) @ w["w2"].T


def ref_logits(model, idx):
    cfg = model.cfg
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = sd["wte.weight"][idx]
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        attn = {n: sd[p + f"attn.{n}.weight"] for n in ("wq", "wk", "wv", "wo")}
        mlp = {n: sd[p + f"mlp.{n}.weight"] for n in ("w1", "w2", "w3")}
        x = x + ref_attention(ref_rmsnorm(x, sd[p + "ln_1.weight"]), attn, cfg.n_head,
                              cfg.n_kv_head or cfg.n_head, cfg.rope_theta)
        x = x + ref_swiglu(ref_rmsnorm(x, sd[p + "ln_2.weight"]), mlp)
    return ref_rmsnorm(x, sd["ln_f.weight"]) @ sd["lm_head.weight"].T


def _randomise_norms(model):
    with torch.no_grad():  # RMSNorm weights start at 1: make them matter
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn_like(p))


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1}, {"n_kv_head": None},
                                {"tie_embeddings": False}, {"rope_theta": 500.0},
                                {"ffn_hidden": 48}])
def test_logits_match_the_equations(kw):
    torch.manual_seed(0)
    model = Llama(tiny(**kw)).eval()
    _randomise_norms(model)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        got, want = model(idx), ref_logits(model, idx)
    assert (got - want).abs().max().item() <= 1e-6
    targets = torch.randint(0, 64, (2, 16))
    loss = torch.nn.functional.cross_entropy(want.view(-1, 64), targets.view(-1))
    assert model(idx, targets).item() == pytest.approx(loss.item(), abs=1e-6)


def test_rope_at_a_few_positions():
    from harness.model.llama import apply_rope, rope_tables

    x = torch.randn(1, 1, 9, 8)
    cos, sin = rope_tables(9, 8, 10000.0)
    got = apply_rope(x, cos, sin)
    for p in (0, 1, 5, 8):
        for i in range(4):
            a = p * 10000.0 ** (-i / 4)
            rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            want = rot @ torch.stack([x[0, 0, p, i], x[0, 0, p, i + 4]])
            assert torch.allclose(torch.stack([got[0, 0, p, i], got[0, 0, p, i + 4]]), want,
                                  atol=1e-6)
    assert torch.equal(got[..., 0, :], x[..., 0, :])  # position 0 is not rotated
    # relative: <R_p q, R_s k> depends on p - s only
    q, k = torch.randn(8), torch.randn(8)
    seq_q, seq_k = q.expand(1, 1, 9, 8), k.expand(1, 1, 9, 8)
    rq, rk = apply_rope(seq_q, cos, sin)[0, 0], apply_rope(seq_k, cos, sin)[0, 0]
    assert (rq[5] @ rk[3]).item() == pytest.approx((rq[4] @ rk[2]).item(), abs=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model is the MHA model whose key/value heads are copies, in repeat_interleave
    order (query head h uses kv head h // (n_head / n_kv_head))."""
    torch.manual_seed(0)
    gqa = Llama(tiny(n_kv_head=2)).eval()
    mha = Llama(tiny(n_kv_head=None)).eval()
    sd = gqa.state_dict()
    for n, v in list(sd.items()):
        if n.endswith(("attn.wk.weight", "attn.wv.weight")):  # (2 heads x 8, 32) -> (4 x 8, 32)
            sd[n] = v.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (gqa(idx) - mha(idx)).abs().max().item() <= 1e-6


def test_names_group_and_ffn_rounding():
    model = Llama(tiny(tie_embeddings=False))
    groups = {n: layer_group(n) for n, _ in model.named_parameters()}
    assert groups["wte.weight"] == "embeddings" and groups["lm_head.weight"] == "head"
    assert groups["blocks.0.attn.wk.weight"] == "attention"
    assert groups["blocks.1.mlp.w3.weight"] == "mlp"
    assert {groups["blocks.0.ln_1.weight"], groups["ln_f.weight"]} == {"norms"}
    tied = Llama(tiny())
    assert tied.lm_head.weight is tied.wte.weight
    assert "lm_head.weight" not in dict(tied.named_parameters())
    assert not any(n.endswith("bias") for n, _ in tied.named_parameters())
    # Llama's rounding: int(8 d / 3) up to a multiple of 256 (Llama 2 7B: 11008)
    assert [ffn_hidden(tiny(d_model=d)) for d in (32, 128, 768, 4096)] == [256, 512, 2048, 11008]


def test_gpt2_is_unchanged():
    """GPT-2's logits pinned from a fixed seed (fp32, CPU): a change to its math fails this.
    Recorded at the commit that added llama (torch 2.13 CPU; 1 and 2 threads agree to every
    printed digit). Sensitivity: GELU's tanh approximation moves the sum by 7e-3, attention
    without its 1/sqrt(d_head) scale by 5.6, non-causal attention by 6.4; the bounds (1e-3 on
    sums of 16,384 logits, 1e-4 on single logits) leave room for float reordering only. A new
    torch whose RNG or init draws differently fails it too: re-pin after checking why."""
    cfg = load_config("tiny").model
    assert cfg.arch == "gpt2"
    seed_everything(1)
    model = build_model(cfg).eval()
    assert type(model) is GPT
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(idx).double()
        loss = model(idx, targets).item()
    assert logits.shape == (2, 16, 512)
    assert logits.sum().item() == pytest.approx(76.42746, abs=1e-3)
    assert (logits ** 2).sum().item() == pytest.approx(850.00243, abs=1e-3)
    assert logits[0, 0, :4].tolist() == pytest.approx([0.1276, 0.0064, -0.1780, -0.1446],
                                                      abs=1e-4)
    assert logits[1, -1, -4:].tolist() == pytest.approx([-0.1545, -0.2615, -0.2565, -0.0680],
                                                       abs=1e-4)
    assert loss == pytest.approx(6.276089, abs=1e-5)


# ---- the real engine ------------------------------------------------------------------------
def _grads(policy, *extra):
    cfg = small_cfg(*LLAMA, "model.n_layer=4", "model.dropout=0.1", "train.micro_batch_size=4",
                    "train.grad_accum_steps=1", f"{AC}.policy={policy}", *extra)
    built = build(cfg)
    assert type(built.engine.module) is Llama
    model = built.engine.module
    x, y = make_data(cfg, 4).micro_batch(0, 0)
    torch.manual_seed(7)  # same dropout masks; DeepSpeed restores the RNG for the recompute
    model(x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", ["every_layer", "attention", "mlp"])
def test_checkpointed_gradients_equal_plain(policy):
    plain = _grads("none")
    grads = _grads(policy)
    for name, g in plain.items():
        assert torch.equal(grads[name], g), name


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("policy", ["every_layer", "attention"])
def test_engine_trains_three_steps_like_plain_pytorch(stage, policy):
    cfg = small_cfg(*LLAMA, "train.micro_batch_size=2", "train.grad_accum_steps=2",
                    f"zero.stage={stage}", f"{AC}.policy={policy}")
    params, metrics, _ = run_harness(cfg)
    ref_params, ref_norms, _ = run_reference(small_cfg(*LLAMA, "train.micro_batch_size=2",
                                                       "train.grad_accum_steps=2"), 2, 2)
    assert len(metrics) == 3
    assert [m["optim/grad_norm_preclip"] for m in metrics] == pytest.approx(ref_norms, rel=1e-5)
    assert max_diff(params, ref_params) <= ROUNDING_TOL


# ---- planner and FLOPs ----------------------------------------------------------------------
def test_planner_counts_and_flops_for_llama_1b():
    cfg = load_config("llama-1b")
    counts = planner.param_counts(cfg)
    d, kv, f, L, V = 2048, 8 * 64, 8192, 16, 32000
    block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    assert counts == {"total": V * d + L * block + d, "block": block,
                      "attention": 2 * d * d + 2 * d * kv + d, "mlp": 3 * d * f + d,
                      "tp_sharded": L * (block - 2 * d)}  # wq wk wv wo w1 w2 w3: all but the RMSNorms
    assert counts["total"] == 1_038_682_112
    assert flops_per_token(cfg.model, counts["total"]) == 6 * counts["total"] + 12 * L * d * 2048
    untied = load_config("llama-1b", ["model.tie_embeddings=false"])
    n = planner.param_counts(untied)["total"]
    assert n == counts["total"] + V * d
    assert flops_per_token(untied.model, n) == flops_per_token(cfg.model, counts["total"])
    mem = planner.predict_memory(cfg, 8, device="cuda")
    assert mem["n_params"] == counts["total"]


def test_planner_predicts_tiny_llama():
    cfg = load_config("tiny-llama")
    mem = planner.predict_memory(cfg, 1, device="cpu")
    assert mem["n_params"] == count_params(build_model(cfg.model)) == 1_049_728
    assert mem["peak"] > 0
