"""`harness plan`'s flags and their checks, kept free of torch so that the CLI's parser (and
`--help`) can add them without importing the planner: sizes such as 80GB or 80GiB, whole
numbers, and the world as --world-size or --nodes x --gpus-per-node.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import Optional

from harness.common.errors import HarnessError

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

MAX_GPU_MEMORY = 2**50  # 1 PiB per GPU: beyond that a size is a typo
MAX_WORLD_SIZE = 2**20
MAX_GLOBAL_BATCH = 2**31 - 1  # as train.global_batch_size
MAX_TOP = 10**6
MAX_PEAK_TFLOPS = 1e6  # 1 EFLOP/s per GPU: beyond that a peak is a typo


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The plan-specific flags (the CLI adds --config and the overrides itself)."""
    p.add_argument("--world-size", default=None,
                   help="GPUs in all = tensor-parallel x data-parallel ranks (default 1, or "
                        "--nodes x --gpus-per-node)")
    p.add_argument("--nodes", default=None, help="nodes (with --gpus-per-node)")
    p.add_argument("--gpus-per-node", default=None,
                   help="GPUs per node (world = nodes x GPUs per node; --nodes default 1)")
    p.add_argument("--gpu-memory", default=None,
                   help="per GPU: 80GB, 80GiB, 24G (default 80GB, or --gpu's)")
    p.add_argument("--gpu", default=None,
                   help="predict time with the calibrated throughput model for this GPU: "
                        "a100-40gb, a100-80gb, h100-sxm, h100-pcie, h100-nvl, h200")
    p.add_argument("--hardware", default=None, metavar="FILE",
                   help="a YAML describing other GPUs and links (the form of "
                        "harness/plan/hardware.yaml); --gpu picks one of them")
    p.add_argument("--tokens", default=None,
                   help="with --gpu: tokens to train, e.g. 10B, 300e9 (default: train.max_steps "
                        "x the global batch)")
    p.add_argument("--json", action="store_true",
                   help="with --gpu: one JSON line per layout (the config as given first)")
    p.add_argument("--gpu-type", default=None,
                   help="without --gpu, the FLOPs x assumed-MFU estimate's GPU: H100, A100, "
                        "L40S, ... (default H100)")
    p.add_argument("--peak-tflops", default=None,
                   help="the GPU's dense peak in TFLOP/s, for a type the harness does not know")
    p.add_argument("--mfu", default=None,
                   help="assumed model FLOPs utilisation, in (0, 1] (default 0.4)")
    p.add_argument("--target-global-batch", default=None,
                   help="samples per step (default: the config's)")
    p.add_argument("--top", default="10", help="recommendations shown (default 10)")


@dataclass(frozen=True)
class World:
    """The GPUs planned for: `size` in all, and how they sit on nodes when that was given."""
    size: int
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None

    def describe(self, tp: int) -> str:
        where = (f" ({self.nodes} node{'s' * (self.nodes != 1)} x {self.gpus_per_node})"
                 if self.nodes else "")
        return (f"{self.size} GPU{'s' * (self.size != 1)}{where} = tensor-parallel {tp} x "
                f"data-parallel {self.size // tp}")


def parse_world(args: argparse.Namespace, tp: int) -> World:
    """--world-size, or --nodes x --gpus-per-node (both given: they must agree); a
    tensor-parallel group must fit on one node (the config's rule for slurm.gpus_per_node)."""
    size = _optional(args.world_size, "--world-size", "the number of GPUs, e.g. --world-size 8")
    nodes = _optional(args.nodes, "--nodes", "e.g. --nodes 2 --gpus-per-node 8")
    per_node = _optional(args.gpus_per_node, "--gpus-per-node", "e.g. --gpus-per-node 8")
    if nodes is None and per_node is None:
        return World(size or 1)
    if per_node is None:
        raise HarnessError(f"--nodes {nodes} needs --gpus-per-node: the GPUs on each node, "
                           f"e.g. --nodes {nodes} --gpus-per-node 8")
    nodes = nodes or 1
    if nodes * per_node > MAX_WORLD_SIZE:
        raise HarnessError(f"--nodes {nodes} x --gpus-per-node {per_node} is more than "
                           f"{MAX_WORLD_SIZE} GPUs: check the numbers")
    if size is not None and size != nodes * per_node:
        raise HarnessError(f"--world-size {size} contradicts --nodes {nodes} x --gpus-per-node "
                           f"{per_node} = {nodes * per_node}: give one or the other")
    if per_node % tp:
        raise HarnessError(f"parallel.tensor_parallel_size={tp} does not divide --gpus-per-node "
                           f"{per_node}: a tensor-parallel group must sit on one node; choose a "
                           f"size that divides {per_node}")
    return World(nodes * per_node, nodes, per_node)


def _optional(text: object, flag: str, fix: str) -> Optional[int]:
    return None if text is None else int_flag(text, flag, MAX_WORLD_SIZE, fix)


def int_flag(text: object, flag: str, high: int, fix: str) -> int:
    """A whole number in 1..high written with ASCII digits; one line naming the flag if not."""
    text = str(text).strip()
    if not re.fullmatch(r"[0-9]{1,30}", text) or not 1 <= int(text) <= high:
        raise HarnessError(f"{flag}='{text}' must be a whole number in 1..{high}: {fix}")
    return int(text)


def float_flag(text: object, flag: str, low: float, high: float, fix: str) -> float:
    """A number in (low, high]; one line naming the flag if not."""
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if not low < value <= high:  # NaN fails too
        raise HarnessError(f"{flag}='{text}' must be a number in ({low:g}, {high:g}]: {fix}")
    return value


def parse_tokens(text: object) -> int:
    """--tokens: 10B, 2.5T, 300e9, 1000000 (K, M, B, T are powers of 1000)."""
    match = re.fullmatch(r"\s*([0-9]{1,20}(?:\.[0-9]{1,20})?(?:e[0-9]{1,2})?)\s*([kKmMbBtT]?)\s*",
                         str(text))
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
    value = float(match.group(1)) * scale[match.group(2).lower()] if match else 0
    if not 1 <= value <= 1e18:
        raise HarnessError(f"--tokens='{text}' must be a number of tokens in 1..1e18: write e.g. "
                           f"10B, 2.5T or 300e9")
    return int(value)


def parse_size(text: str, flag: str = "--gpu-memory") -> float:
    """'80GB' = 80e9 bytes, '80GiB' and '24G' (Slurm's --mem style) binary, plain bytes."""
    match = re.fullmatch(r"\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise HarnessError(f"{flag}='{text}' is not a size: write e.g. 80GB, 80GiB or 24G")
    size = float(match.group(1)) * _UNITS[unit]
    if not size <= MAX_GPU_MEMORY:
        raise HarnessError(f"{flag}='{text}' is more than 1 PiB per GPU: write the memory of "
                           f"one GPU, e.g. 80GB, 80GiB or 24G")
    return size
