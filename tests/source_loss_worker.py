"""One rank of tests/train/test_source_losses.py's 2-rank case, started by torchrun; also holds
the tests' mixture data (mix_data).

usage: source_loss_worker.py --cases CASES.json OUT_DIR   (JSON {case id: [key=value, ...]})
Trains the engine_utils tiny config on mix_data with the real engine (Trainer.fit) and writes
rank R's per-step metrics to OUT_DIR/<case id>/rankR.pt (tests/batched.py).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from batched import run_cases
from engine_utils import Record, build, small_cfg

from harness.config import Config
from harness.data.mixture import MixedSequences, MixtureSampler
from harness.data.shards import Sequences
from harness.data.sources import TrainData

# the sources: uniform tokens, a narrow band of the vocab (an easier source), and a rare one
NAMES = ("web", "code", "rare")
SHARES = (0.6, 0.39, 0.01)


def source_sequences(vocab: int, seq_len: int) -> list[Sequences]:
    rng = np.random.default_rng(0)
    return [Sequences(rng.integers(0, vocab, size=96 * seq_len + 1), seq_len),
            Sequences(rng.integers(0, 8, size=64 * seq_len + 1) + 3, seq_len),
            Sequences(rng.integers(0, vocab, size=8 * seq_len + 1), seq_len)]


def mix_data(cfg: Config, micro: int, rank: int = 0, dp: int = 1) -> TrainData:
    """The harness's mixture data (harness.data.mixture) over three sources' real sequences,
    drawn with SHARES: TrainData's source_names and sources() are the mixture's."""
    parts = source_sequences(cfg.model.vocab_size, cfg.model.block_size)
    sampler = MixtureSampler(NAMES, [len(p) for p in parts], [(0, SHARES)], cfg.train.seed,
                             micro, rank, dp)
    return TrainData(MixedSequences(NAMES, parts), sampler, "cpu")


def without_sources(data: TrainData) -> TrainData:
    """The same samples with no source_names: the trainer's path without a mixture."""
    plain = TrainData(data.sequences, data.sampler, "cpu")
    plain.source_names = ()
    return plain


def train(out: Path, overrides: list[str]) -> None:
    cfg = small_cfg(*overrides)
    built = build(cfg)
    b = built.plan.batch
    rec = Record()
    from harness.train.trainer import Trainer

    data = mix_data(cfg, b.micro_batch, built.plan.dp_rank(built.dist.rank), b.dp_size)
    Trainer(cfg, built, data, [rec]).fit()
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"metrics": rec.metrics}, out / f"rank{built.dist.rank}.pt")


def main() -> None:
    from harness.train.run import leave_together

    run_cases(sys.argv[1:], train)
    leave_together()


if __name__ == "__main__":
    main()
