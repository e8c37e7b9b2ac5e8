"""`harness plan`'s command line: the printed breakdown, time estimate, policy table and
recommendations (the flags: harness/plan/flags.py; the time model: harness/plan/speed.py, or
with --gpu / --hardware the calibrated throughput model: harness/plan/throughput.py over the
layouts of harness/plan/candidates.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from harness.common.errors import HarnessError
from harness.config import Config, load_config
from harness.model.flops import flops_per_token
from harness.parallel.batch import make_plan
from harness.plan.flags import (MAX_GLOBAL_BATCH, MAX_PEAK_TFLOPS, MAX_TOP, World,
                                add_arguments, float_flag, int_flag, parse_size, parse_tokens,
                                parse_world)
from harness.plan.planner import (GB, SEARCH_POLICIES, activation_bytes, param_counts,
                                  predict_memory, recommend, recompute_share)
from harness.plan.speed import Speed, duration, speed_for, step_seconds

__all__ = ["add_arguments", "parse_size", "run", "main"]


def run(args: argparse.Namespace) -> int:
    hw = None
    if args.gpu is not None or args.hardware is not None:
        for flag, value in (("--gpu-type", args.gpu_type), ("--mfu", args.mfu),
                            ("--peak-tflops", args.peak_tflops)):
            if value is not None:
                raise HarnessError(f"{flag} belongs to the estimate without --gpu; with --gpu "
                                   f"the throughput model predicts speed itself: drop {flag} "
                                   f"(another GPU: describe it with --hardware FILE)")
        from harness.plan.hardware import pick
        hw = pick(args.gpu, args.hardware)
    else:
        for flag, value in (("--json", args.json or None), ("--tokens", args.tokens)):
            if value is not None:
                raise HarnessError(f"{flag} needs --gpu NAME (or --hardware FILE): the "
                                   f"throughput model predicts for a known GPU")
    memory = args.gpu_memory
    if memory is None:
        memory = "80GB" if hw is None else f"{hw.memory_bytes:.0f}"
    gpu = parse_size(memory)
    top = int_flag(args.top, "--top", MAX_TOP, "how many recommendations to show, e.g. 10")
    target = None
    if args.target_global_batch is not None:
        target = int_flag(args.target_global_batch, "--target-global-batch", MAX_GLOBAL_BATCH,
                          "samples per optimizer step, e.g. 512")
    mfu = peak = None
    if args.mfu is not None:
        mfu = float_flag(args.mfu, "--mfu", 0, 1, "the assumed fraction of peak, e.g. 0.4")
    if args.peak_tflops is not None:
        peak = float_flag(args.peak_tflops, "--peak-tflops", 0, MAX_PEAK_TFLOPS,
                          "one GPU's dense TFLOP/s at train.precision, e.g. 989")
    cfg = load_config(args.config, args.overrides)
    world = parse_world(args, cfg.parallel.tp_size)
    if target is None:
        target = cfg.train.global_batch_size  # range-checked by the config
    if target is None:
        try:
            target = make_plan(cfg, world.size).batch.global_batch
        except HarnessError as err:
            raise HarnessError(f"pass --target-global-batch ({err})") from None
    if hw is not None:
        tokens = None if args.tokens is None else parse_tokens(args.tokens)
        return _throughput(cfg, world, hw, gpu, target, tokens, top, args.json)
    speed = speed_for(args.gpu_type, cfg.train.precision, mfu, peak)
    mem = predict_memory(cfg, world.size, gpu_memory_bytes=gpu)
    _print_breakdown(cfg, world, mem)
    _print_time(cfg, world.size, mem, speed)
    _print_policies(cfg, mem)
    _print_recommendations(recommend(cfg, world.size, gpu, target, speed), world, gpu, target,
                           top, speed, cfg)
    return 0


def _print_breakdown(cfg: Config, world: World, mem: dict) -> None:
    t, z = cfg.train, cfg.zero
    print(f"{mem['n_params'] / 1e6:,.1f}M parameters, {t.precision}, ZeRO {z.stage}"
          f"{' + optimizer offload' if z.offload_optimizer else ''}, "
          f"{world.describe(cfg.parallel.tp_size)}, "
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


def _print_time(cfg: Config, world: int, mem: dict, speed: Speed) -> None:
    """The config as given: seconds per step, tokens per second, and train.max_steps."""
    print("\ntime per step, an estimate (not a measurement):")
    print(f"  {speed.describe(cfg.train.precision)}")
    if not speed.absolute:
        return
    try:
        plan = make_plan(cfg, world)
    except HarnessError as err:
        print(f"  not for this config at this world size: {err}")
        return
    counts = param_counts(cfg)
    step = step_seconds(plan.tokens_per_step, flops_per_token(cfg.model, counts["total"]),
                        recompute_share(cfg, mem["policy"], counts), plan.batch.grad_accum,
                        world, speed)
    total = step * cfg.train.max_steps
    print(f"  {step:.3g} s per step of {plan.tokens_per_step:,} tokens "
          f"({plan.tokens_per_step / step:,.0f} tokens/s); train.max_steps="
          f"{cfg.train.max_steps:,}: {duration(total)} ({total * world / 3600:,.0f} GPU-hours)")


def _print_recommendations(found: list[dict], world: World, gpu: float, target: int,
                           top: int, speed: Speed, cfg: Config) -> None:
    unit = "estimated seconds per step, and" if speed.absolute else "time per step"
    print(f"\nfastest configurations for global batch {target} on {world.size} x "
          f"{gpu / GB:.1f} GB ({unit} relative to the fastest):")
    if not found:
        print("  none fits: raise the ZeRO stage, offload the optimizer or add GPUs")
        return
    print(f"  {'micro':>5} {'accum':>5}  {'policy':<12}{'s/step':>8}{'relative':>9}  why")
    for c in found[:top]:
        step = f"{c['step_s']:.3g}" if speed.absolute else "-"
        print(f"  {c['micro_batch']:>5} {c['grad_accum']:>5}  {c['policy']:<12}{step:>8}"
              f"{c['relative']:>9.2f}  {c['why']}")
    if len(found) > top:
        print(f"  ... {len(found) - top} more fit (--top N shows them)")
    if speed.absolute:
        total = found[0]["step_s"] * cfg.train.max_steps
        print(f"  the fastest: train.max_steps={cfg.train.max_steps:,} in about "
              f"{duration(total)} (an estimate)")


def _throughput(cfg: Config, world: World, hw, gpu: float, target: int,
                tokens: int | None, top: int, as_json: bool) -> int:
    """--gpu: the config as given, then every layout that fits, fastest first."""
    from harness.plan import candidates
    from harness.plan.throughput import HELD_OUT_ERROR

    given = candidates.as_configured(cfg, world, hw, gpu, target)
    found = candidates.search(cfg, world, hw, gpu, target)
    tokens = tokens or cfg.train.max_steps * given["tokens_per_step"]
    if as_json:
        keys = ("as_configured", "zero_stage", "tp", "micro_batch", "grad_accum", "policy",
                "fits", "step_time_s", "tokens_per_s_per_gpu", "mfu", "limiter")
        for r in [given] + found:
            print(json.dumps({k: r[k] for k in keys}))
        return 0
    mem = predict_memory(cfg, world.size, gpu_memory_bytes=gpu)
    _print_breakdown(cfg, world, mem)
    _print_policies(cfg, mem)
    print(f"\npredicted on {world.describe(cfg.parallel.tp_size).split(' = ')[0]} x {hw.name} "
          f"({gpu / GB:.0f} GB), global batch {target} x {cfg.model.block_size} tokens;")
    print(f"time for {tokens:,} tokens. A model, not a measurement (harness/plan/throughput.py; "
          f"published runs it did not\nsee are predicted within {HELD_OUT_ERROR[0]:.0%} "
          f"median, {HELD_OUT_ERROR[1]:.0%} at most: docs/plan.md):")
    print(f"  {'':<15}{'zero':>4}{'tp':>4}{'micro':>6}{'accum':>6}  {'policy':<12}"
          f"{'s/step':>8}{'tok/s/GPU':>11}{'MFU':>6}{'time':>11}  limiter")
    for r in [given] + found[:top]:
        label = "as configured" if r["as_configured"] else ""
        if r["as_configured"] and not r["fits"]:
            label = "as configured*"
        days = duration(tokens / (r["tokens_per_s_per_gpu"] * world.size))
        print(f"  {label:<15}{r['zero_stage']:>4}{r['tp']:>4}{r['micro_batch']:>6}"
              f"{r['grad_accum']:>6}  {r['policy']:<12}{r['step_time_s']:>8.3g}"
              f"{r['tokens_per_s_per_gpu']:>11,.0f}{r['mfu']:>6.0%}{days:>11}  {r['limiter']}")
    if not given["fits"]:
        print("  * the config as given does NOT fit in the GPU's memory (the breakdown above)")
    if not found:
        print("  none fits: offload the optimizer, shorten the sequence or add GPUs")
    elif len(found) > top:
        print(f"  ... {len(found) - top} more fit (--top N shows them)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness plan", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
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
