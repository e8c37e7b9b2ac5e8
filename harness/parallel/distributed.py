"""Where this process sits: rank and world size from whatever launched it, in one place.

torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; srun sets
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; nothing at all means a single process.

A batch script or an salloc shell also carries the job's SLURM_NTASKS (and SLURM_PROCID=0),
but it is not one of the job's tasks: a `harness train` started there would wait for ever for
ranks that nobody starts. Only srun's steps count as tasks (see `_in_srun_step`).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from harness.common.errors import HarnessError

# Slurm numbers the steps srun starts 0, 1, 2, ...; its special steps take the top of the
# 32-bit range (slurm.h, 22.05: interactive 0xfffffffa, batch 0xfffffffb, extern 0xfffffffc;
# before 20.11: batch 0xfffffffe, extern 0xffffffff), all above SLURM_MAX_NORMAL_STEP_ID.
SLURM_MAX_NORMAL_STEP_ID = 0xFFFFFFF0

# MASTER_PORT of a Slurm job, from its id. Linux takes the ports of outgoing connections from
# net.ipv4.ip_local_port_range, 32768-60999 by default: a rendezvous port in there can already
# be held by any process's connection on the first node (the old 20000 + job % 20000 reached
# 39999). 10000 + job % 20000 stays in 10000-29999: below that range and above the
# privileged and most registered ports.
JOB_PORT_BASE = 10000
JOB_PORT_SPAN = 20000


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


def job_port(job_id: int) -> int:
    """The rendezvous port of Slurm job `job_id`: the same on every node and after a requeue,
    with no coordination; 10000-29999, below Linux's ephemeral ports (see JOB_PORT_BASE)."""
    return JOB_PORT_BASE + job_id % JOB_PORT_SPAN


def _in_srun_step(env) -> bool:
    """True in a task that srun started; False in a batch script, an salloc shell, the extern
    or the interactive step (SLURM_STEP_ID missing, or one of the special step ids)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    try:
        return step is not None and 0 <= int(step) <= SLURM_MAX_NORMAL_STEP_ID
    except ValueError:
        return False


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]),
                       int(env.get("LOCAL_RANK", "0")), env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", "29500")), "torchrun")
    tasks = int(env.get("SLURM_NTASKS", "1"))
    if "SLURM_JOB_ID" in env and tasks > 1 and not _in_srun_step(env):
        # a bare `harness train` in the batch script or salloc shell: it would be rank 0 of
        # SLURM_NTASKS and wait for ever (the process group's timeout) for the others
        raise HarnessError(f"harness train runs inside Slurm job {env['SLURM_JOB_ID']} but not "
                           f"as an srun task, with SLURM_NTASKS={tasks}: the other ranks would "
                           "never start; run it under `srun` (or use `harness submit`), or "
                           "unset SLURM_NTASKS for a single process")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost"))
        port = int(env.get("MASTER_PORT", str(job_port(job))))
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


def device_index(local_rank: int, visible: int, cuda_visible_devices: str | None) -> int:
    """The CUDA ordinal this task trains on, of the `visible` GPUs it can see.

    Every GPU of the node visible (srun's default, torchrun): ordinal LOCAL_RANK. One GPU
    visible (srun --gpus-per-task=1, --gpu-bind=single:1 or map_gpu, per-task cgroups):
    ordinal 0, whatever LOCAL_RANK is; binding cuda:LOCAL_RANK there fails on ranks 1-7 with
    "invalid device ordinal". Anything else (several GPUs, but fewer than LOCAL_RANK + 1)
    does not say which one is this task's: refused."""
    shown = "unset" if cuda_visible_devices is None else repr(cuda_visible_devices)
    if visible < 1:
        raise HarnessError(f"local rank {local_rank} sees no CUDA GPU (CUDA_VISIBLE_DEVICES="
                           f"{shown}): give each task a GPU (srun --gpus-per-task=1, or "
                           f"--gres=gpu:N with one task per GPU), or use train.device=cpu")
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise HarnessError(f"local rank {local_rank} sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
                       f"{shown}), so neither cuda:{local_rank} nor one GPU of its own: give "
                       f"each task every GPU of its node (srun --gpu-bind=none) or exactly one "
                       f"(srun --gpus-per-task=1), one task per GPU")


def bind_device(dist: DistEnv) -> int:
    """Choose and select this task's GPU before the process group and DeepSpeed's engine exist.
    Both take the device from LOCAL_RANK (NCCL's device_id, the engine's cuda:LOCAL_RANK), so
    LOCAL_RANK is set to the chosen ordinal; `dist.local_rank` keeps the launcher's number."""
    import torch  # noqa: WPS433 (only on the GPU path)

    index = device_index(dist.local_rank, torch.cuda.device_count(),
                         os.environ.get("CUDA_VISIBLE_DEVICES"))
    torch.cuda.set_device(index)
    os.environ["LOCAL_RANK"] = str(index)
    return index


def close_process_group() -> bool:
    """Leave the process group, if one exists, before the process exits on an error: gloo's
    threads left to interpreter exit can abort it ("terminate called without an active
    exception"), turning a clean exit 2 into SIGABRT. True when there was one."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        return True
    return False
