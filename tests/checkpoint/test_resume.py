"""Checkpoints resume bit-identically in one process: after a clean stop (ZeRO 0 and 1), after
SIGUSR1 / SIGTERM (save, exit for requeue) and Ctrl-C; resume refuses other data or another model
shape. Elsewhere: kill -9 at random moments in tests/checkpoint/test_kill9.py; resuming on fewer or
more ranks in tests/parallel/test_distributed.py and tests/checkpoint/test_reshard.py."""
import os
import signal

import pytest
from engine_utils import final_params, max_diff

from harness.checkpoint.checkpointer import complete_checkpoints
from harness.common.callback import Callback
from harness.config import load_config
from harness.train.preemption import REQUEUE_EXIT_CODE
from harness.train.run import train

TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=32",
        "model.dropout=0.1", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.max_steps=6", "optim.warmup_steps=2", "checkpoint.every=2", "data.eval_every=0"]


def cfg_for(run_dir, shards_dir, *extra):
    return load_config("tiny", [*TINY, f"train.run_dir={run_dir}", f"data.out_dir={shards_dir}",
                                *extra])


class SignalAt(Callback):
    order = 0

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards_dir):
    return final_params(cfg_for(tmp_path_factory.mktemp("whole"), shards_dir))


@pytest.mark.parametrize("stage", [0, 1])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, shards_dir, uninterrupted, stage):
    if stage:
        uninterrupted = final_params(cfg_for(tmp_path / "whole", shards_dir, f"zero.stage={stage}"))
    cfg = cfg_for(tmp_path / "run", shards_dir, f"zero.stage={stage}")
    final_params(cfg, stop_at=3)  # saves at 2 and when the loop ends (3)
    resumed = final_params(cfg)
    assert max_diff(resumed, uninterrupted) == 0.0


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_and_exits_for_requeue(tmp_path, shards_dir, uninterrupted, monkeypatch, signum):
    import harness.train.run as run_mod

    made = {}
    real = run_mod.make_trainer

    def with_signal(cfg):
        trainer, ckpt = real(cfg)
        trainer.callbacks.insert(0, SignalAt(3, signum))
        made["trainer"] = trainer
        return trainer, ckpt

    monkeypatch.setattr(run_mod, "make_trainer", with_signal)
    cfg = cfg_for(tmp_path, shards_dir)
    assert train(cfg) == REQUEUE_EXIT_CODE
    # sent after step 3's all-reduce: every rank learns of it in step 4's (the flag rides in
    # the step's one packed all-reduce), finishes that step, saves and stops
    assert made["trainer"].step == 4
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")][-1] == "step00000004"
    monkeypatch.setattr(run_mod, "make_trainer", real)
    assert max_diff(final_params(cfg), uninterrupted) == 0.0


def test_ctrl_c_saves_and_exits_with_the_interrupt_code(tmp_path, shards_dir, uninterrupted,
                                                        monkeypatch, capsys):
    """SIGINT stops like TERM (finish the step, save) but exits 130, not the requeue code; the
    handler it leaves behind ends the process at a second Ctrl-C, and train() restores
    Python's own when it returns."""
    import harness.train.run as run_mod
    from harness.train.preemption import INTERRUPT_EXIT_CODE

    seen = {}
    real = run_mod.make_trainer

    class Probe(Callback):
        def on_train_end(self, trainer):  # after the stop, before the save's end
            seen["handler"] = signal.getsignal(signal.SIGINT)

    def with_ctrl_c(cfg):
        trainer, ckpt = real(cfg)
        trainer.callbacks[:0] = [SignalAt(3, signal.SIGINT), Probe()]
        seen["trainer"] = trainer
        return trainer, ckpt

    monkeypatch.setattr(run_mod, "make_trainer", with_ctrl_c)
    cfg = cfg_for(tmp_path, shards_dir)
    # Python's own handler, or SIG_IGN where the shell started the tests in the background
    before = signal.getsignal(signal.SIGINT)
    assert train(cfg) == INTERRUPT_EXIT_CODE == 130 != REQUEUE_EXIT_CODE
    assert seen["trainer"].step == 4 and seen["handler"] == signal.SIG_DFL
    assert "press Ctrl-C again to abort at once" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")][-1] == "step00000004"
    monkeypatch.setattr(run_mod, "make_trainer", real)
    assert max_diff(final_params(cfg), uninterrupted) == 0.0


def test_metrics_after_resume_have_each_step_once(tmp_path, shards_dir):
    import json

    cfg = cfg_for(tmp_path, shards_dir, "checkpoint.every=0")
    final_params(cfg, stop_at=3)
    final_params(cfg)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_other_data(tmp_path, shards_dir, tmp_path_factory):
    from harness.common.errors import HarnessError
    from harness.config.data import DataConfig
    from harness.data.prepare import prepare_data

    final_params(cfg_for(tmp_path, shards_dir), stop_at=2)
    text = tmp_path_factory.mktemp("text") / "words.txt"
    text.write_text(" ".join(f"word{i % 97} line{i % 13}\n" for i in range(20_000)))
    other = text.parent / "shards"
    prepare_data(DataConfig(sources=[str(text)], out_dir=str(other), vocab_size=300,
                            val_fraction=0.0), progress=False)
    with pytest.raises(HarnessError, match="fingerprint"):
        final_params(cfg_for(tmp_path, other))


def test_resume_refuses_another_model_shape(tmp_path, shards_dir):
    from harness.common.errors import HarnessError

    final_params(cfg_for(tmp_path, shards_dir), stop_at=2)
    with pytest.raises(HarnessError, match="model.d_model=32, not 64"):
        final_params(cfg_for(tmp_path, shards_dir, "model.d_model=64"))
