"""The sampler's start-up time and memory against the number of samples: the stored
permutation it replaced (np.random.default_rng([seed, epoch]).permutation(n), 8 B per sample
on every rank) vs the computed one (harness.data.sampler, a keyed Feistel bijection).

    .venv/bin/python bench/bench_sampler.py [--quick] [--max-stored 1e7] [--out FILE.json]

"start" is the first micro-batch's indices from a fresh sampler (what every start, resume and
epoch pays); "per micro-batch" the median of the next ones; "peak MiB" tracemalloc's peak over
the start (numpy's arrays are traced). The stored permutation is measured up to --max-stored
samples (1e8 would need 800 MB), the computed one up to 1e12.
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
from common import MB, bench_parser, median, print_table, save_json

from harness.data.sampler import GlobalSampler

SEED, MICRO = 1234, 8


def stored_start(n: int) -> np.ndarray:
    """The old sampler's first micro-batch: a permutation of all n samples, then 8 of them."""
    perm = np.random.default_rng([SEED, 0]).permutation(n)
    return perm[np.arange(MICRO)]


def measure(start, per_batch) -> tuple[float, float, float]:
    """(start seconds, peak MiB of the start, median seconds per later micro-batch)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    state = start()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / MB
    tracemalloc.stop()
    times = []
    for k in range(1, 200):
        t0 = time.perf_counter()
        per_batch(state, k)
        times.append(time.perf_counter() - t0)
    return seconds, peak, median(times)


def main() -> None:
    parser = bench_parser(__doc__, "n up to 1e5 stored, 1e9 computed (seconds)")
    parser.add_argument("--max-stored", type=float, default=1e7)
    args = parser.parse_args()
    GlobalSampler(10, 0, MICRO, 0, 1).indices(0, 0)  # numpy's lazy imports, not measured
    sizes = [10**4, 10**5, 10**6, 10**7, 10**8, 10**9, 10**12]
    if args.quick:
        sizes = [10**4, 10**5, 10**9]
    max_stored = 1e5 if args.quick else args.max_stored
    rows, results = [], []
    for n in sizes:
        def computed():
            sampler = GlobalSampler(n, SEED, MICRO, 0, 1)
            sampler.indices(0, 0)
            return sampler

        new = measure(computed, lambda s, k: s.indices(k * MICRO, 0))
        old = (measure(lambda: np.random.default_rng([SEED, 0]).permutation(n),
                       lambda perm, k: perm[np.arange(k * MICRO, (k + 1) * MICRO) % n])
               if n <= max_stored else None)
        results.append({"n": n, "computed": new, "stored": old})
        rows.append([f"{n:.0e}",
                     f"{old[0] * 1e3:.1f}" if old else "-", f"{new[0] * 1e3:.2f}",
                     f"{old[0] / new[0]:.1f}x" if old else "-",
                     f"{old[1]:.1f}" if old else f"({n * 8 / MB:.0f})", f"{new[1]:.3f}",
                     f"{old[2] * 1e6:.1f}" if old else "-", f"{new[2] * 1e6:.1f}"])
    print_table(["samples", "start ms stored", "start ms computed", "start ratio",
                 "peak MiB stored", "peak MiB computed", "us/micro stored",
                 "us/micro computed"], rows,
                title=f"sampler start-up and memory (micro batch {MICRO}; stored columns in "
                      f"parentheses: 8 B x n, not measured)")
    save_json(args.out, {"micro": MICRO, "results": results})


if __name__ == "__main__":
    main()
