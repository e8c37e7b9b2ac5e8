"""harness.train.skip_step.skip_update (the spike monitor's `skip`) on the real DeepSpeed engine, at
every ZeRO stage and precision: a NaN put into the accumulated gradient of the skipped step
changes neither the parameters nor the optimizer state, the counters and the LR schedule
advance, the next step is the one plain PyTorch takes after skipping, and the skip copies
nothing of the optimizer state."""
import math

import pytest
import torch
from engine_utils import (ROUNDING_TOL, full_params, make_data, max_diff, plain_training,
                          run_harness, small_cfg)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import harness.train.trainer as trainer_mod
from harness.common.callback import Callback
from harness.parallel.batch import lr_at
from harness.train.skip_step import skip_update

SKIP = 2  # of 3 steps (engine_utils.SMALL)
ACC = ["train.micro_batch_size=2", "train.grad_accum_steps=2"]
OFFLOAD = "zero.offload_optimizer=true"
# fp32 accumulation is refused at stage 0 under bf16
Z0_BF16 = ["train.grad_accum_dtype=bf16", "train.reduce_dtype=bf16"]
# (stage, precision, extra): torch AdamW, FP16_UnfusedOptimizer, DeepSpeedZeroOptimizer,
# BF16_Optimizer, DeepSpeedZeroOptimizer_Stage3, and ZeRO 1/2 with the optimizer offloaded
CONFIGS = [(0, "fp32", []), (0, "bf16", Z0_BF16), (1, "fp32", []), (1, "bf16", []),
           (2, "fp32", []), (2, "bf16", []), (3, "fp32", []), (3, "bf16", []),
           (1, "fp32", [OFFLOAD]), (1, "bf16", [OFFLOAD]), (2, "fp32", [OFFLOAD]),
           (2, "bf16", [OFFLOAD])]
IDS = [f"z{s}-{p}{'-offload' if x == [OFFLOAD] else ''}" for s, p, x in CONFIGS]


def _cfg(stage, precision, extra):
    # warm-up over all 3 steps: each step's learning rate differs from the others
    return small_cfg(*ACC, "optim.warmup_steps=3", f"zero.stage={stage}",
                     f"train.precision={precision}", *extra)


def _inner(engine):
    """The torch optimizer whose state holds the moments, keyed by the fp32 master tensors."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _snapshot(engine):
    params = {n: p.detach().clone() for n, p in full_params(engine)}
    state = [(master.detach().clone(),
              {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()})
             for master, st in _inner(engine).state.items()]
    return params, state


def _poison(p):
    """NaN into one element of every gradient buffer this parameter has, the real storage the
    optimizer reads included (at ZeRO 3 the partition buffer, not get_local_fp32_grad's copy)."""
    from deepspeed.utils import safe_get_full_grad

    g = safe_get_full_grad(p).detach().clone()
    g.view(-1)[0] = float("nan")
    if p.grad is not None:  # ZeRO 0; BF16_Optimizer keeps a low-precision staging gradient
        p.grad.view(-1)[0] = float("nan")
    if hasattr(p, "ds_id"):  # ZeRO 3: this rank's slice of grad_partitions_flat_buffer
        p._z3_optimizer.set_fp32_grad_for_param(g, p)
    elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO 1/2 and BF16_Optimizer
        p.set_full_hp_grad(g)
    assert torch.isnan(safe_get_full_grad(p)).any()


class PoisonAndSkip(Callback):
    """At step SKIP: snapshot, poison one gradient, skip (or not, as a control); snapshot
    again at the end of that step and once more at the end of the run."""

    order = 0

    def __init__(self, skip=True):
        self.skip = skip
        self.before = self.after = self.final = None

    def on_before_step(self, trainer, step, signals):
        if step == SKIP:
            self.before = _snapshot(trainer.engine)
            _poison(next(trainer.engine.module.parameters()))
            trainer.skip_update = self.skip

    def on_step_end(self, trainer, step, metrics):
        if step == SKIP:
            self.after = _snapshot(trainer.engine)
            self.skipped_steps = trainer.engine.skipped_steps
        if step == trainer.cfg.train.max_steps:
            self.final = _snapshot(trainer.engine)


def _assert_identical(before, after):
    (p0, s0), (p1, s1) = before, after
    assert p0.keys() == p1.keys() and all(torch.equal(p0[n], p1[n]) for n in p0)
    assert len(s0) == len(s1) > 0
    for (m0, st0), (m1, st1) in zip(s0, s1):
        assert torch.equal(m0, m1)  # the fp32 master (the parameter itself at ZeRO 0 fp32)
        assert st0.keys() == st1.keys() >= {"step", "exp_avg", "exp_avg_sq"}
        for k in st0:
            same = torch.equal(st0[k], st1[k]) if torch.is_tensor(st0[k]) else st0[k] == st1[k]
            assert same, k


class _Watch(TorchDispatchMode):
    """Every aten op in the block: which watched storages it touched, how many bytes of new
    storage it made."""

    def __init__(self, watched):
        super().__init__()
        self.watched, self.touched, self.allocated = watched, set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ins = {_ptr(t) for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
        self.touched |= ins & self.watched
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t) and _ptr(t) not in ins:
                self.allocated += t.untyped_storage().nbytes()
        return out


def _ptr(t):
    return t.untyped_storage().data_ptr()


def _reference_skipping(cfg, micro, accum):
    """Plain PyTorch (engine_utils.run_reference's arithmetic) that at step SKIP computes the
    gradient, then drops it: the LR scheduler advances, the optimizer does not step."""
    model, opt, sched = plain_training(cfg)
    data = make_data(cfg, micro)
    for step in range(cfg.train.max_steps):
        for k in range(accum):
            x, y = data.micro_batch(step * micro * accum, k)
            (model(x, y) / accum).backward()
        if step + 1 != SKIP:
            if cfg.clip.max_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.clip.max_norm)
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return dict(model.named_parameters())


