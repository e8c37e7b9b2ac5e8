"""fp16 pieces that run on this CPU (DeepSpeed's CPU accelerator has no fp16, so no fp16 engine
runs here): clip.value on real torch half gradients, the trainer's handling of an overflow step
and of the loss scaler's minimum-scale exception, with DeepSpeed's own DynamicLossScaler.

Unproven until a GPU runs an fp16 engine (bench/gpu_check.py): that a real DeepSpeed fp16
optimizer's gradients are the p.grad tensors clamped here, and that engine.step() on a real
overflow lowers optimizer.loss_scale as the scaler driven here does."""
import math
from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.fp16 import loss_scaler as ds_scaler
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
from deepspeed.runtime.utils import has_inf_or_nan

import harness.train.trainer as trainer_mod
from harness.common.callback import Callback
from harness.common.errors import HarnessError
from harness.train.trainer import Trainer, clip_values

FP16_MAX = torch.finfo(torch.float16).max  # 65504


def _scaler(scale=65536.0, min_scale=1.0, hysteresis=1):
    return DynamicLossScaler(init_scale=scale, scale_window=1000, min_scale=min_scale,
                             delayed_shift=hysteresis, consecutive_hysteresis=False)


def _half_grads(scale, entries):
    """Parameters whose p.grad is a real fp16 gradient: `entries` times the loss scale."""
    ps = [torch.nn.Parameter(torch.zeros(len(e), dtype=torch.float16)) for e in entries]
    for p, e in zip(ps, entries):
        p.grad = (torch.tensor(e, dtype=torch.float32) * scale).half()
    return ps


def _norm(ps, scale):  # what GradNorms reports: fp32 norm of the scaled grads / scale
    return torch.stack([p.grad.float().norm() for p in ps]).norm().item() / scale


@pytest.mark.parametrize("scale", [65536.0, 131072.0])
def test_clip_value_at_default_scale_does_not_raise_and_keeps_the_overflow(scale, monkeypatch):
    """clip.value=1 at the default initial scale 2^16: the bound 65536 is over fp16's largest
    value. The old clamp raised ("cannot be converted to type c10::Half without overflow");
    now nothing is clamped, the inf entries stay, and DeepSpeed's overflow check sees them and
    halves the scale. Unproven here: the same on a GPU engine's own fp16 gradients."""
    monkeypatch.setattr(ds_scaler.dist, "get_rank", lambda *a, **k: 0)
    ps = _half_grads(1.0, [[3.0, -2.0e4, math.inf], [-math.inf, 0.5]])
    clip_values(ps, 1.0, scale, _norm(ps, scale))
    assert ps[0].grad[2].item() == math.inf and ps[1].grad[0].item() == -math.inf
    assert ps[0].grad[1].item() == -2.0e4  # finite: nothing in fp16 exceeds the bound
    scaler = _scaler(scale)
    overflow = any(has_inf_or_nan(p.grad) for p in ps)
    scaler.update_scale(overflow)
    assert overflow and scaler.cur_scale == scale / 2


def test_clip_value_with_a_representable_bound_clamps_finite_gradients_only(monkeypatch):
    """Scale 1024, clip.value=1: bound 1024 fits fp16. A finite gradient is clamped to it; a
    gradient with +-inf is left whole (the old clamp turned inf into +-1024, so the overflow
    check saw nothing and the scale never dropped)."""
    monkeypatch.setattr(ds_scaler.dist, "get_rank", lambda *a, **k: 0)
    scale = 1024.0
    finite = _half_grads(scale, [[3.0, -2.0, 0.5], [0.25]])
    clip_values(finite, 1.0, scale, _norm(finite, scale))
    assert finite[0].grad.tolist() == [1024.0, -1024.0, 512.0]
    assert finite[1].grad.tolist() == [256.0]

    ps = _half_grads(scale, [[3.0, -2.0], [math.inf, -math.inf, 0.5]])
    norm = _norm(ps, scale)
    assert norm == math.inf
    clip_values(ps, 1.0, scale, norm)
    assert ps[0].grad.tolist() == [3072.0, -2048.0]  # untouched: the step is skipped anyway
    assert ps[1].grad[0].item() == math.inf and ps[1].grad[1].item() == -math.inf
    scaler = _scaler(scale)
    scaler.update_scale(any(has_inf_or_nan(p.grad) for p in ps))
    assert scaler.cur_scale == scale / 2


