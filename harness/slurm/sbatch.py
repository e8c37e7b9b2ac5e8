"""Slurm submission: the batch script and `sbatch` (the `slurm` section: harness/config/slurm.py).

Two parsers read the script and both must see user values as plain data: sbatch reads the
`#SBATCH` lines (its own quoting: double quotes, backslash escapes; no shell expansion), bash
runs the body (values go through shlex.quote). A value only has to be one printable line.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Optional

from harness.common.errors import HarnessError
from harness.config.slurm import SlurmConfig, check_one_line
from harness.train.preemption import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "slurm" / "train.sbatch.tmpl"
TASK_SCRIPT = str(REPO / "launch" / "srun_task.sh")
# what each task runs after `python`: the harness CLI's train command
TRAIN_ENTRY = ("-m", "harness.cli", "train")
# what the batch script runs once, before the tasks, when data.out_dir holds no shards yet
PREPARE_ENTRY = ("-m", "harness.cli", "prepare-data")

_BARE = re.compile(r"[A-Za-z0-9_.,:/%@+=-]+")  # sbatch takes these unquoted
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def sbatch_quote(value: str) -> str:
    """Quote for sbatch's #SBATCH parser, which ends an unquoted value at a space or '#'."""
    if _BARE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _directives(cfg: SlurmConfig, run_dir: str) -> list[str]:
    opts = [("nodes", cfg.nodes), ("ntasks-per-node", cfg.tasks_per_node),
            ("cpus-per-task", cfg.cpus_per_task)]
    if cfg.gpus_per_node > 0:
        opts.append(("gres", f"gpu:{cfg.gpus_per_node}"))
    opts += [("time", cfg.time), ("job-name", cfg.job_name), ("chdir", run_dir),
             ("output", cfg.output), ("open-mode", "append"),
             ("signal", f"B:USR1@{cfg.signal_grace_s}")]
    return directive_lines(cfg, opts)


def directive_lines(cfg: SlurmConfig, opts: list[tuple[str, object]]) -> list[str]:
    """#SBATCH lines: `opts`, then slurm.partition and account where set, the requeue choice
    and slurm.extra_sbatch, every value quoted."""
    opts = opts + [(key, getattr(cfg, key)) for key in ("partition", "account")
                   if getattr(cfg, key) is not None]
    lines = [f"#SBATCH --{key}={sbatch_quote(str(value))}" for key, value in opts]
    lines.append("#SBATCH --requeue" if cfg.requeue else "#SBATCH --no-requeue")
    for extra in cfg.extra_sbatch:
        key, eq, value = extra.partition("=")
        lines.append(f"#SBATCH {key}{eq}{sbatch_quote(value) if eq else ''}")
    return lines


def render_sbatch(slurm_cfg: SlurmConfig, run_dir: str, train_args: list[str], python: str,
                  task_script: str = TASK_SCRIPT, data_dir: Optional[str] = None) -> str:
    """The batch script that runs `python -m harness.cli train *train_args` once per task.

    With `data_dir` (the config's data.out_dir), the script first runs
    `python -m harness.cli prepare-data *train_args` itself when data_dir has no manifest.json.
    """
    slurm_cfg.validate()
    run_dir = os.path.abspath(run_dir)
    check_one_line("run_dir", run_dir)
    if data_dir is not None:
        data_dir = os.path.abspath(data_dir)
        check_one_line("data.out_dir", data_dir)
    sh = shlex.quote
    values = {
        "directives": "\n".join(_directives(slurm_cfg, run_dir)),
        "run_dir": sh(run_dir),
        "job_name": sh(slurm_cfg.job_name),
        # requeue=False: the script never requeues, whatever max_restarts says
        "max_restarts": str(slurm_cfg.max_restarts if slurm_cfg.requeue else 0),
        "requeue_exit_code": str(REQUEUE_EXIT_CODE),
        "cpus_per_task": str(slurm_cfg.cpus_per_task),
        "command": " ".join(sh(a) for a in [task_script, python, *TRAIN_ENTRY, *train_args]),
        "data_dir": sh(data_dir or ""),  # empty: the script prepares nothing
        "prepare_command": " ".join(sh(a) for a in [python, *PREPARE_ENTRY, *train_args]),
    }
    return PLACEHOLDER.sub(lambda m: values[m[1]], TEMPLATE.read_text())


def submit(script_path: str, options: tuple[str, ...] = ()) -> str:
    """Submit with `sbatch --parsable *options` and return the job id."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", *options, str(script_path)],
                              capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise HarnessError("sbatch not found: submit from a Slurm login node, or use "
                           "`harness submit --dry-run` to only write the script") from None
    except subprocess.TimeoutExpired:
        raise HarnessError("sbatch did not answer within 120 s: check the cluster with "
                           "`sinfo`") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise HarnessError(f"sbatch {script_path} failed: {reason}")
    return proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
