"""Data pipeline throughput: `prepare-data` MB/s with 1 and 2 workers, and loader tokens/s.

    OMP_NUM_THREADS=1 python bench/bench_data.py [--quick]

Prepare runs on the built-in corpus (stdlib sources) capped at --max-mb; "train + encode"
includes tokenizer training, "encode only" reuses the first run's tokenizer.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from harness.data import prepare as prep
from harness.data.config import DataConfig
from harness.data.shards import TokenShards


def prepare_mb_per_s(cfg: DataConfig) -> float:
    start = time.perf_counter()
    out_dir = prep.prepare_data(cfg, progress=False)
    seconds = time.perf_counter() - start
    return TokenShards.open(out_dir).manifest["source_bytes"] / 1e6 / seconds


def loader_tokens_per_s(shards: TokenShards, seq_len: int, batch: int, seconds: float) -> float:
    """Input tokens/s of random fixed-length training batches, memmap -> torch int64."""
    import torch  # here, not at the top: spawned prepare workers re-import this script

    seqs = shards.sequences("train", seq_len)
    rng = np.random.default_rng(0)
    tokens, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        sample = torch.from_numpy(seqs.batch(rng.integers(0, len(seqs), batch)))
        inputs, _targets = sample[:, :-1], sample[:, 1:]
        tokens += inputs.numel()
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run: 0.5 MB, 0.5 s loader")
    parser.add_argument("--max-mb", type=float, default=4.0)
    args = parser.parse_args()
    max_bytes = int((0.5 if args.quick else args.max_mb) * 2**20)
    prep.PARALLEL_MIN_BYTES = 0  # measure the workers whatever the input size
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for workers in (1, 2):
            for reuse in (False, True):
                model = f"{tmp}/t1_0/tokenizer.model" if reuse else None
                cfg = DataConfig(out_dir=f"{tmp}/t{workers}_{int(reuse)}", max_bytes=max_bytes,
                                 num_workers=workers, tokenizer_model=model)
                runs[workers, reuse] = prepare_mb_per_s(cfg)
                what = "encode only" if reuse else "train + encode"
                print(f"prepare {max_bytes / 2**20:.1f} MB, {workers} worker(s), {what}: "
                      f"{runs[workers, reuse]:.2f} MB/s")
        shards = TokenShards.open(f"{tmp}/t1_0")
        rate = loader_tokens_per_s(shards, 256, 16, 0.5 if args.quick else 3.0)
        print(f"loader seq_len 256 batch 16: {rate:,.0f} tokens/s")


if __name__ == "__main__":
    main()
