"""harness.model.loss: the chunked cross-entropy against F.cross_entropy on full logits, z-loss
against its closed form, the bytes the chunked loss keeps for backward, and both on the real
DeepSpeed engine against plain PyTorch with the loss written out here."""
import pytest
import torch
import torch.nn.functional as F
from engine_utils import ROUNDING_TOL, make_data, max_diff, run_harness, run_reference, small_cfg

from harness.config import load_config
from harness.model import build_model
from harness.model.loss import ce_and_lse, chunked_loss, plain_loss
from harness.model.memory import SavedActivations, measure_step
from harness.train.engine import seed_everything


def _inputs(n=37, d=16, v=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_()
    return h, w, torch.randint(0, v, (n,), generator=g)


def ref_loss(h, w, t, z):
    """The definition: mean CE over fp32 logits + z x mean logsumexp^2."""
    logits = (h @ w.T).float()
    lse = torch.logsumexp(logits, -1)
    return F.cross_entropy(logits, t) + z * (lse ** 2).mean()


@pytest.mark.parametrize("z", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_chunked_equals_full_logits(z, chunk):
    h, w, t = _inputs()
    want = ref_loss(h, w, t, z)
    gw = torch.autograd.grad(want * 3.0, (h, w))  # an upstream gradient that is not 1
    got, stats = chunked_loss(h, w, t, z, chunk)
    gg = torch.autograd.grad(got * 3.0, (h, w))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for a, b in zip(gg, gw):
        assert (a - b).abs().max().item() <= 1e-6 * max(1.0, b.abs().max().item())
    lse = torch.logsumexp((h @ w.T).float(), -1)
    assert stats.tolist() == pytest.approx(
        [F.cross_entropy((h @ w.T).float(), t).item(), (lse ** 2).mean().item(),
         lse.max().item()], rel=1e-6)


def test_chunked_without_grad_is_the_same_number():
    h, w, t = _inputs()
    with torch.no_grad():
        a, sa = chunked_loss(h, w, t, 1e-2, 5)
    b, sb = chunked_loss(h, w, t, 1e-2, 5)
    assert a.item() == pytest.approx(b.item(), rel=1e-7) and torch.allclose(sa, sb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_with_zero_z_is_bit_for_bit_cross_entropy(dtype):
    """One log_softmax serves the loss and log Z (ce_and_lse): with z_loss = 0 the loss and the
    gradients are F.cross_entropy's exactly, from fp32 logits and from bf16 ones."""
    h, w, t = _inputs(v=2000, dtype=dtype)
    loss, _ = plain_loss(h, w, t, 0.0)
    got = torch.autograd.grad(loss, (h, w))
    want_loss = F.cross_entropy(F.linear(h, w).float(), t)
    want = torch.autograd.grad(want_loss, (h, w))
    assert torch.equal(loss, want_loss)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("scale", [3.0, 10.0])
def test_log_z_read_off_log_softmax_matches_logsumexp(scale):
    """log Z_t = logit_t[target] - log p_t[target] carries log_softmax's rounding (its
    normaliser, then two subtractions): against torch.logsumexp at the GPT-2 vocab, measured
    3.1e-7 relative at most on these inputs (5.7e-6 at log Z ~ 18), 4.4e-7 on bench_loss's
    (9e-6 at ~20); 1e-6 leaves 2.3x. The stats, and with z_loss > 0 the loss and gradients,
    stay within the tolerances the chunked loss is held to against the definition."""
    h, w, t = _inputs(n=64, v=50257)
    w = (w * scale / 4).detach().requires_grad_()  # logits of std ~scale: log Z ~ 15 to 50
    logits = (h @ w.T).detach()
    _, lse = ce_and_lse(logits, t)
    want = torch.logsumexp(logits, -1)
    assert ((lse - want).abs() / want.abs()).max().item() <= 1e-6
    loss, stats = plain_loss(h, w, t, 1e-2)
    assert stats.tolist() == pytest.approx(
        [F.cross_entropy(logits, t).item(), (want ** 2).mean().item(), want.max().item()],
        rel=1e-6)
    ref = ref_loss(h, w, t, 1e-2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        assert (a - b).abs().max().item() <= 1e-6 * max(1.0, b.abs().max().item())


def test_plain_z_loss_keeps_one_fp32_logits_buffer():
    """The z term reads log Z off the log-probabilities the CE keeps: autograd holds one fp32
    tokens x vocab buffer (a second logsumexp kept the logits too), plus h and small indices."""
    h, w, t = _inputs(n=64, v=4000)
    meter = SavedActivations([w])
    with meter:
        plain_loss(h, w, t, 1e-2)[0].backward()
    logits = 64 * 4000 * 4
    assert logits <= meter.peak <= logits + h.numel() * 4 + 4 * 64 * 8


def test_z_loss_term_and_gradient_closed_form():
    """With h = I the logits are w^T, so d loss / d w is d loss / d logits transposed:
    (softmax - onehot) / n + 2 z lse softmax / n."""
    n, z = 8, 0.05
    torch.manual_seed(1)
    w = (3 * torch.randn(20, n)).requires_grad_()  # 20-token vocab, logits of a few units
    h, t = torch.eye(n), torch.randint(0, 20, (n,))
    for fn in (lambda: plain_loss(h, w, t, z), lambda: chunked_loss(h, w, t, z, 3)):
        loss, stats = fn()
        (grad,) = torch.autograd.grad(loss, w)
        logits = w.detach().T
        lse = torch.logsumexp(logits, -1)
        assert loss.item() - stats[0].item() == pytest.approx(z * (lse ** 2).mean().item(),
                                                             rel=1e-5)
        p = logits.softmax(-1)
        want = (p - F.one_hot(t, 20) + 2 * z * lse[:, None] * p) / n
        assert (grad.T - want).abs().max().item() <= 1e-6


def test_chunked_keeps_no_logits_for_backward():
    """At a 32k vocab the saved bytes fall by the fp32 logits (tokens x vocab x 4 B), less what
    the chunked loss keeps instead: the head input's and weight's gradients."""
    cfg = load_config("tiny", ["model.vocab_size=32000", "model.n_layer=1", "model.d_model=64",
                               "model.n_head=2", "model.block_size=64"]).model
    x = torch.randint(0, 32000, (2, 64))
    peaks = {}
    for chunk in (0, 16):
        seed_everything(0)
        model = build_model(cfg)
        model.set_loss(0.0, chunk)
        peaks[chunk] = measure_step(model, x, x)["peak"]
    tokens, d, v = 2 * 64, 64, 32000
    logits = tokens * v * 4
    kept = tokens * d * 4 + v * d * 4  # grad of the head input (fp32 here) and of its weight
    assert peaks[0] - peaks[16] == pytest.approx(logits - kept, rel=0.02)


def _z_reference(z):
    def loss(model, x, y):
        return ref_loss(model.ln_f(model._blocks_forward(model.drop(
            model.wte(x) + model.wpe(torch.arange(x.shape[1]))))).view(-1, model.cfg.d_model),
            model.lm_head.weight, y.reshape(-1), z)
    return loss


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("chunk", [0, 7])
def test_engine_with_z_loss_trains_like_plain_pytorch(stage, chunk):
    args = ["train.micro_batch_size=2", "train.grad_accum_steps=2", "train.z_loss=0.01"]
    cfg = small_cfg(*args, f"zero.stage={stage}", f"train.loss_chunk_tokens={chunk}")
    params, metrics, _ = run_harness(cfg)
    ref_params, ref_norms, _ = run_reference(small_cfg(*args), 2, 2, loss_fn=_z_reference(0.01))
    assert [m["optim/grad_norm_preclip"] for m in metrics] == pytest.approx(ref_norms, rel=1e-5)
    assert max_diff(params, ref_params) <= ROUNDING_TOL
    # train/loss is the cross-entropy; train/z_loss the mean log(Z)^2 the coefficient weighs
    assert all(m["train/z_loss"] > 0 for m in metrics)
    assert metrics[0]["train/loss"] < 5.0


def test_first_step_metrics_are_the_plain_forward():
    cfg = small_cfg("train.micro_batch_size=4", "train.grad_accum_steps=1", "train.max_steps=1",
                    "optim.warmup_steps=0", "train.z_loss=0.01")
    _, metrics, _ = run_harness(cfg)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    x, y = make_data(cfg, 4).micro_batch(0, 0)
    with torch.no_grad():
        logits = model(x).float().view(-1, cfg.model.vocab_size)
    lse = torch.logsumexp(logits, -1)
    m = metrics[0]
    assert m["train/loss"] == pytest.approx(F.cross_entropy(logits, y.reshape(-1)).item(), rel=1e-6)
    assert m["train/z_loss"] == pytest.approx((lse ** 2).mean().item(), rel=1e-6)
    assert m["model/logit_lse_max"] == pytest.approx(lse.max().item(), rel=1e-6)
