"""Where this process sits: rank and world size from whatever launched it, in one place.

torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; srun sets
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; nothing at all means a single process.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # a plain name or "n[1-4]" style list without scontrol at hand
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rng = head.split("[", 1)
            head = prefix + rng.split("-")[0].split(",")[0].rstrip("]")
        return head


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]),
                       int(env.get("LOCAL_RANK", "0")), env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", "29500")), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost"))
        port = int(env.get("MASTER_PORT", str(20000 + job % 20000)))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", "0")), addr, port, "slurm")
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
    return DistEnv(0, 1, 0, "127.0.0.1", port, "single")


def _free_port() -> int:
    # a single process still opens a gloo store; a fixed port would clash between runs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export(dist: DistEnv) -> None:
    """DeepSpeed reads these; without them it tries MPI discovery and fails on mpi4py."""
    os.environ.update(RANK=str(dist.rank), WORLD_SIZE=str(dist.world_size),
                      LOCAL_RANK=str(dist.local_rank), MASTER_ADDR=dist.master_addr,
                      MASTER_PORT=str(dist.master_port))