def test_clip_value_without_scale_clamps_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
        p.grad = torch.tensor([5.0, -0.5, -7.0], dtype=dtype)
        clip_values([p], 2.0, 1.0, 8.6)
        assert p.grad.tolist() == [2.0, -0.5, -2.0]


class Events(Callback):
    def __init__(self):
        self.events = []

    def on_event(self, trainer, step, event):
        self.events.append(event)


def _bare_trainer(engine, callbacks=()):
    t = Trainer.__new__(Trainer)
    t.engine, t.callbacks, t.step = engine, list(callbacks), 41
    return t


def test_min_loss_scale_exception_is_one_line_and_an_event():
    """DeepSpeed's DynamicLossScaler raises a bare Exception from inside engine.step() when an
    overflow meets the minimum scale. The trainer turns it into a `loss_scale_min` alarm event
    and one HarnessError line (exit code 2, no traceback). Unproven here: that a GPU engine's
    step() raises it the same way (ZeRO 1-3 use this scaler; fp16 at ZeRO 0 is refused)."""
    scaler = _scaler(scale=1.0, min_scale=1.0)
    engine = SimpleNamespace(step=lambda: scaler.update_scale(True), fp16_enabled=lambda: True,
                             optimizer=SimpleNamespace(loss_scale=1.0))
    rec = Events()
    t = _bare_trainer(engine, [rec])
    with pytest.raises(HarnessError) as err:
        t._engine_step({"optim/loss_scale": 1.0})
    msg = str(err.value)
    assert "\n" not in msg and "step 42" in msg and "fp16.min_loss_scale" in msg
    assert err.value.__suppress_context__
    assert [e["event"] for e in rec.events] == ["loss_scale_min"]
    assert rec.events[0]["level"] == "alarm" and rec.events[0]["step"] == 42

    def other():
        raise RuntimeError("something else")
    engine.step = other
    with pytest.raises(RuntimeError):  # any other error is not swallowed
        t._engine_step({})


class SkipEveryStep(Callback):
    def on_before_step(self, trainer, step, signals):
        trainer.skip_update = True


@pytest.mark.parametrize("overflow", [True, False])
def test_overflow_step_goes_to_engine_step_even_when_skipped(overflow, monkeypatch):
    """A monitor skip on an fp16 overflow step must not bypass engine.step(): only there does
    DeepSpeed lower the scale (bypassed, every later step overflowed at the same scale and was
    skipped for ever). A skip on a finite step still uses skip_update. Unproven here: a real
    fp16 engine's step() on that overflow."""
    calls = []
    engine = SimpleNamespace(
        step=lambda: calls.append("engine.step"), was_step_applied=lambda: not overflow,
        lr_scheduler=SimpleNamespace(step=lambda: calls.append("lr")),
        get_lr=lambda: [1e-3], fp16_enabled=lambda: True, device=torch.device("cpu"),
        optimizer=SimpleNamespace(loss_scale=65536.0))
    monkeypatch.setattr(trainer_mod, "skip_update", lambda e: calls.append("skip_update"))
    t = _bare_trainer(engine, [SkipEveryStep()])
    t.step, t.consumed_samples, t.measure_update = 0, 0, False
    t.cfg = SimpleNamespace(clip=SimpleNamespace(value=None, max_norm=1.0))
    t.plan = SimpleNamespace(batch=SimpleNamespace(global_batch=2), tokens_per_step=32,
                             seq_len=16)
    norm = math.inf if overflow else 2.0
    t._forward_backward = lambda: None
    t._reduced_scalars = lambda stats: {"train/loss": 3.0, "optim/grad_norm_preclip": norm,
                                        "optim/loss_scale": 65536.0, "optim/overflow": overflow}
    metrics = t.train_step()
    assert calls == (["engine.step", "lr"] if overflow else ["skip_update"])
    assert metrics["optim/skipped"] is True
