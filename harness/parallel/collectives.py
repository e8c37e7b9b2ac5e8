"""Every collective the harness itself makes goes through here.

NCCL has no CPU backend: a tensor handed to a collective must live on the engine's device,
even in a world of one rank. gloo accepts any tensor, so CPU tests alone would never notice a
CPU tensor; this module checks every call instead. No collective is skipped because the world
has one rank, so a one-GPU run makes the same calls, in the same order, as a 64-GPU run.

`reduce_scalars` packs a step's scalars (loss, stop flag, squared norms, ...) into one tensor:
one all-reduce and one device-to-host copy for all of them.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist


class WrongDevice(RuntimeError):
    pass


class Collectives:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.calls = 0  # collectives made: the same count at every world size

    @classmethod
    def for_process_group(cls) -> "Collectives":
        """For code without the engine at hand: NCCL works on this rank's current GPU."""
        if dist.get_backend() == "nccl":
            return cls(torch.device("cuda", torch.cuda.current_device()))
        return cls("cpu")

    def _check(self, tensor: torch.Tensor, what: str) -> None:
        # index-free comparison: "cuda" and "cuda:0" name the same device for a rank
        if tensor.device.type != self.device.type or (
                self.device.index is not None and tensor.device.index != self.device.index):
            raise WrongDevice(f"{what}: tensor on {tensor.device}, but the engine's collectives "
                              f"run on {self.device} (NCCL rejects CPU tensors)")

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place; op is sum or max."""
        self._check(tensor, "all_reduce")
        self.calls += 1
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def barrier(self) -> None:
        """torch's barrier, not an all-reduce: gloo's also waits for every collective still in
        flight (leaving the group with one pending aborts the process at exit); NCCL's is
        told our GPU instead of guessing one."""
        self.calls += 1
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            dist.barrier(device_ids=[index])
        else:
            dist.barrier()

    def reduce_scalars(self, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum each named tensor over ranks with ONE all-reduce; the results come back on the
        CPU, in float64 (the step's one device-to-host copy)."""
        flat = [t.detach().reshape(-1).to(torch.float64) for t in parts.values()]
        for name, t in zip(parts, flat):
            self._check(t, name)
        packed = self.all_reduce(torch.cat(flat)).cpu()
        out, start = {}, 0
        for name, t in zip(parts, flat):
            out[name] = packed[start:start + t.numel()].reshape(parts[name].shape)
            start += t.numel()
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank src's picklable object on every rank (torch stages it on the current device)."""
        self.calls += 1
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]
