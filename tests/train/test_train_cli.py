"""`harness train` in a fresh process: module-global DeepSpeed state from scratch. (The
README's own train command is tests/test_readme_commands.py's.)"""
import subprocess
import sys

import pytest
from engine_utils import child_env

pytestmark = pytest.mark.slow  # `harness train` processes, as a user runs them


def harness(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=child_env())


# `harness train` on the tiny preset, twice (60 steps, loss falls, evals at 20/40/60, the
# run directory's files, the second run changes nothing): tests/test_readme_commands.py's
# make-train check, which runs exactly the README's command
def test_fresh_process_with_checkpointing_and_zero2(tmp_path, shards_dir):
    """Module-global DeepSpeed state (process group, checkpointing config) from scratch."""
    proc = harness("train", f"train.run_dir={tmp_path}", f"data.out_dir={shards_dir}",
                   "activation_checkpointing.policy=sqrt", "zero.stage=2", "train.max_steps=3",
                   "optim.warmup_steps=1",
                   "model.dropout=0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
