"""ZeRO 3 pre-clip norms: the flat-partition read (GradNorms.local_squares) vs DeepSpeed's
per-parameter accessor (get_local_fp32_grad_for_param per parameter, the path before issue 23
item 9), on one real engine's accumulated gradients, timed in alternation.

On a CPU the accessor's stream sync and copy are no-ops, so this measures the Python cost per
parameter plus the arithmetic; on a GPU each call also synchronises, and with offload copies
the CPU partition to the GPU (not measured here).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import alternate, bench_parser, median, print_table, save_json  # noqa: E402


def per_parameter(trainer):
    """The old path: each parameter's partition through DeepSpeed's accessor, then the same
    foreach norm and per-group sums as local_squares."""
    import torch

    norms, opt = trainer.norms, trainer.engine.optimizer
    grads = [(opt.get_local_fp32_grad_for_param(p), i) for i, p in norms.params]
    sq = torch.zeros(len(norms.groups), dtype=torch.float64, device=trainer.engine.device)
    out = torch.stack(torch._foreach_norm([g for g, _ in grads], 2, dtype=torch.float32))
    sq.index_add_(0, norms._device_index(tuple(i for _, i in grads)), out.double() ** 2)
    return sq


def main() -> None:
    p = bench_parser(__doc__, "2 layers, 20 rounds")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.n_layer=24")
    args = p.parse_args()
    import torch

    from harness.config import load_config
    from harness.train.engine import build
    from harness.train.trainer import Trainer

    from common import synthetic_data

    rounds = args.rounds or (20 if args.quick else 300)
    layers = 2 if args.quick else 12
    rows, payload = [], {}
    for offload in (False, True):
        cfg = load_config("tiny", [f"model.n_layer={layers}", "zero.stage=3", "train.max_steps=20",
                                   "optim.warmup_steps=1",
                                   "train.global_batch_size=8", "train.micro_batch_size=8",
                                   f"zero.offload_optimizer={str(offload).lower()}",
                                   *args.overrides])
        built = build(cfg)
        trainer = Trainer(cfg, built, synthetic_data(cfg, 8), [])
        trainer._forward_backward()
        flat, old = trainer.norms.local_squares(), per_parameter(trainer)
        assert torch.allclose(flat, old, rtol=1e-6), (flat, old)
        times = alternate({"flat": trainer.norms.local_squares,
                           "per_parameter": lambda: per_parameter(trainer)}, rounds, warmup=5)
        med = {k: median(v) for k, v in times.items()}
        name = "offload" if offload else "on device"
        payload[name] = {"params": len(trainer.norms.params), **med,
                         "ratio": med["per_parameter"] / med["flat"]}
        rows.append((name, len(trainer.norms.params), f"{med['per_parameter'] * 1e3:.3f}",
                     f"{med['flat'] * 1e3:.3f}", f"{payload[name]['ratio']:.2f}"))
    print_table(["ZeRO 3", "params", "per-param ms", "flat ms", "per-param / flat"], rows,
                title=f"local_squares, tiny preset with {layers} layers, {rounds} rounds, medians")
    save_json(args.out, payload)


if __name__ == "__main__":
    main()
