"""`harness submit`: freeze the resolved config into the run directory, render, sbatch."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from harness.config import Config, to_yaml
from harness.slurm import render_sbatch, submit


def submit_job(cfg: Config, dry_run: bool = False) -> int:
    # the job runs with --chdir=RUN_DIR: every path it reads must not depend on our cwd
    run_dir = Path(cfg.train.run_dir).resolve()
    cfg = replace(cfg, train=replace(cfg.train, run_dir=str(run_dir)),
                  data=replace(cfg.data, out_dir=str(Path(cfg.data.out_dir).resolve())))
    job_config = run_dir / "job_config.yaml"
    script = render_sbatch(cfg.slurm, str(run_dir), ["--config", str(job_config)], sys.executable)
    if dry_run:
        sys.stdout.write(script)
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    job_config.write_text(to_yaml(cfg))
    path = run_dir / "train.sbatch"
    path.write_text(script)
    print(submit(str(path)))
    return 0