@pytest.mark.parametrize("stage,precision,extra", CONFIGS, ids=IDS)
def test_skip_drops_a_nan_update_and_advances_the_schedule(stage, precision, extra, monkeypatch):
    watches = []

    def watched_skip(engine):  # the real skip_update, with every aten op it runs recorded
        opt = _inner(engine)
        state = [*opt.state, *(v for st in opt.state.values() for v in st.values()
                               if torch.is_tensor(v))]
        watch = _Watch({_ptr(t) for t in state} - {0})
        watches.append((watch, sum(t.untyped_storage().nbytes() for t in state)))
        with watch:
            skip_update(engine)

    monkeypatch.setattr(trainer_mod, "skip_update", watched_skip)
    cfg = _cfg(stage, precision, extra)
    cb = PoisonAndSkip()
    params, metrics, built = run_harness(cfg, callbacks=[cb])
    engine, plan = built.engine, built.plan

    # parameters, fp32 masters, moments and step counts: bit-identical across the skipped step
    _assert_identical(cb.before, cb.after)
    # no copy of the optimizer state: the skip neither reads nor writes any of it, and makes
    # less new storage than a tenth of it (ours makes none)
    (watch, state_bytes), = watches
    assert not watch.touched
    assert watch.allocated < state_bytes / 10, (watch.allocated, state_bytes)
    # DeepSpeed's counters and the LR schedule advance as for a taken step
    assert [m["optim/skipped"] for m in metrics] == [False, True, False]
    assert engine.global_steps == 3 and engine.global_samples == 3 * plan.batch.global_batch
    assert engine.skipped_steps == 1 and engine.lr_scheduler.last_epoch == 3
    lrs = [lr_at(s, plan, cfg) for s in range(4)]
    assert len(set(lrs[:3])) == 3
    assert [m["optim/lr"] for m in metrics] + engine.get_lr()[:1] == pytest.approx(lrs)
    # and training goes on: finite loss, finite parameters that moved at step 3
    assert math.isfinite(metrics[-1]["train/loss"])
    assert all(torch.isfinite(p).all() for p in params.values())
    assert max_diff(cb.final[0], cb.after[0]) > 0
    if precision == "fp32":  # the step after the skip is plain PyTorch's after skipping
        assert max_diff(params, _reference_skipping(cfg, 2, 2)) <= ROUNDING_TOL


@pytest.mark.parametrize("stage,precision,extra", CONFIGS, ids=IDS)
def test_control_the_poison_reaches_the_optimizer(stage, precision, extra):
    """Without the skip, engine.step() sees the NaN: DeepSpeed drops the step itself (an
    invalid gradient norm) or, at ZeRO 0 in fp32, the NaN reaches the weights. So the poison
    above sits where the optimizer reads, and the skip test is not vacuous."""
    cb = PoisonAndSkip(skip=False)
    run_harness(_cfg(stage, precision, extra), callbacks=[cb])
    nan_params = any(torch.isnan(p).any() for p in cb.after[0].values())
    assert cb.skipped_steps == 1 or nan_params
