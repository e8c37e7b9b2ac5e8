"""`harness submit` of a 2-rank job whose data.out_dir holds no shards yet, on a real 2-node
Slurm cluster (tests/slurm_cluster.sh): the batch script runs `harness prepare-data` once,
before its job step, so that no rank waits in a collective for rank 0 to tokenize; the ranks
then train. Paths are given relative to where submit runs (the job runs in RUN_DIR)."""
import json
import subprocess
import sys

import pytest
from engine_utils import child_env
from slurm_fixtures import slurm_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

CONFIG = ["slurm.nodes=2", "slurm.gpus_per_node=0", "slurm.cpus_per_task=1",
          "slurm.time=0-00:10:00", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
          "model.block_size=32", "train.global_batch_size=8", "train.micro_batch_size=2",
          "train.max_steps=3", "optim.warmup_steps=1", "checkpoint.every=0",
          "data.max_bytes=200000", "data.eval_every=0"]


def test_missing_shards_are_prepared_by_the_batch_script(slurm_cluster, tmp_path):  # noqa: F811
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "submit", "--config", "tiny", *CONFIG,
         "data.out_dir=shards", "train.run_dir=run"], cwd=tmp_path,
        env=child_env(SLURM_CONF=slurm_cluster.env["SLURM_CONF"]), capture_output=True,
        text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    info = slurm_cluster.wait(job, timeout=300)
    log = (tmp_path / "run" / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", log
    assert log.count("running harness prepare-data first") == 1, log
    assert (tmp_path / "shards" / "manifest.json").is_file()  # resolved where submit ran
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl")
             .read_text().splitlines() if "train/loss" in ln]
    assert steps == [1, 2, 3], log
    ds = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2  # 2 ranks x micro 2 x accumulation 2
