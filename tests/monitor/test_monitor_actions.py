"""Spike monitor actions on the real tiny model, with a controlled instability: at one step
the accumulated gradients are multiplied by 1000 (or set to NaN) before the optimizer step."""
import json
import math

import pytest
import torch

from harness.common.callback import Callback
from harness.config import load_config
from harness.parallel.batch import lr_at
from harness.train.grad_norms import local_grads
from harness.train.run import MONITOR_STOP_EXIT_CODE, make_trainer, train

SPIKE = 7
BASE = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=32",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=10",
        "optim.warmup_steps=2", "monitor.warmup_steps=4", "monitor.window=8",
        "checkpoint.every=2"]


class Corrupt(Callback):
    """Runs before the monitor: corrupts this step's gradients once and re-measures them."""

    order = 0

    def __init__(self, step, how):
        self.step, self.how, self.done = step, how, False

    def on_before_step(self, trainer, step, signals):
        if step == self.step and not self.done:
            self.done = True
            for g in local_grads(trainer.engine):
                g.mul_(1000.0) if self.how == "scale" else g.fill_(float("nan"))
            sq = trainer.built.comm.reduce_scalars({"sq": trainer.norms.local_squares()})["sq"]
            signals.update(trainer.norms.signals(sq))


class Snapshots(Callback):
    """Parameters and optimizer state at the end of each step number's first run (after
    any action), and the data position then."""

    order = 95

    def __init__(self):
        self.params, self.states, self.consumed = {}, {}, {}

    def on_step_end(self, trainer, step, metrics):
        if step in self.params:
            return
        self.params[step] = {n: p.detach().clone()
                             for n, p in trainer.engine.module.named_parameters()}
        opt = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
        self.states[step] = [{k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                             for st in opt.state.values()]
        self.consumed[step] = trainer.consumed_samples


def run(tmp_path, shards_dir, action, how="scale", *extra):
    cfg = load_config("tiny", [*BASE, f"train.run_dir={tmp_path}", f"data.out_dir={shards_dir}",
                               f"monitor.action={action}", *extra])
    trainer, _ = make_trainer(cfg)
    snaps = Snapshots()
    trainer.callbacks = sorted([*trainer.callbacks, Corrupt(SPIKE, how), snaps],
                               key=lambda c: c.order)
    trainer.fit()
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return cfg, trainer, snaps, lines


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("how", ["scale", "nan"])
@pytest.mark.parametrize("stage", [0, 1])
def test_skip_leaves_parameters_and_adam_state_unchanged(tmp_path, shards_dir, how, stage):
    _, trainer, snaps, lines = run(tmp_path, shards_dir, "skip", how, f"zero.stage={stage}")
    assert _same(snaps.params[SPIKE], snaps.params[SPIKE - 1])
    for before, after in zip(snaps.states[SPIKE - 1], snaps.states[SPIKE]):
        assert _same(before, after)
    assert not _same(snaps.params[SPIKE + 1], snaps.params[SPIKE])  # training goes on
    steps = {ln["step"]: ln for ln in lines if "event" not in ln}
    assert steps[SPIKE]["optim/skipped"] is True and steps[SPIKE - 1]["optim/skipped"] is False
    events = [ln for ln in lines if ln.get("event") in ("warning", "nonfinite")]
    assert events and events[0]["step"] == SPIKE and events[0]["action"] == "skip"
    assert all(math.isfinite(p.float().sum().item())
               for p in trainer.engine.module.parameters())


def test_monitor_without_the_update_norm_makes_no_update_pass(tmp_path, shards_dir):
    _, trainer, _, lines = run(tmp_path, shards_dir, "skip", "scale",
                               "monitor.signals=[optim/grad_norm_preclip]",
                               "monitor.trend_signals=[]")
    assert not trainer.measure_update
    steps = [ln for ln in lines if "event" not in ln]
    assert len(steps) == 10 and not any("optim/update_norm" in ln for ln in steps)
    assert [ln["step"] for ln in lines if ln.get("action") == "skip"] == [SPIKE]


def test_lr_cut_scales_the_learning_rate(tmp_path, shards_dir):
    cfg, trainer, _, lines = run(tmp_path, shards_dir, "lr_cut", "scale",
                                 "monitor.act_on=[warning]", "monitor.lr_cut_steps=2",
                                 "monitor.lr_cut_factor=0.25")
    lr = {ln["step"]: ln["optim/lr"] for ln in lines if "event" not in ln}
    plan = trainer.plan
    for step in (SPIKE + 1, SPIKE + 2):  # the cut applies to the steps after the spike
        assert lr[step] == pytest.approx(0.25 * lr_at(step - 1, plan, cfg))
    assert lr[SPIKE + 3] == pytest.approx(lr_at(SPIKE + 2, plan, cfg))


def test_rollback_restores_the_checkpoint_before_the_alarm(tmp_path, shards_dir):
    # rollback follows alarms only (a grad-norm warning is refused: test_detector), so the
    # step's gradients are NaN: a non-finite alarm
    _, trainer, snaps, lines = run(tmp_path, shards_dir, "rollback", "nan",
                                   "monitor.rollback_skip_batches=3")
    saved = torch.load(_ckpt(tmp_path, SPIKE - 1), weights_only=False)["module"]
    rollback = [ln for ln in lines if ln.get("event") == "rollback"][0]
    assert rollback["to_step"] == SPIKE - 1 and rollback["from_step"] == SPIKE
    # right after the rollback: the parameters saved at step 6 and data moved past the window
    after = snaps.params[SPIKE]
    assert all(torch.equal(after[n], saved[n]) for n in after)
    assert snaps.consumed[SPIKE] == (SPIKE - 1) * 8 + 3 * 8
    assert trainer.step == 10  # and training completed afterwards


def _ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"step{step:08d}" / "ds" / "mp_rank_00_model_states.pt"


def test_stop_ends_the_run_with_exit_code_3(tmp_path, shards_dir, monkeypatch):
    import harness.train.run as run_mod

    real = run_mod.make_trainer

    def corrupted(cfg):
        trainer, ckpt = real(cfg)
        trainer.callbacks = sorted([*trainer.callbacks, Corrupt(SPIKE, "nan")],
                                   key=lambda c: c.order)
        return trainer, ckpt

    monkeypatch.setattr(run_mod, "make_trainer", corrupted)
    cfg = load_config("tiny", [*BASE, f"train.run_dir={tmp_path}", f"data.out_dir={shards_dir}",
                               "monitor.action=stop"])  # on the non-finite alarm
    assert train(cfg) == MONITOR_STOP_EXIT_CODE


def test_replay_cli_prints_one_json_line_per_event():
    import subprocess
    import sys
    from pathlib import Path

    from engine_utils import child_env

    trace = Path(__file__).parent / "spike_trace.csv"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "monitor", "replay", str(trace)],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert {"warning", "loss_spike"} <= {e["event"] for e in events}
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "monitor", "replay", "nope.csv"],
                         capture_output=True, text=True, timeout=120, env=child_env())
    assert bad.returncode == 2 and "nope.csv" in bad.stderr and "Traceback" not in bad.stderr
