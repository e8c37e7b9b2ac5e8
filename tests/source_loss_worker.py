"""One rank of tests/train/test_source_losses.py's 2-rank case, started by torchrun; also holds
the tests' mixture data (MixData).

usage: source_loss_worker.py --cases CASES.json OUT_DIR   (JSON {case id: [key=value, ...]})
Trains the engine_utils tiny config on MixData with the real engine (Trainer.fit) and writes
rank R's per-step metrics to OUT_DIR/<case id>/rankR.pt (tests/batched.py).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from batched import run_cases
from engine_utils import Record, build, small_cfg

from harness.config import Config
from harness.data.sampler import GlobalSampler
from harness.data.shards import Sequences
from harness.data.sources import TrainData

# the sources: uniform tokens, a narrow band of the vocab (an easier source), and one that has
# no samples at all (its key must never appear)
NAMES = ("web", "code", "empty")


def source_tokens(vocab: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of every source back to back, each source's first sample index and the end)."""
    rng = np.random.default_rng(0)
    web = rng.integers(0, vocab, size=96 * seq_len)
    code = rng.integers(0, 8, size=64 * seq_len) + 3
    parts = [web, code, np.zeros(0, np.int64)]
    bounds = np.cumsum([0] + [len(p) // seq_len for p in parts])
    return np.concatenate([*parts, [0]]).astype(np.int64), bounds


class MixData(TrainData):
    """A TrainData of a mixture of real sequences: the sources' tokens back to back in one
    Sequences, the plain GlobalSampler over them, and each row's source the part its sample
    falls in (written here, not harness.data.mixture's sampler: the metric needs only
    TrainData's interface, source_names and sources()). Row i of source c covers its own
    tokens except the last target of a source's last sample, the next source's first token."""

    def __init__(self, cfg: Config, micro: int, rank: int = 0, dp: int = 1):
        tokens, self.bounds = source_tokens(cfg.model.vocab_size, cfg.model.block_size)
        seqs = Sequences(tokens, cfg.model.block_size)
        super().__init__(seqs, GlobalSampler(len(seqs), cfg.train.seed, micro, rank, dp), "cpu")
        self.source_names = NAMES

    def sources(self, consumed: int, micro_step: int) -> np.ndarray:
        idx = self.sampler.indices(consumed, micro_step)
        return np.searchsorted(self.bounds, idx, side="right") - 1

    def plain(self) -> TrainData:
        """The same samples without a mixture (no source_names): the harness's old path."""
        return TrainData(self.sequences, self.sampler, "cpu")


def train(out: Path, overrides: list[str]) -> None:
    cfg = small_cfg(*overrides)
    built = build(cfg)
    b = built.plan.batch
    rec = Record()
    from harness.train.trainer import Trainer

    data = MixData(cfg, b.micro_batch, built.plan.dp_rank(built.dist.rank), b.dp_size)
    Trainer(cfg, built, data, [rec]).fit()
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"metrics": rec.metrics}, out / f"rank{built.dist.rank}.pt")


def main() -> None:
    from harness.train.run import leave_together

    run_cases(sys.argv[1:], train)
    leave_together()


if __name__ == "__main__":
    main()
