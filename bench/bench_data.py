"""Data pipeline throughput: `prepare-data` MB/s with 1 and 2 workers, and loader tokens/s
against the tiny model's training tokens/s measured in the same run (target: >= 100x).

    OMP_NUM_THREADS=1 python bench/bench_data.py [--quick]

Prepare runs on the built-in corpus (stdlib sources) capped at --max-mb; "train + encode"
includes tokenizer training, "encode only" reuses the first run's tokenizer.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from harness.config.data import DataConfig
from harness.data import prepare as prep
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


def training_tokens_per_s(shards_dir: str, run_dir: str, steps: int) -> float:
    """The tiny preset's training throughput on these shards (median over `steps` steps)."""
    import statistics

    from harness.common.callback import Callback
    from harness.config import load_config
    from harness.train.run import make_trainer

    class Rates(Callback):
        def __init__(self):
            self.rates = []

        def on_step_end(self, trainer, step, metrics):
            self.rates.append(metrics["throughput/tokens_per_s"])

    cfg = load_config("tiny", [f"data.out_dir={shards_dir}", f"train.run_dir={run_dir}",
                               f"train.max_steps={steps + 2}", "optim.warmup_steps=1",
                               "checkpoint.every=0",
                               "monitor.enabled=false", "data.eval_every=0"])
    trainer, _ = make_trainer(cfg)
    rates = Rates()
    trainer.callbacks.append(rates)
    trainer.fit()
    return statistics.median(rates.rates[2:])  # the first steps include warm-up


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
        rate = loader_tokens_per_s(shards, 128, 8, 0.5 if args.quick else 3.0)
        train = training_tokens_per_s(f"{tmp}/t1_0", f"{tmp}/run", 3 if args.quick else 10)
        print(f"loader (tiny shapes: seq_len 128, micro batch 8): {rate:,.0f} tokens/s")
        print(f"tiny model training:                           {train:,.0f} tokens/s")
        print(f"loader / training: {rate / train:,.0f}x (target >= 100x)")


if __name__ == "__main__":
    main()
