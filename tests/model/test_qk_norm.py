"""model.qk_norm against the equations written here, for both archs; the attention-logit
bound and the forward's statistics against explicit logits; the engine with qk_norm against
plain PyTorch."""
import math

import pytest
import torch
import torch.nn.functional as F
from engine_utils import ROUNDING_TOL, max_diff, run_harness, run_reference, small_cfg
from test_llama import ref_rmsnorm, ref_rope, tiny

from harness.config import ModelConfig
from harness.model import build_model, layer_group
from harness.model.gpt import CausalSelfAttention
from harness.model.llama import GQAttention


def _randomise(module):
    with torch.no_grad():  # norm weights start at 1 and biases at 0: make them matter
        for p in module.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn_like(p))


def _causal_softmax_av(q, k, v):
    t = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    return scores, scores.softmax(-1) @ v


def ref_gpt2_attention(attn, x):
    """qk-layernorm (Wortsman et al. 2023): LayerNorm over each head's d_head, weight and bias."""
    b, t, d = x.shape
    h = attn.n_head
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(d, dim=2)
    q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))

    def ln(z, mod):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        out = (z - mu) / torch.sqrt(var + 1e-5) * mod.weight
        return out if mod.bias is None else out + mod.bias

    q, k = ln(q, attn.q_norm), ln(k, attn.k_norm)
    scores, y = _causal_softmax_av(q, k, v)
    y = y.transpose(1, 2).reshape(b, t, d)
    return y @ attn.proj.weight.T + attn.proj.bias, scores


def ref_llama_attention(attn, x, n_head, n_kv, theta):
    b, t, d = x.shape
    dh = d // n_head
    q = (x @ attn.wq.weight.T).view(b, t, n_head, dh).transpose(1, 2)
    k = (x @ attn.wk.weight.T).view(b, t, n_kv, dh).transpose(1, 2)
    v = (x @ attn.wv.weight.T).view(b, t, n_kv, dh).transpose(1, 2)
    q, k = ref_rmsnorm(q, attn.q_norm.weight), ref_rmsnorm(k, attn.k_norm.weight)  # per head
    q, k = ref_rope(q, theta), ref_rope(k, theta)
    k, v = (z.repeat_interleave(n_head // n_kv, dim=1) for z in (k, v))
    scores, y = _causal_softmax_av(q, k, v)
    return y.transpose(1, 2).reshape(b, t, d) @ attn.wo.weight.T, scores


def _finite_max(scores):
    return scores.masked_fill(scores.isinf(), float("-inf")).max().item()


def test_gpt2_qk_norm_matches_the_equations():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=4, d_model=32, block_size=16, vocab_size=64,
                      qk_norm=True)
    attn = CausalSelfAttention(cfg).eval()
    _randomise(attn)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        got = attn(x)
        want, scores = ref_gpt2_attention(attn, x)
    assert (got - want).abs().max().item() <= 1e-6
    assert attn.logit_bound.item() >= _finite_max(scores) - 1e-6


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_llama_qk_norm_matches_the_equations(n_kv):
    torch.manual_seed(0)
    cfg = tiny(n_kv_head=n_kv, qk_norm=True)
    attn = GQAttention(cfg).eval()
    _randomise(attn)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        got = attn(x)
        want, scores = ref_llama_attention(attn, x, 4, n_kv, cfg.rope_theta)
    assert (got - want).abs().max().item() <= 1e-6
    assert attn.logit_bound.item() >= _finite_max(scores) - 1e-6


def test_qk_norm_parameters_are_per_head_and_grouped_with_attention():
    for arch, extra in (("gpt2", {}), ("llama", {"bias": False})):
        cfg = ModelConfig(arch=arch, n_layer=2, n_head=4, d_model=32, qk_norm=True, **extra)
        names = {n: p.shape for n, p in build_model(cfg).named_parameters() if "_norm" in n}
        assert names == {f"blocks.{i}.attn.{w}_norm.weight": torch.Size([8])
                         for i in range(2) for w in "qk"} | (
            {f"blocks.{i}.attn.q_norm.bias": torch.Size([8]) for i in range(2)}
            if arch == "gpt2" else {})  # no key bias: softmax ignores it
        assert {layer_group(n) for n in names} == {"attention"}


def test_bound_is_cauchy_schwarz_and_tight_when_queries_are_keys():
    """max_ij q_i.k_j / sqrt(d) <= max|q| max|k| / sqrt(d), with equality when k = q (the
    largest query meets itself on the diagonal, which the causal mask keeps)."""
    torch.manual_seed(1)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=64)
    attn = CausalSelfAttention(cfg).eval()
    x = torch.randn(3, 8, 16)
    with torch.no_grad():
        _, scores = ref_gpt2_attention_no_norm(attn, x)
        attn(x)
        q, k, _ = (x @ attn.qkv.weight.T + attn.qkv.bias).split(16, dim=2)
        q, k = (z.view(3, 8, 2, 8).transpose(1, 2) for z in (q, k))
        want = (q.norm(dim=-1).amax(-1) * k.norm(dim=-1).amax(-1)).max() / math.sqrt(8)
        assert attn.logit_bound.item() == pytest.approx(want.item(), rel=1e-6)
        assert attn.logit_bound.item() >= _finite_max(scores)
        attn.qkv.weight[16:32] = attn.qkv.weight[:16]  # keys = queries
        attn.qkv.bias[16:32] = attn.qkv.bias[:16]
        _, scores = ref_gpt2_attention_no_norm(attn, x)
        attn(x)
        assert attn.logit_bound.item() == pytest.approx(_finite_max(scores), rel=1e-5)


def ref_gpt2_attention_no_norm(attn, x):
    b, t, d = x.shape
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(d, dim=2)
    q, k, v = (z.view(b, t, attn.n_head, d // attn.n_head).transpose(1, 2) for z in (q, k, v))
    scores, y = _causal_softmax_av(q, k, v)
    return y, scores


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_stats_are_the_explicit_quantities(arch):
    torch.manual_seed(2)
    extra = {"bias": False, "n_kv_head": 1} if arch == "llama" else {}
    model = build_model(ModelConfig(arch=arch, n_layer=3, n_head=2, d_model=16, block_size=8,
                                    vocab_size=64, qk_norm=True, **extra))
    idx, tgt = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        logits = model(idx).view(-1, 64)
        model(idx, tgt)
    stats = model.forward_stats()
    lse = torch.logsumexp(logits, -1)
    assert stats[:3].tolist() == pytest.approx(
        [F.cross_entropy(logits, tgt.view(-1)).item(), (lse ** 2).mean().item(),
         lse.max().item()], rel=1e-6)
    assert stats[3:].tolist() == [b.attn.logit_bound.item() for b in model.blocks]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_engine_with_qk_norm_trains_like_plain_pytorch(arch):
    args = ["train.micro_batch_size=2", "train.grad_accum_steps=2", "model.qk_norm=true",
            *(["model.arch=llama", "model.n_kv_head=1"] if arch == "llama" else [])]
    params, metrics, _ = run_harness(small_cfg(*args, "zero.stage=2"))
    ref_params, ref_norms, _ = run_reference(small_cfg(*args), 2, 2)
    assert [m["optim/grad_norm_preclip"] for m in metrics] == pytest.approx(ref_norms, rel=1e-5)
    assert max_diff(params, ref_params) <= ROUNDING_TOL
    assert any("q_norm" in n for n in params)
