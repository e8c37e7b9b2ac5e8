"""Gradient clipping: the reported pre-clip norm and the applied update match plain PyTorch."""
import pytest
import torch
from engine_utils import (ROUNDING_TOL, max_diff, precision_args, run_harness, run_reference,
                          small_cfg)

from harness.train.engine import build

ACC = ["train.micro_batch_size=2", "train.grad_accum_steps=2"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("max_norm", [1.0, 1e-3])
def test_preclip_norm_and_update_match_reference(stage, max_norm):
    cfg = small_cfg(*ACC, f"zero.stage={stage}", f"clip.max_norm={max_norm}")
    params, metrics, _ = run_harness(cfg)
    ref_params, ref_norms, _ = run_reference(cfg, 2, 2)
    norms = [m["optim/grad_norm_preclip"] for m in metrics]
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert max_diff(params, ref_params) <= ROUNDING_TOL
    if max_norm == 1e-3:  # every step clipped, and the metrics say so
        assert all(m["optim/clipped"] for m in metrics)
        assert [m["optim/clip_coef"] for m in metrics] == pytest.approx(
            [max_norm / (n + 1e-6) for n in ref_norms])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_bf16_preclip_norm_matches_fp32_reference(stage):
    cfg = small_cfg(*ACC, *precision_args(stage, "bf16"))
    _, metrics, _ = run_harness(cfg)
    _, ref_norms, _ = run_reference(small_cfg(*ACC), 2, 2)
    # first step: same weights, bf16 activations: within bf16's unit roundoff (2^-9; was 5%).
    # Measured on the sampler's computed order: 6.5e-4 at ZeRO 1 and 2 (fp32 sums), 8.0e-4 at
    # ZeRO 0 (bf16 sums); on the stored permutation's first batch 1.1e-4 and 2.6e-4: bounds
    # fitted to one batch's measurement failed on the next batch
    assert metrics[0]["optim/grad_norm_preclip"] == pytest.approx(ref_norms[0], rel=2**-9)


class OneVector(torch.nn.Module):
    """loss = <w, g> so that the gradient is exactly g."""

    def __init__(self, g):
        super().__init__()
        self.g = torch.tensor(g)
        self.w = torch.nn.Parameter(torch.zeros(len(g)))

    def forward(self, x, y=None):
        return (self.w * self.g).sum() + 0 * x.sum()

    def set_checkpointing(self, *args):
        pass

    def set_loss(self, *args):
        pass


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_worked_example_clips_to_max_norm_keeping_direction(stage, monkeypatch):
    """g = [3, 4, 0, 0, -12], C = 10: norm 13, scale 10/13, direction kept."""
    import harness.train.engine as engine_mod

    g = [3.0, 4.0, 0.0, 0.0, -12.0]
    monkeypatch.setattr(engine_mod, "build_model", lambda _cfg: OneVector(g))
    cfg = small_cfg("train.micro_batch_size=1", "train.grad_accum_steps=1",
                    f"zero.stage={stage}", "clip.max_norm=10", "optim.weight_decay=0")
    built = build(cfg)
    seen = []
    inner = getattr(built.engine.optimizer, "optimizer", built.engine.optimizer)
    inner.register_step_pre_hook(
        lambda opt, *_: seen.append(torch.cat([p.grad.flatten() for grp in opt.param_groups
                                               for p in grp["params"] if p.grad is not None])))
    loss = built.engine(torch.zeros(1, 1))
    built.engine.backward(loss)
    built.engine.step()
    flat = seen[0].double()  # ZeRO's flat partition is padded for alignment: zeros at the end
    assert flat[len(g):].abs().sum().item() == 0.0
    clipped, original = flat[:len(g)], torch.tensor(g, dtype=torch.float64)
    assert original.norm().item() == 13.0
    assert clipped.norm().item() == pytest.approx(10.0, rel=1e-6)
    assert torch.nn.functional.cosine_similarity(clipped, original, dim=0).item() == pytest.approx(1.0)
    assert clipped.tolist() == pytest.approx((original * 10 / 13).tolist(), rel=1e-6)


def test_value_clipping_matches_clip_grad_value():
    cfg = small_cfg(*ACC, "clip.value=1e-3", "clip.max_norm=0")
    params, metrics, _ = run_harness(cfg)
    ref = _reference_value_clip(cfg, 1e-3)
    assert max_diff(params, ref) <= 1e-6


def _reference_value_clip(cfg, value):
    import engine_utils as eu

    model, opt, sched = eu.plain_training(cfg)
    data = eu.make_data(cfg, 2)
    for step in range(cfg.train.max_steps):
        for k in range(2):
            x, y = data.micro_batch(step * 4, k)
            (model(x, y) / 2).backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), value)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return dict(model.named_parameters())
