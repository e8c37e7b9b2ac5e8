"""The README's train command, as a user runs it: the tiny preset from a fresh run directory."""
import json
import subprocess
import sys

import pytest
import yaml
from engine_utils import child_env

pytestmark = pytest.mark.slow  # `harness train` processes, as a user runs them


def harness(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=child_env())


def test_tiny_trains_to_lower_loss_and_writes_the_run_dir(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    # no wall clock (a shared 2-core machine makes it flaky): harness()'s timeout only stops a
    # hang; the README's "about 20 s" is a measurement, not a test
    proc = harness("train", f"train.run_dir={run}", f"data.out_dir={data}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [ln for ln in lines if "event" not in ln]
    assert [m["step"] for m in steps] == list(range(1, 61))  # one line per optimizer step
    first, last = steps[0]["train/loss"], sum(m["train/loss"] for m in steps[-5:]) / 5
    assert last < first - 1.0, (first, last)
    evals = [(m["step"], m["eval/loss"]) for m in steps if "eval/loss" in m]
    assert [s for s, _ in evals] == [20, 40, 60]  # data.eval_every: 20 in the tiny preset
    assert evals[-1][1] < evals[0][1]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 60
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert (data / "manifest.json").is_file()
    # the same command again finds the run complete and changes nothing
    before = (run / "metrics.jsonl").read_text()
    again = harness("train", f"train.run_dir={run}", f"data.out_dir={data}")
    assert again.returncode == 0 and (run / "metrics.jsonl").read_text() == before


def test_fresh_process_with_checkpointing_and_zero2(tmp_path, shards_dir):
    """Module-global DeepSpeed state (process group, checkpointing config) from scratch."""
    proc = harness("train", f"train.run_dir={tmp_path}", f"data.out_dir={shards_dir}",
                   "activation_checkpointing.policy=sqrt", "zero.stage=2", "train.max_steps=3",
                   "optim.warmup_steps=1",
                   "model.dropout=0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
