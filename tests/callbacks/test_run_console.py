"""The console of a real `harness train` run (harness.train.run.train, in-process, the tiny
shapes of tests/trained_runs.py): the clipping count, the closing lines, the report named once,
and the closing evaluation at the last step when max_steps is not a multiple of eval_every.

One 5-step run (module fixture) feeds every test: eval_every 2 (evaluations at 2, 4 and, the
last step, 5), log_every 2 (lines at 2, 4, 5), the default clip.max_norm 1.0 (at lr 1e-2
the first steps' gradients are over it, the later ones under).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from trained_runs import BASE

from harness.callbacks.evaluator import Evaluator
from harness.config import load_config
from harness.train import run as run_mod

STEPS, EVERY, LOG_EVERY = 5, 2, 2


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def run(tmp_path_factory, shards_dir):
    run_dir = tmp_path_factory.mktemp("console_run")
    cfg = load_config("tiny", [*BASE, f"train.max_steps={STEPS}", f"data.eval_every={EVERY}",
                               f"train.log_every={LOG_EVERY}", f"train.run_dir={run_dir}",
                               f"data.out_dir={shards_dir}"])
    made, make = [], run_mod.make_trainer

    def keep(cfg):  # the trainer train() builds, kept for the reference evaluation
        made.append(make(cfg))
        return made[-1]

    out, logs, logger = io.StringIO(), _Lines(), logging.getLogger("harness")
    level = logger.level
    logger.addHandler(logs)
    logger.setLevel(logging.INFO)  # what the CLI shows (logging.basicConfig at INFO)
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
            mp.setattr(run_mod, "make_trainer", keep)
            assert run_mod.train(cfg) == 0
    finally:
        logger.removeHandler(logs)
        logger.setLevel(level)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(dir=run_dir, trainer=made[0][0], stdout=out.getvalue(),
                           logs=logs.lines, steps=[x for x in lines if "event" not in x])


def test_the_closing_eval_is_at_the_last_step(run):
    """max_steps 5, eval_every 2: evaluated at 2, 4 and 5, and the value at 5 is the final
    model's loss on the set (the Evaluator run again on the trained engine)."""
    evals = {r["step"]: r["eval/loss"] for r in run.steps if "eval/loss" in r}
    assert sorted(evals) == [2, 4, 5]
    evaluator = next(cb for cb in run.trainer.callbacks if isinstance(cb, Evaluator))
    again = evaluator.evaluate(run.trainer.engine, run.trainer.built.comm)
    assert evals[5] == pytest.approx(again, rel=1e-6)
    last = [ln for ln in run.stdout.splitlines() if ln.startswith(f"step {STEPS:>6}/")]
    assert f"eval loss {evals[5]:.4f}" in last[0] and "(step" not in last[0]


def test_clipping_is_a_count_of_the_steps_since_the_last_line(run):
    """`clipped k/n steps`: k = the steps since the previous line whose gradient was clipped,
    from metrics.jsonl's optim/clipped; never the bare clip coefficient."""
    printed = [ln for ln in run.stdout.splitlines() if ln.startswith("step ")]
    got = [tuple(map(int, re.search(r"\| clipped (\d+)/(\d+) steps \|", ln).groups()))
           for ln in printed]
    clipped = {r["step"]: bool(r["optim/clipped"]) for r in run.steps}
    want, prev = [], 0
    for step in (2, 4, 5):
        want.append((sum(clipped[s] for s in range(prev + 1, step + 1)), step - prev))
        prev = step
    assert got == want
    assert 0 < sum(k for k, _ in got) < STEPS  # some clipped, some not: both cases printed
    assert not re.search(r"\bclip [0-9.]+\b", run.stdout)


def test_closing_lines_name_the_report_once_and_eval_the_val_split(run):
    everything = run.stdout + "\n".join(run.logs)
    assert everything.count("report.png") == 1
    assert f"report: {run.dir / 'report.png'}" in run.logs  # named once written
    assert (run.dir / "report.png").is_file()
    assert f"eval: harness eval {Path(run.dir)} --split val" in run.stdout.splitlines()
    assert "HELD_OUT_TEXT" not in run.stdout
