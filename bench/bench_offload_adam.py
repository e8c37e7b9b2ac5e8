"""The optimizer step under zero.offload_optimizer: torch.optim.AdamW vs DeepSpeed's CPU Adam
on the same CPU fp32 parameters, timed in alternation, and the parameters each gives after
the same steps.

What the step sees under offload: ZeRO hands the optimizer its flat fp32 partitions, one
tensor per parameter group (here 98% with weight decay, 2% without, as the harness's groups
split a GPT), gradients already in fp32 on the CPU. Variants:
- torch AdamW as DeepSpeed's torch_adam path builds it with the harness's params (no
  `foreach`, no `fused`): on CPU tensors torch picks its per-tensor loop;
- torch AdamW foreach=True; torch AdamW fused=True (torch's own CPU kernel, no build);
- DeepSpeedCPUAdam (adamw_mode, fp32 states): what `optim.torch_adam=false` gives under
  offload. Its cpu_adam op is JIT-built on first use (compiler and ninja, about a minute;
  cached in TORCH_EXTENSIONS_DIR); the build time is printed.

Threads: OMP_NUM_THREADS (default 1 here, as bench/common.py sets it) is the thread count of
every variant: torch's intra-op pool and the OpenMP loop inside cpu_adam both read it.
Agreement: the same update in fp32 with its operations in another order; Adam's update
depends on the (identical) gradients, not on the parameters except through the decay (a
contraction), so rounding differences do not grow: after N steps each parameter may differ by
a few roundings per step, |dp| <= N x 8 x eps32 x max|p| (checked).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import alternate, bench_parser, median, print_table, save_json  # noqa: E402

HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1
NO_DECAY_SHARE = 0.02


def flat_groups(n: int, seed: int = 0):
    """(initial values, gradient) of the two flat partitions: decay and no-decay."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sizes = (n - int(n * NO_DECAY_SHARE), int(n * NO_DECAY_SHARE))
    return [(torch.randn(k, generator=gen), torch.randn(k, generator=gen) * 1e-2) for k in sizes]


def make_optimizer(kind: str, init):
    """A fresh copy of the partitions with their gradients, and its optimizer."""
    import torch

    params = []
    for value, grad in init:
        p = torch.nn.Parameter(value.clone())
        p.grad = grad  # shared by the variants: read, never written
        params.append(p)
    groups = [{"params": [params[0]], "weight_decay": WEIGHT_DECAY},
              {"params": [params[1]], "weight_decay": 0.0}]
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return params, DeepSpeedCPUAdam(groups, adamw_mode=True, fp32_optimizer_states=True,
                                        **HYPER)
    extra = {"torch": {}, "torch foreach": {"foreach": True}, "torch fused": {"fused": True}}
    return params, torch.optim.AdamW(groups, **HYPER, **extra[kind])


def build_cpu_adam() -> float:
    """Seconds to load (first time: build) the cpu_adam op."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    t0 = time.perf_counter()
    CPUAdamBuilder().load()
    return time.perf_counter() - t0


def agreement(init, kinds: list[str], steps: int) -> dict[str, float]:
    """max |p_kind - p_torch| after `steps` steps from the same start, and the bound."""
    import torch

    ref, ref_opt = make_optimizer("torch", init)
    for _ in range(steps):
        ref_opt.step()
    out = {}
    for kind in kinds:
        params, opt = make_optimizer(kind, init)
        for _ in range(steps):
            opt.step()
        out[kind] = max((a - b).abs().max().item() for a, b in zip(params, ref))
        del params, opt
    scale = max(v.abs().max().item() for v, _ in init)
    out["bound"] = steps * 8 * torch.finfo(torch.float32).eps * scale
    return out


def main() -> None:
    p = bench_parser(__doc__, "1M parameters, 3 rounds")
    p.add_argument("--sizes", default="50,200", help="millions of parameters, e.g. 50,200")
    p.add_argument("--steps", type=int, default=5, help="steps before comparing parameters")
    args = p.parse_args()
    import torch

    sizes = [1] if args.quick else [int(s) for s in args.sizes.split(",")]
    rounds = args.rounds or (3 if args.quick else 7)
    build_s = build_cpu_adam()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    kinds = ["torch", "torch foreach", "torch fused", "cpu_adam"]
    rows, payload = [], {"threads": threads, "cpu_adam_load_s": build_s, "sizes": {}}
    for millions in sizes:
        init = flat_groups(millions * 10**6)
        agree = agreement(init, kinds[1:], args.steps)
        assert all(agree[k] <= agree["bound"] for k in kinds[1:]), agree
        opts = {k: make_optimizer(k, init)[1] for k in kinds}
        times = alternate({k: o.step for k, o in opts.items()}, rounds, warmup=1)
        med = {k: median(v) for k, v in times.items()}
        payload["sizes"][millions] = {"seconds": med, "max_abs_diff": agree}
        for k in kinds:
            rows.append((f"{millions}M", k, f"{med[k] * 1e3:.1f}",
                         f"{med['torch'] / med[k]:.2f}", f"{agree.get(k, 0.0):.2e}"))
        del opts, init
    print_table(["params", "optimizer", "step ms", "speed-up vs torch", f"max|dp| {args.steps} st"],
                rows, title=f"AdamW step on CPU fp32 flat partitions, {threads} thread(s), "
                            f"medians of {rounds} (cpu_adam load {build_s:.1f} s)")
    for millions, r in payload["sizes"].items():
        s = r["seconds"]
        print(f"{millions}M: torch / cpu_adam = {s['torch'] / s['cpu_adam']:.2f}, "
              f"torch fused / cpu_adam = {s['torch fused'] / s['cpu_adam']:.2f}, "
              f"bound on |dp| {r['max_abs_diff']['bound']:.2e}")
    save_json(args.out, payload)


if __name__ == "__main__":
    main()
