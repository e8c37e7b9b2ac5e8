"""Checkpoint size, save time and load time for the tiny and gpt2-small presets (CPU).

    python bench/bench_checkpoint.py [--quick] [--out FILE.json]

Each preset trains 2 steps (micro batch 1, so gpt2-small fits a CPU), then saves through the
harness's Checkpointer (DeepSpeed state + RNG + meta, written to a temporary directory and
renamed) and loads it back, 3 times each. --quick: the tiny preset only.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import MB, median, print_table, timed


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(preset: str, shards: str, tmp: str, rounds: int) -> list:
    from harness.checkpoint.checkpointer import load
    from harness.config import load_config
    from harness.train.run import make_trainer

    cfg = load_config(preset, [f"data.out_dir={shards}", f"train.run_dir={tmp}/{preset}",
                               "train.global_batch_size=1", "train.micro_batch_size=1",
                               "train.max_steps=2", "optim.warmup_steps=1", "train.device=cpu",
                               "data.vocab_size=512", "data.allow_toy_corpus=true",
                               "checkpoint.every=0", "checkpoint.keep_last=1",
                               "data.eval_every=0", "monitor.enabled=false"])
    trainer, ckpt = make_trainer(cfg)
    trainer.fit()  # also saves once at the end
    saves = [timed(lambda: ckpt.save(trainer)) for _ in range(rounds)]
    path = ckpt.find_resume()
    loads = [timed(lambda: load(trainer, path)) for _ in range(rounds)]
    n_params = sum(p.numel() for p in trainer.engine.module.parameters())
    return [preset, f"{n_params / 1e6:.1f}M", cfg.train.precision, f"ZeRO {cfg.zero.stage}",
            f"{_size(path) / MB:.1f}", f"{median(saves):.2f}", f"{median(loads):.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    from harness.config.data import DataConfig
    from harness.data.prepare import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        shards = f"{tmp}/shards"
        prepare_data(DataConfig(out_dir=shards, max_bytes=2_000_000, vocab_size=512),
                     progress=False)
        presets = ["tiny"] if args.quick else ["tiny", "gpt2-small"]
        rows = [measure(p, shards, tmp, 1 if args.quick else 3) for p in presets]
    headers = ["preset", "params", "precision", "zero", "size MiB", "save s", "load s"]
    print_table(headers, rows, "checkpoint size and time (CPU, this machine's disk)")
    if args.out:
        Path(args.out).write_text(json.dumps([dict(zip(headers, r)) for r in rows], indent=2))


if __name__ == "__main__":
    main()
