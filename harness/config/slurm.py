"""slurm.*: the batch job's shape (nodes, GPUs, time, signals, requeue) and its checks.

Values end up in `#SBATCH` lines and a bash script (harness/slurm/sbatch.py): each must be one
printable line, and `extra_sbatch` may not set what the other keys set.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from harness.common.errors import HarnessError

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
                check_one_line(f"slurm.{key}", value)
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


def check_one_line(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise HarnessError(f"{name}={value!r} must be one non-empty line of printable "
                           "characters: remove newlines, tabs and control characters")


def _check_extra(line: object) -> None:
    check_one_line("slurm.extra_sbatch", line)
    match = _EXTRA.fullmatch(line)
    if not match:
        raise HarnessError(f"slurm.extra_sbatch entry {line!r} must look like --key or "
                           "--key=value (long option, no '#SBATCH')")
    if match[1] in _MANAGED:
        raise HarnessError(f"slurm.extra_sbatch entry {line!r}: set {_MANAGED[match[1]]} instead")
