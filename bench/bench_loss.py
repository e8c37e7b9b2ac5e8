"""The plain loss's vocab passes: the old form (F.cross_entropy, then torch.logsumexp again for
the stats) against harness.model.loss.ce_and_lse (one log_softmax serves both), forward +
backward on given fp32 logits, with z_loss = 0 and > 0.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_loss.py [--quick] [--rounds N] [--out F]

Time: median seconds, the variants measured in alternation (common.alternate). Memory: the
process's peak resident bytes above what it held before the call (the kernel's high-water
mark, reset through /proc/self/clear_refs), and the bytes autograd saved for backward
(harness.model.memory.SavedActivations). The head's matmul is left out: it is the same in
both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from common import MB, alternate, bench_parser, median, print_table, ratio, save_json

from harness.model.loss import _stats, _z_term, ce_and_lse
from harness.model.memory import SavedActivations

FULL = {"tokens": 4096, "vocab": 50257, "rounds": 5}
QUICK = {"tokens": 256, "vocab": 50257, "rounds": 2}
Z = (0.0, 1e-4)


def old_loss(logits, targets, z_loss):
    """plain_loss's tail before issue 23 item 12b."""
    ce = F.cross_entropy(logits, targets)
    lse = torch.logsumexp(logits if z_loss > 0 else logits.detach(), dim=-1)
    return ce + _z_term(z_loss, lse), _stats(ce, lse)


def new_loss(logits, targets, z_loss):
    ce, lse = ce_and_lse(logits, targets)
    return ce + _z_term(z_loss, lse), _stats(ce, lse)


def step(fn, raw, targets, z_loss, meter=None):
    """The logits are a fresh buffer that only the loss can keep alive, as the head's matmul
    output is (a clone: its backward keeps nothing)."""
    x = raw.detach().requires_grad_()
    if meter is None:
        fn(x.clone(), targets, z_loss)[0].backward()
        return
    with meter:
        fn(x.clone(), targets, z_loss)[0].backward()


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_rss(fn) -> int:
    """Resident bytes fn() adds at its peak (Linux: large tensors are their own mmaps,
    returned when freed, so the high-water mark follows the live tensors)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _kib("VmRSS:")
    fn()
    return (_kib("VmHWM:") - before) * 1024


def main() -> None:
    args = bench_parser(__doc__, "256 tokens, 2 rounds").parse_args()
    size = QUICK if args.quick else FULL
    rounds = args.rounds or size["rounds"]
    g = torch.Generator().manual_seed(0)
    raw = 3 * torch.randn(size["tokens"], size["vocab"], generator=g)
    targets = torch.randint(0, size["vocab"], (size["tokens"],), generator=g)
    fns = {"old": old_loss, "new": new_loss}
    rows, out = [], {"tokens": size["tokens"], "vocab": size["vocab"], "rounds": rounds}
    for z in Z:
        times = alternate({n: (lambda f=f: step(f, raw, targets, z)) for n, f in fns.items()},
                          rounds)
        res = {}
        for name, fn in fns.items():
            meter = SavedActivations()
            rss = peak_rss(lambda: step(fn, raw, targets, z, meter))
            res[name] = {"s": median(times[name]), "peak_rss": rss, "saved": meter.peak}
        o, n = res["old"], res["new"]
        rows.append([z, f"{o['s']:.3f}", f"{n['s']:.3f}", ratio(o["s"], n["s"]),
                     f"{o['peak_rss'] / MB:.0f}", f"{n['peak_rss'] / MB:.0f}",
                     ratio(o["peak_rss"], n["peak_rss"]),
                     f"{o['saved'] / MB:.0f}", f"{n['saved'] / MB:.0f}"])
        out[f"z={z}"] = res
    print_table(["z_loss", "old s", "new s", "old/new", "old peak MiB", "new peak MiB",
                 "old/new", "old saved MiB", "new saved MiB"], rows,
                f"loss forward + backward, {size['tokens']} tokens x vocab {size['vocab']} fp32 "
                f"logits, median of {rounds}")
    save_json(args.out, out)


if __name__ == "__main__":
    main()
