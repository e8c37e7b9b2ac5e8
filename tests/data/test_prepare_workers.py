"""prepare-data's workers default to the cores the process may use (issue 26 item 2): its
affinity mask and Slurm's --cpus-per-task, not the machine's count capped at 4. A real
process pinned to a core with taskset, and Slurm's variable set."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from harness.config.data import DataConfig
from harness.data import prepare as prep

PRINT = "from harness.data.prepare import available_cores; print(available_cores())"


def _cores(env_extra: dict, taskset: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"}
    cmd = [sys.executable, "-c", PRINT]
    if taskset:
        cmd = ["taskset", "-c", taskset, *cmd]
    out = subprocess.run(cmd, env={**env, **env_extra}, capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


def test_this_process_counts_its_affinity():
    assert prep.available_cores() == min(len(os.sched_getaffinity(0)),
                                         int(os.environ.get("SLURM_CPUS_PER_TASK", 10**6)))


@pytest.mark.slow  # a process of its own
@pytest.mark.skipif(not shutil.which("taskset"), reason="taskset is not installed")
def test_a_process_pinned_to_one_core_uses_one():
    assert _cores({}, taskset="0") == 1
    assert _cores({"SLURM_CPUS_PER_TASK": "4096"}, taskset="0") == 1


def test_slurm_cpus_per_task_caps_it(monkeypatch):
    mine = len(os.sched_getaffinity(0))
    for value, want in (("1", 1), ("4096", mine), ("", mine), ("0", mine)):
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", value)
        assert prep.available_cores() == want, value


def test_workers_default_to_the_cores_unless_set_or_small(monkeypatch):
    monkeypatch.setattr(prep, "available_cores", lambda: 48)
    big = prep.PARALLEL_MIN_BYTES
    assert prep._num_workers(DataConfig(), big) == 48  # not capped at 4 any more
    assert prep._num_workers(DataConfig(num_workers=3), big) == 3
    assert prep._num_workers(DataConfig(), big - 1) == 1


def test_the_tokenizer_is_the_same_on_any_number_of_cores(tmp_path, monkeypatch):
    """sentencepiece trains another tokenizer on another thread count (1 and 2 threads differ,
    the first assertion): prepare-data trains on data.tokenizer_threads, not the cores, so a
    job with one core and a process with every core make the same tokenizer."""
    from harness.data.tokenizer import train_tokenizer

    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"{i}.txt").write_text(f"doc {i}: " + " ".join(
            f"w{(i * 7 + j * j) % 97}x{j % 13}" for j in range(600)))
    texts = [p.read_text() for p in sorted(src.iterdir())]
    shas = {t: train_tokenizer(iter(texts), tmp_path / f"{t}.model", "bpe", 400, 10**6,
                               threads=t).sha256 for t in (1, 2)}
    assert shas[1] != shas[2]  # what makes the fixed count necessary
    made = []
    for cores in ("1", "2"):
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", cores)
        out = prep.prepare_data(DataConfig(sources=[str(src)], out_dir=str(tmp_path / cores),
                                           vocab_size=400), progress=False)
        made.append((out / "tokenizer.model").read_bytes())
    assert made[0] == made[1]
