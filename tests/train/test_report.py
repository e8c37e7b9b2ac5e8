"""report.png's panels and the summary's eval loss, from a metrics.jsonl written here in the
format of `harness train` (the real run's report: tests/callbacks/test_wandb.py and
test_run_console.py): every curve drawn is the metrics file's own numbers."""
from __future__ import annotations

import json
import math

import matplotlib.image
import pytest

from harness.train.report import _figure, format_summary, read_metrics, summary, write_report

EVALS = {10: 5.2, 20: 4.8, 25: 4.75}  # every 10 steps, and at the last step (25)


def _lr(step: int) -> float:  # warm-up 5 steps, cosine to 0 at 25
    return 1e-3 * step / 5 if step < 5 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 5) / 20))


@pytest.fixture
def run_dir(tmp_path):
    rows = []
    for step in range(1, 26):
        row = {"step": step, "train/loss": 6 - 0.05 * step, "optim/grad_norm_preclip": 1.5 / step,
               "optim/clipped": step < 2, "train/tokens_seen": 64 * step,
               "throughput/tokens_per_s": 1000.0, "optim/lr": _lr(step)}
        if step in EVALS:
            row["eval/loss"] = EVALS[step]
        rows.append(json.dumps(row))
    rows.insert(12, json.dumps({"step": 12, "event": "grad_spike", "signal": "train/loss"}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path


def _line(ax, label):
    return next(ln for ln in ax.get_lines() if ln.get_label() == label)


def test_report_draws_eval_loss_with_the_loss_and_an_lr_panel(run_dir):
    rows, events = read_metrics(run_dir)
    fig = _figure(run_dir, rows, events, "text")
    ax_loss, ax_norm, ax_lr = fig.axes
    assert ax_lr.get_ylabel() == "learning rate" and ax_lr.get_xlabel() == "optimizer step"
    ev = _line(ax_loss, "eval/loss")
    assert list(ev.get_xdata()) == list(EVALS) and list(ev.get_ydata()) == list(EVALS.values())
    assert list(_line(ax_loss, "train/loss").get_xdata()) == list(range(1, 26))
    lr = _line(ax_lr, "optim/lr")
    assert list(lr.get_ydata()) == pytest.approx([_lr(s) for s in range(1, 26)])
    assert all(ax.get_shared_x_axes().joined(ax_loss, ax) for ax in (ax_norm, ax_lr))
    # the event's vertical line on every panel
    assert all(any(list(ln.get_xdata()) == [12, 12] for ln in ax.get_lines()) for ax in fig.axes)
    path = write_report(run_dir)
    assert matplotlib.image.imread(path).shape[:2] == (900, 1000)


def test_summary_says_the_last_eval_loss_and_its_step(run_dir):
    s = summary(run_dir)
    assert (s["eval_loss"], s["eval_step"]) == (EVALS[25], 25)
    assert "eval loss 4.7500 (step 25)" in format_summary(s)


def test_a_run_without_evaluations_or_lr_still_reports(run_dir):
    path = run_dir / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for row in lines:
        row.pop("eval/loss", None)
        row.pop("optim/lr", None)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    s = summary(run_dir)
    assert s["eval_loss"] is None and "eval loss" not in format_summary(s)
    assert write_report(run_dir).is_file()
