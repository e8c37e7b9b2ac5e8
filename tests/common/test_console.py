"""The console says where the run stands and what it left (issue 15, item 4)."""
from __future__ import annotations

import re

from trained_runs import train_run


def test_console_lines(tmp_path, shards_dir, capsys):
    run = train_run(tmp_path / "run", shards_dir, "train.max_steps=4", "data.eval_every=2",
                    "train.log_every=1")
    lines = capsys.readouterr().out.splitlines()
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("run: ")):]
    assert lines[0].startswith(f"run: {run.resolve()}") and lines[1].startswith("W&B: off")
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert len(steps) == 4
    assert re.match(r"step +2/4 \( 50\.0%\) \| \d+:\d\d:\d\d elapsed, ETA \d+:\d\d:\d\d \| "
                    r"512 tokens \| loss", steps[1]), steps[1]
    assert re.search(r"eval loss \d+\.\d{4} bpb \d+\.\d{4}$", steps[1]), steps[1]
    assert steps[2].endswith("(step 2)") and "100.0%" in steps[3]
    tail = "\n".join(lines[-6:])
    assert f"checkpoint: {run}/checkpoints/step00000004" in tail
    for cmd in ("harness eval", "harness sample", "harness export", "resume:"):  # report.png:
        # named by harness.train.run once written (tests/callbacks/test_run_console.py)
        assert cmd in tail
