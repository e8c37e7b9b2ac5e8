"""Shared by the bench scripts: interleaved timing, medians, tables, JSON output.

Timings on a shared machine drift (other processes, CPU clocks, caches). Measuring the
variants in alternation, A B A B ..., with the order flipped every round, exposes them to the
same drift, so their ratio is far steadier than two back-to-back timing runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Sequence

# one thread each: CI has 2 cores shared by everything; set before torch is imported
os.environ.setdefault("OMP_NUM_THREADS", "1")

MB = 2**20


def bench_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The flags every timed bench takes: --quick (what CI runs), --rounds, --out."""

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per variant")
    p.add_argument("--out", default=None, help="write the results as JSON")
    return p


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(variants: dict[str, Callable[[], object]], rounds: int,
              warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, measured in alternation (order reversed on odd
    rounds so no variant always runs right after the same one); warm-up rounds discarded."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = timed(variants[name])
            if r >= warmup:
                times[name].append(t)
    return times


class CpuTimer:
    """Thread CPU time spent inside the wrapped methods, e.g. a callback's hooks. CPU time, not
    wall time: other processes on a shared machine would otherwise inflate short sections
    unevenly. (On a GPU this counts launch time only: synchronize inside for device time.)"""

    def __init__(self, *methods: tuple[object, str]):
        self.seconds = 0.0
        for obj, name in methods:
            setattr(obj, name, self._timed(getattr(obj, name)))

    def _timed(self, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - t0
        return wrapper


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                title: str = "") -> None:
    """Right-aligned columns sized to their widest cell; floats keep what the caller gave."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(title)
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def save_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def one_micro_step(micro: int) -> list[str]:
    """Overrides for global batch = micro batch, whatever the preset sets (all three agree)."""
    return [f"train.global_batch_size={micro}", f"train.micro_batch_size={micro}",
            "train.grad_accum_steps=1"]


def synthetic_data(cfg, micro: int, device: str = "cpu", n_samples: int = 256):
    """Random tokens cut into cfg.model.block_size samples, drawn by the harness's sampler."""
    import numpy as np

    from harness.data.sampler import GlobalSampler
    from harness.data.shards import Sequences
    from harness.data.sources import TrainData

    m = cfg.model
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, n_samples * m.block_size + 1)
    seqs = Sequences(tokens.astype(np.int64), m.block_size)
    return TrainData(seqs, GlobalSampler(len(seqs), cfg.train.seed, micro, 0, 1), device)
