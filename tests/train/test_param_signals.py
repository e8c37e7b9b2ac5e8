"""The parameter signals of the update-norm pass (harness.train.grad_norms.update_metrics) against
plain PyTorch: a callback copies the full parameters before each step and measures them.

- optim/param_norm = ||theta|| after the step;
- update_ratio/<group> = ||delta theta_group|| / ||theta_group|| per layer group (ZeRO 0-2);
- optim/param_jump = the largest relative change of a group's ||theta|| between the end of one
  step and the start of the next: 0 up to rounding, the corruption's size when a callback
  rescales one layer's weights between steps (silent corruption: loss and gradients barely
  move, the parameter norm jumps);
- monitor.update_sample < 1 estimates the norms from a fixed subset of coordinates: its error.
"""
import pytest
import torch
from engine_utils import full_params, run_harness, small_cfg

from harness.common.callback import Callback
from harness.model import layer_group


class Measured(Callback):
    """Per step: the parameters just before the update and right after it, per layer group."""

    order = 50

    def __init__(self, corrupt_at: int = -1, factor: float = 1.0):
        self.before, self.after, self.corrupt_at, self.factor = [], [], corrupt_at, factor

    def _groups(self, trainer) -> dict[str, torch.Tensor]:
        out: dict[str, list] = {}
        for n, p in full_params(trainer.engine):
            out.setdefault(layer_group(n), []).append(p.detach().float().flatten().clone())
        return {g: torch.cat(ts) for g, ts in out.items()}

    def on_before_step(self, trainer, step, signals):
        self.before.append(self._groups(trainer))

    def on_step_end(self, trainer, step, metrics):
        self.after.append(self._groups(trainer))
        if step + 1 == self.corrupt_at:  # between two steps, outside the optimizer
            with torch.no_grad():
                for p in trainer.engine.module.blocks[0].mlp.parameters():
                    p.mul_(self.factor)


def _norm(groups: dict[str, torch.Tensor]) -> float:
    return float(torch.cat(list(groups.values())).norm())


def test_param_norm_group_ratios_and_no_jump_match_plain_pytorch():
    m = Measured()
    cfg = small_cfg("train.max_steps=4", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                     "monitor.update_sample=1")
    _, metrics, _ = run_harness(cfg, callbacks=[m])
    for row, before, after in zip(metrics, m.before, m.after):
        assert row["optim/param_norm"] == pytest.approx(_norm(after), rel=1e-5)
        for g in before:
            ratio = float((after[g] - before[g]).norm() / before[g].norm())
            assert row[f"update_ratio/{g}"] == pytest.approx(ratio, rel=1e-4), g
    assert metrics[0]["optim/param_jump"] == 0.0  # nothing to compare the first step with
    assert all(row["optim/param_jump"] < 1e-6 for row in metrics[1:])  # measured ~1e-8


def test_one_layer_rescaled_between_steps_is_a_param_jump():
    m = Measured(corrupt_at=3, factor=1.05)
    cfg = small_cfg("train.max_steps=4", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                     "monitor.update_sample=1")
    _, metrics, _ = run_harness(cfg, callbacks=[m])
    # the jump of the mlp group, from the parameters at the end of step 2 and the start of 3
    end2, start3 = m.after[1]["mlp"], m.before[2]["mlp"]
    expected = float(start3.norm() / end2.norm() - 1)
    assert metrics[2]["optim/param_jump"] == pytest.approx(expected, rel=1e-3)
    assert expected > 0.01  # (a share of the group's norm: block 0 of 2 layers)
    assert metrics[3]["optim/param_jump"] < 1e-6  # one jump, then quiet again


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_flat_partitions_are_read_whole(stage):
    """ZeRO 1/2 read their flat partitions fragment by fragment (DeepSpeed's _hp_mapping): the
    per-group ratios of plain PyTorch; ZeRO 3's partitions mix the groups: global signals only."""
    cfg = small_cfg("train.max_steps=3", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                    f"zero.stage={stage}", "monitor.update_sample=0.0625")
    m = Measured()
    _, metrics, _ = run_harness(cfg, callbacks=[m])
    for row, before, after in zip(metrics, m.before, m.after):
        # flat partitions are read whole whatever update_sample says: exact
        assert row["optim/param_norm"] == pytest.approx(_norm(after), rel=1e-5)
        ratios = {k for k in row if k.startswith("update_ratio/")}
        if stage == 3:
            assert not ratios
            continue
        assert ratios == {f"update_ratio/{g}" for g in before}
        for g in before:
            ratio = float((after[g] - before[g]).norm() / before[g].norm())
            assert row[f"update_ratio/{g}"] == pytest.approx(ratio, rel=1e-4), g
    assert all(row["optim/param_jump"] < 1e-6 for row in metrics[1:])


def test_sampled_update_norm_is_close_to_the_exact_one():
    """The tiny preset's width (its tensors are large enough to be sampled): 1/16 of the
    coordinates vs all of them, the same training run (the pass only reads the state)."""
    base = ["model.d_model=128", "model.n_head=4", "model.block_size=32",
            "model.vocab_size=512", "train.max_steps=8", "optim.lr=3e-3",
            "train.micro_batch_size=2", "train.grad_accum_steps=2"]
    _, exact, _ = run_harness(small_cfg(*base, "monitor.update_sample=1"))
    _, est, _ = run_harness(small_cfg(*base, "monitor.update_sample=0.0625"))
    assert [r["train/loss"] for r in exact] == [r["train/loss"] for r in est]
    errs = [abs(e["optim/update_norm"] / x["optim/update_norm"] - 1) for e, x in zip(est, exact)]
    errs_p = [abs(e["optim/param_norm"] / x["optim/param_norm"] - 1) for e, x in zip(est, exact)]
    print(f"sampled 1/16: update norm error max {max(errs):.2%}, param norm {max(errs_p):.2%}")
    assert max(errs) < 0.05 and max(errs_p) < 0.02
    assert all(r["optim/param_jump"] < 1e-6 for r in est[1:])  # same coordinates: still exact
