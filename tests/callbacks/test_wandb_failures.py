"""W&B never costs training (harness/callbacks/wandb_logger.py), with the real wandb service.

- Any exception from W&B once the run has started is one warning, W&B is off for the rest of
  the run, training and metrics.jsonl go on.
- SIGTERM to the whole job, W&B's service (`wandb-core`) included, as Slurm sends it: the
  service dies with rows it had not written (it writes in batches; the test checks it did lose
  some, or it would prove nothing), the logger starts a new one for the same run id and logs
  again exactly the rows the dead one's file lacks: the two offline files together hold every
  row of metrics.jsonl once. The 2-node Slurm version of this is in tests/slurm/test_slurm_train.py.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from engine_utils import make_data
from wandb_reader import read_run, run_files

from harness.callbacks.loggers import MetricsFile
from harness.callbacks.wandb_logger import WandbLogger
from harness.common.callback import Callback
from harness.config import load_config
from harness.config.wandb import WandbConfig
from harness.train.engine import build
from harness.train.preemption import StopSignals
from harness.train.trainer import Trainer

STEPS = 8


def service_pids() -> list[int]:
    """Running wandb-core processes this process started (its children; not the zombies of
    services an earlier test ended)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, fields = text.split("(", 1)[1].rsplit(")", 1)[0], text.rsplit(")", 1)[1].split()
        if comm.startswith("wandb-core") and fields[0] != "Z" and int(fields[1]) == os.getpid():
            pids.append(int(stat.parent.name))
    return pids


class At(Callback):
    """Runs `action(trainer)` once, at the end of step `step` (before the loggers: order 50)."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            self.action(trainer)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = load_config("tiny", [f"train.max_steps={STEPS}", "model.n_layer=2", "model.d_model=64",
                               "optim.warmup_steps=2", "train.run_dir=unused"])
    return cfg, build(cfg)


def train(built, run_dir: Path, *extra: Callback, signals=None) -> tuple[Trainer, WandbLogger]:
    cfg, b = built
    cfg.train.run_dir = str(run_dir)
    logger = WandbLogger(WandbConfig(mode="offline"))
    trainer = Trainer(cfg, b, make_data(cfg, b.plan.batch.micro_batch),
                      [MetricsFile(run_dir), logger, *extra])
    trainer.stop_signals = signals
    trainer.fit()
    return trainer, logger


def logged(run_dir: Path) -> list[dict]:
    """metrics.jsonl's step lines, as W&B rows."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{("train/step" if k == "step" else k): int(v) if isinstance(v, bool) else v
             for k, v in line.items()} for line in lines if "event" not in line]


def harness_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "harness" and r.levelname == "WARNING"]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def disk_full(trainer):
    """From now on every W&B log raises, as on a full disk."""
    logger = next(cb for cb in trainer.callbacks if isinstance(cb, WandbLogger))

    def log(row):
        raise OSError(28, "No space left on device")
    logger.run.log = log


def kill_service(trainer):
    """SIGKILL, not SIGTERM: nothing tells this rank; the next W&B call fails (a log's
    connection reset, or finish())."""
    for pid in service_pids():
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("failure, says", [(disk_full, "in log (OSError: [Errno 28] No space "
                                                       "left on device)"),
                                           (kill_service, "W&B failed in ")])
def test_a_failing_w_and_b_is_one_warning_and_training_goes_on(built, tmp_path, offline, caplog,
                                                               failure, says):
    with caplog.at_level("WARNING", logger="harness"):
        trainer, logger = train(built, tmp_path, At(3, failure))
    assert trainer.step == STEPS and logger.run is None
    warning, = harness_warnings(caplog)
    assert says in warning and "W&B is off for the rest of this run" in warning
    assert "metrics.jsonl keeps every step" in warning
    assert [r["train/step"] for r in logged(tmp_path)] == list(range(1, STEPS + 1))
    if failure is disk_full:  # the service itself lives on: its file holds the steps before
        rows = read_run(run_files(tmp_path / "wandb")[0], timeout=5).rows("train/loss")
        assert [r["train/step"] for r in rows] == [1, 2]


def test_sigterm_to_the_job_loses_no_row(built, tmp_path, offline, caplog):
    """Slurm's SIGTERM, to the service and to this rank at once, during step 5: the trainer
    finishes the step (and the next: the flag rides the next step's all-reduce), stops; the
    service is dead. Every row reaches one of the run's two offline files, once."""
    def scancel(trainer):
        pids = service_pids()
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    signals = StopSignals().install()
    try:
        with caplog.at_level("WARNING", logger="harness"):
            trainer, logger = train(built, tmp_path, At(5, scancel), signals=signals)
    finally:
        signals.uninstall()
    assert trainer.stop_reason == "signal SIGTERM" and 5 <= trainer.step < STEPS
    old, new = run_files(tmp_path / "wandb", logger.run_id)
    before, after = read_run(old, timeout=2), read_run(new)
    assert not before.complete and after.complete  # the first service died mid-run
    first = [r["train/step"] for r in before.rows("train/loss")]
    again = [r["train/step"] for r in after.rows("train/loss")]
    assert first == list(range(1, len(first) + 1)) and len(first) < 5, (
        "the killed service wrote every row before it died: this run proves nothing")
    assert sorted(first + again) == list(range(1, trainer.step + 1))  # each step once
    assert before.rows("train/loss") + after.rows("train/loss") == logged(tmp_path)
    warning, = harness_warnings(caplog)
    assert "SIGTERM reached W&B's service too" in warning
    assert f"({len(again)} rows" in warning  # all logged again after the loop
