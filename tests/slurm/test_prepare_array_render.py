"""`harness prepare-data --submit`'s three batch scripts (no Slurm needed): golden files, values
that stay data in #SBATCH lines and in bash, and the chain of sbatch calls (a fake sbatch)."""
import os
import subprocess
from pathlib import Path

import pytest

from harness.common.errors import HarnessError
from harness.config import load_config
from harness.config.slurm import SlurmConfig
from harness.slurm import prepare_array as pa

GOLDEN = Path(__file__).parents[1] / "golden"
FIXED = dict(directory="/data/demo.prepare", config_path="/data/demo.prepare/job_config.yaml",
             python="/usr/bin/python3", tasks=3)


def render(step: str, **cfg) -> str:
    return pa.render_prepare(SlurmConfig(**cfg), step=step, **FIXED)


@pytest.mark.parametrize("step", pa.STEPS)
def test_scripts_match_golden(step):
    text = render(step, partition="cpu", account="proj1", extra_sbatch=["--qos=high prio"])
    golden = GOLDEN / f"prepare-{step}.sbatch"
    if os.environ.get("HARNESS_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), "rerun with HARNESS_UPDATE_GOLDEN=1 if the change is meant"


def test_default_tasks_are_the_training_jobs_shape():
    assert pa.default_tasks(SlurmConfig(nodes=4, gpus_per_node=8)) == 32
    assert pa.default_tasks(SlurmConfig(nodes=2, gpus_per_node=0)) == 2


# stands in for python: records its argv
FAKE_PYTHON = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/python.argv"
"""


def test_hostile_values_stay_data(tmp_path):
    """A config path and a job name with quotes, spaces and command substitutions: bash passes
    them to python as they are, and the array's task index becomes --part I/N."""
    (tmp_path / "python").write_text(FAKE_PYTHON)
    (tmp_path / "python").chmod(0o755)
    config = str(tmp_path / "a 'b' \"c\" $(touch pwned) `touch pwned`.yaml")
    name = 'x"; touch pwned; echo "'
    script = pa.render_prepare(SlurmConfig(job_name=name), str(tmp_path), config,
                               str(tmp_path / "python"), "parts", 3)
    assert '#SBATCH --job-name="x\\"; touch pwned; echo \\"-prepare-parts"' in script
    env = dict(os.environ, FAKE_DIR=str(tmp_path), SLURM_ARRAY_TASK_ID="2", SLURM_JOB_ID="9")
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "python.argv").read_text().splitlines()
    assert argv == ["-m", "harness.cli", "prepare-data", "--config", config, "--part", "2/3"]
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.parametrize("cfg, key", [(dict(job_name="a\nb"), "slurm.job_name"),
                                      (dict(time="5400"), "slurm.time"),
                                      (dict(extra_sbatch=["--qos=x\n--wrap=evil"]),
                                       "slurm.extra_sbatch")])
def test_bad_values_name_the_key(cfg, key):
    with pytest.raises(HarnessError, match=key):
        render("parts", **cfg)


FAKE_SBATCH = """#!/bin/bash
printf '%s ' "$@" >> "$FAKE_DIR/sbatch.calls"; echo >> "$FAKE_DIR/sbatch.calls"
n=$(wc -l < "$FAKE_DIR/sbatch.calls")
if [ "$n" = "${FAKE_FAIL_AT:-0}" ]; then
  echo 'sbatch: error: QOSMaxSubmitJobPerUserLimit' >&2; exit 1
fi
echo "$((100 + n));cluster"
"""
FAKE_SCANCEL = """#!/bin/bash
echo "$*" >> "$FAKE_DIR/scancel.calls"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_submit_chains_three_jobs(fake_slurm, capsys):
    cfg = load_config("tiny", ["data.sources=[corpus]", "data.out_dir=shards",
                               "slurm.nodes=2", "slurm.gpus_per_node=4"])
    assert pa.submit_prepare(cfg, None) == 0
    assert capsys.readouterr().out.split() == ["101", "102", "103"]
    jobs = fake_slurm / "shards.prepare"
    calls = (fake_slurm / "sbatch.calls").read_text().splitlines()
    assert [c.split() for c in calls] == [
        ["--parsable", f"{jobs}/tokenizer.sbatch"],
        ["--parsable", "--dependency=afterok:101", "--kill-on-invalid-dep=yes",
         f"{jobs}/parts.sbatch"],
        ["--parsable", "--dependency=afterany:102,afterok:101", "--kill-on-invalid-dep=yes",
         f"{jobs}/assemble.sbatch"]]
    assert "#SBATCH --array=0-7\n" in (jobs / "parts.sbatch").read_text()  # 2 nodes x 4
    frozen = load_config(str(jobs / "job_config.yaml"))  # what the jobs read: absolute paths
    assert frozen.data.sources == [str(fake_slurm / "corpus")]
    assert frozen.data.out_dir == str(fake_slurm / "shards")


def test_a_refused_submission_cancels_the_jobs_before_it(fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_AT", "3")
    cfg = load_config("tiny", ["data.sources=[corpus]", "data.out_dir=shards"])
    with pytest.raises(HarnessError, match="QOSMaxSubmitJobPerUserLimit"):
        pa.submit_prepare(cfg, 2)
    assert (fake_slurm / "scancel.calls").read_text() == "101 102\n"
