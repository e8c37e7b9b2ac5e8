"""`harness submit`: freeze the resolved config into the run directory, render, sbatch."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

from harness.config import Config, to_yaml
from harness.data.out_dir import check_toy_corpus
from harness.slurm.sbatch import render_sbatch, submit
from harness.train.run_dir import check_paths, check_run_dir_free, claim_run_dir

# Every config value that names a file or directory (data.sources: a list of them). The job
# runs with --chdir=RUN_DIR, so a relative path would be read there, not where `harness submit`
# ran: submit makes them all absolute. slurm.output is left out on purpose: it is meant
# relative to the run directory. tests/slurm/test_submit.py fails when a new path-like key appears
# in a config dataclass without being listed here or there.
PATH_KEYS = ("train.run_dir", "data.sources", "data.out_dir", "data.tokenizer_model",
             "checkpoint.dir", "checkpoint.resume", "wandb.dir")
RELATIVE_TO_RUN_DIR = ("slurm.output",)
_NOT_A_PATH = {"checkpoint.resume": ("auto", "never")}


def _absolute(path: str) -> str:
    # abspath, not resolve(): a symlinked shared filesystem keeps the name the user gave it
    return os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg: Config) -> Config:
    """A copy of cfg with every PATH_KEYS value absolute, against the current directory."""
    cfg = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        section_name, name = key.split(".")
        section = getattr(cfg, section_name)
        value = getattr(section, name)
        if value is None or value in _NOT_A_PATH.get(key, ()):
            continue
        setattr(section, name, [_absolute(v) for v in value] if isinstance(value, list)
                else _absolute(value))
    for entry in cfg.data.mix:  # data.mix[i].sources: data.sources of each source
        entry.sources = [_absolute(v) for v in entry.sources]
    return cfg


def submit_job(cfg: Config, dry_run: bool = False) -> int:
    cfg = absolute_paths(cfg)
    # refused now, on the login node, rather than in the job's log an hour later: the data
    # (prepare-data and train refuse the toy corpus by the same rule) and the paths
    check_toy_corpus(cfg.data, Path(cfg.data.out_dir))
    check_paths(cfg)
    # a job running there: its job_config.yaml and train.sbatch must not be replaced either
    check_run_dir_free(cfg)
    claim_run_dir(cfg, rank=None)
    run_dir = Path(cfg.train.run_dir)
    job_config = run_dir / "job_config.yaml"
    # a mix prepares its sources in order: the last one's manifest says they are all there
    data_dir = Path(cfg.data.out_dir) / cfg.data.mix[-1].name if cfg.data.mix else cfg.data.out_dir
    script = render_sbatch(cfg.slurm, str(run_dir), ["--config", str(job_config)], sys.executable,
                           data_dir=str(data_dir))
    if dry_run:
        sys.stdout.write(script)
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    job_config.write_text(to_yaml(cfg))
    path = run_dir / "train.sbatch"
    path.write_text(script)
    print(submit(str(path)))
    return 0
