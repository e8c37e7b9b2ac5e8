"""The CPUs this process may use (prepare-data's workers, the tokenizer's trainer)."""
from __future__ import annotations

import os
from pathlib import Path


def available_cores() -> int:
    """The CPUs this process may use, not the machine's: its affinity mask (taskset, cpusets,
    Slurm's binding), Slurm's --cpus-per-task, and a cgroup v2 CPU quota (a container's
    --cpus), whichever is smallest. os.cpu_count() counts every core of a 64-core node on
    which this job holds 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cores = min(cores, int(slurm))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
