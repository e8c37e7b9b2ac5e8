"""Slurm submission: the `slurm` config section, the batch script and `sbatch`.

Two parsers read the script and both must see user values as plain data: sbatch reads the
`#SBATCH` lines (its own quoting: double quotes, backslash escapes; no shell expansion), bash
runs the body (values go through shlex.quote). A value only has to be one printable line.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harness.errors import HarnessError

# The trainer exits with this after saving on USR1/TERM: "not done, run me again".
REQUEUE_EXIT_CODE = 42

_REPO = Path(__file__).resolve().parent.parent
TEMPLATE = _REPO / "slurm" / "train.sbatch.tmpl"
TASK_SCRIPT = str(_REPO / "launch" / "srun_task.sh")
# what each task runs after `python`: the harness CLI's train command
TRAIN_ENTRY = ("-m", "harness.cli", "train")
# what the batch script runs once, before the tasks, when data.out_dir holds no shards yet
PREPARE_ENTRY = ("-m", "harness.cli", "prepare-data")

# directives this module writes itself; extra_sbatch may not set them behind its back
_MANAGED = {
    "nodes": "slurm.nodes", "ntasks-per-node": "slurm.gpus_per_node",
    "cpus-per-task": "slurm.cpus_per_task", "gres": "slurm.gpus_per_node", "time": "slurm.time",
    "job-name": "slurm.job_name", "output": "slurm.output", "open-mode": "slurm.output",
    "signal": "slurm.signal_grace_s", "requeue": "slurm.requeue", "no-requeue": "slurm.requeue",
    "partition": "slurm.partition", "account": "slurm.account", "chdir": "train.run_dir",
}
# bare minutes are left out on purpose: YAML reads an unquoted 1:30:00 as the number 5400
_TIME = re.compile(r"\d+-\d+(:\d+){0,2}|\d+(:\d+){1,2}|UNLIMITED|INFINITE")
_EXTRA = re.compile(r"--([A-Za-z][A-Za-z0-9-]*)(=.*)?")
_BARE = re.compile(r"[A-Za-z0-9_.,:/%@+=-]+")  # sbatch takes these unquoted
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 1  # = tasks per node; 0: CPU only, one task per node
    cpus_per_task: int = 8
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "24:00:00"
    job_name: str = "harness"
    output: str = "slurm-%j.out"  # relative to the run directory; appended to across requeues
    signal_grace_s: int = 120  # USR1 this long before the time limit: save and requeue
    requeue: bool = True
    max_restarts: int = 20
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. "--qos=high", "--exclusive"

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    def validate(self) -> None:
        _check_int("nodes", self.nodes, 1, 100_000)
        _check_int("gpus_per_node", self.gpus_per_node, 0, 256)
        _check_int("cpus_per_task", self.cpus_per_task, 1, 100_000)
        _check_int("signal_grace_s", self.signal_grace_s, 1, 65535)  # sbatch's limit
        _check_int("max_restarts", self.max_restarts, 0, 1_000_000)
        for key in ("partition", "account", "time", "job_name", "output"):
            value = getattr(self, key)
            if value is not None:
                _check_line(f"slurm.{key}", value)
        if self.time.isdigit():
            raise HarnessError(f"slurm.time={self.time} is ambiguous (YAML turns an unquoted "
                               "1:30:00 into 5400): write D-HH:MM:SS, e.g. slurm.time=0-01:30:00")
        if not _TIME.fullmatch(self.time):
            raise HarnessError(f"slurm.time={self.time!r} is not a Slurm time limit: "
                               "write D-HH:MM:SS, e.g. slurm.time=0-01:30:00")
        for line in self.extra_sbatch:
            _check_extra(line)


def _check_int(key: str, value: object, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low \
            or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise HarnessError(f"slurm.{key}={value!r} must be {bound}")


def _check_line(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise HarnessError(f"{name}={value!r} must be one non-empty line of printable "
                           "characters: remove newlines, tabs and control characters")


def _check_extra(line: object) -> None:
    _check_line("slurm.extra_sbatch", line)
    match = _EXTRA.fullmatch(line)
    if not match:
        raise HarnessError(f"slurm.extra_sbatch entry {line!r} must look like --key or "
                           "--key=value (long option, no '#SBATCH')")
    if match[1] in _MANAGED:
        raise HarnessError(f"slurm.extra_sbatch entry {line!r}: set {_MANAGED[match[1]]} instead")


def _sbatch_quote(value: str) -> str:
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
    opts += [(key, getattr(cfg, key)) for key in ("partition", "account")
             if getattr(cfg, key) is not None]
    lines = [f"#SBATCH --{key}={_sbatch_quote(str(value))}" for key, value in opts]
    lines.append("#SBATCH --requeue" if cfg.requeue else "#SBATCH --no-requeue")
    for extra in cfg.extra_sbatch:
        key, eq, value = extra.partition("=")
        lines.append(f"#SBATCH {key}{eq}{_sbatch_quote(value) if eq else ''}")
    return lines


def render_sbatch(slurm_cfg: SlurmConfig, run_dir: str, train_args: list[str], python: str,
                  task_script: str = TASK_SCRIPT, data_dir: Optional[str] = None) -> str:
    """The batch script that runs `python -m harness.cli train *train_args` once per task.

    With `data_dir` (the config's data.out_dir), the script first runs
    `python -m harness.cli prepare-data *train_args` itself when data_dir has no manifest.json.
    """
    slurm_cfg.validate()
    run_dir = os.path.abspath(run_dir)
    _check_line("run_dir", run_dir)
    if data_dir is not None:
        data_dir = os.path.abspath(data_dir)
        _check_line("data.out_dir", data_dir)
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
    return _PLACEHOLDER.sub(lambda m: values[m[1]], TEMPLATE.read_text())


def submit(script_path: str) -> str:
    """Submit with `sbatch --parsable` and return the job id."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True,
                              text=True, timeout=120)
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
