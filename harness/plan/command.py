"""`harness plan`'s command line: the flags (sizes such as 80GB or 80GiB), and the printed
breakdown, policy table and recommendations.
"""
from __future__ import annotations

import argparse
import re
import sys

from harness.common.errors import HarnessError
from harness.config import Config, load_config
from harness.parallel.batch import make_plan
from harness.plan.planner import (GB, SEARCH_POLICIES, activation_bytes, param_counts,
                                  predict_memory, recommend, recompute_share)


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


MAX_GPU_MEMORY = 2**50  # 1 PiB per GPU: beyond that a size is a typo
MAX_WORLD_SIZE = 2**20
MAX_GLOBAL_BATCH = 2**31 - 1  # as train.global_batch_size
MAX_TOP = 10**6


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


def _int_flag(text: object, flag: str, high: int, fix: str) -> int:
    """A whole number in 1..high written with ASCII digits; one line naming the flag if not."""
    text = str(text).strip()
    if not re.fullmatch(r"[0-9]{1,30}", text) or not 1 <= int(text) <= high:
        raise HarnessError(f"{flag}='{text}' must be a whole number in 1..{high}: {fix}")
    return int(text)


def _positive_int(text: str, flag: str) -> int:
    return _int_flag(text, flag, MAX_GLOBAL_BATCH, "e.g. 8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The plan-specific flags (the CLI adds --config and the overrides itself)."""
    p.add_argument("--world-size", default="1",
                   help="GPUs in all: tensor-parallel x data-parallel (default 1)")
    p.add_argument("--gpu-memory", default="80GB", help="memory per GPU (default 80GB)")
    p.add_argument("--target-global-batch", default=None,
                   help="global batch in samples (default: the config's)")
    p.add_argument("--top", default="10", help="recommendations shown (default 10)")


def run(args: argparse.Namespace) -> int:
    world = _int_flag(args.world_size, "--world-size", MAX_WORLD_SIZE,
                      "the number of GPUs, e.g. --world-size 8")
    gpu = parse_size(args.gpu_memory)
    top = _int_flag(args.top, "--top", MAX_TOP, "how many recommendations to show, e.g. 10")
    target = None
    if args.target_global_batch is not None:
        target = _int_flag(args.target_global_batch, "--target-global-batch", MAX_GLOBAL_BATCH,
                           "samples per optimizer step, e.g. 512")
    cfg = load_config(args.config, args.overrides)
    if target is None:
        target = cfg.train.global_batch_size  # range-checked by the config
    if target is None:
        try:
            target = make_plan(cfg, world).batch.global_batch
        except HarnessError as err:
            raise HarnessError(f"pass --target-global-batch ({err})") from None
    mem = predict_memory(cfg, world, gpu_memory_bytes=gpu)
    _print_breakdown(cfg, world, mem)
    _print_policies(cfg, mem)
    _print_recommendations(recommend(cfg, world, gpu, target), world, gpu, target, top)
    return 0


def _print_breakdown(cfg: Config, world: int, mem: dict) -> None:
    t, z = cfg.train, cfg.zero
    print(f"{mem['n_params'] / 1e6:,.1f}M parameters, {t.precision}, ZeRO {z.stage}"
          f"{' + optimizer offload' if z.offload_optimizer else ''}, world size {world}, "
          f"micro batch {mem['micro_batch']} x {cfg.model.block_size} tokens, "
          f"checkpointing {mem['policy']} (GB = 1e9 bytes, per GPU)")
    rows = [("parameters", "parameters"), ("gradients", "gradients"),
            ("fp32 master parameters", "master_params"), ("Adam m + v", "optimizer_states"),
            ("ZeRO buffers", "comm_buffers"), ("activations (saved for backward)", "activations"),
            ("loss backward working memory", "logits"), ("optimizer-step fp32 grads (transient)",
                                                         "step_transient"),
            ("peak allocated (estimate)", "peak"), ("offloaded to CPU", "cpu")]
    for label, key in rows:
        print(f"  {label:<40}{mem[key] / GB:>9.2f}")
    verdict = "fits" if mem["fits"] else "does NOT fit"
    print(f"  {'required (+10%, +2 GB CUDA overhead)':<40}{mem['required'] / GB:>9.2f}"
          f"   {verdict} in {mem['gpu_memory'] / GB:.1f} GB")


def _print_policies(cfg: Config, mem: dict) -> None:
    counts = param_counts(cfg)
    print(f"\nactivations by checkpointing policy at micro batch {mem['micro_batch']} "
          f"(a block keeps {mem['activations_per_layer'] / GB:.3f} GB unless checkpointed, "
          f"{mem['checkpointed_per_layer'] / GB:.3f} GB if it is):")
    print(f"  {'policy':<12}{'activations GB':>15}{'extra FLOPs':>13}")
    for policy in SEARCH_POLICIES:
        act = activation_bytes(cfg, mem["micro_batch"], policy, mem["device"] == "cuda")
        print(f"  {policy:<12}{act / GB:>15.2f}{recompute_share(cfg, policy, counts):>13.0%}")


def _print_recommendations(found: list[dict], world: int, gpu: float, target: int,
                           top: int) -> None:
    print(f"\nfastest configurations for global batch {target} on {world} x {gpu / GB:.1f} GB "
          f"(time per sample relative to the fastest):")
    if not found:
        print("  none fits: raise the ZeRO stage, offload the optimizer or add GPUs")
        return
    print(f"  {'micro':>5} {'accum':>5}  {'policy':<12}{'time':>6}  why")
    for c in found[:top]:
        print(f"  {c['micro_batch']:>5} {c['grad_accum']:>5}  {c['policy']:<12}"
              f"{c['relative']:>6.2f}  {c['why']}")
    if len(found) > top:
        print(f"  ... {len(found) - top} more fit (--top N shows them)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="preset name or YAML file (default: tiny)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. zero.stage=2")
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
