"""`harness train`: config -> engine -> data -> callbacks -> fit, and the run directory."""
from __future__ import annotations

import logging
from pathlib import Path

from harness.callbacks.loggers import Console, MetricsFile
from harness.config import Config, to_yaml
from harness.data.sampler import GlobalSampler
from harness.data.sources import TokenSequences, TrainData, stdlib_bytes
from harness.ds_config import dumps
from harness.engine import Built, build
from harness.errors import HarnessError
from harness.trainer import Trainer

log = logging.getLogger("harness")


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.train.run_dir)
    if (run_dir / "metrics.jsonl").exists():
        raise HarnessError(f"train.run_dir={run_dir} already holds a run (metrics.jsonl): "
                           f"choose another train.run_dir or remove it")
    return run_dir


def write_run_files(run_dir: Path, cfg: Config, built: Built) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "ds_config.json").write_text(dumps(built.ds_config))


def build_data(cfg: Config, built: Built) -> TrainData:
    tokens = stdlib_bytes()
    if cfg.model.vocab_size < 256:
        raise HarnessError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                           f"byte-level corpus' 256 symbols: set model.vocab_size=256")
    seqs = TokenSequences(tokens, cfg.model.block_size)
    sampler = GlobalSampler(len(seqs), cfg.train.seed, built.plan.batch.micro_batch,
                            built.dist.rank, built.dist.world_size)
    return TrainData(seqs, sampler, built.engine.device)


def train(cfg: Config) -> Trainer:
    run_dir = prepare_run_dir(cfg)
    built = build(cfg)
    if built.dist.rank == 0:
        write_run_files(run_dir, cfg, built)
    data = build_data(cfg, built)
    callbacks = [MetricsFile(run_dir), Console(cfg.train.log_every)]
    trainer = Trainer(cfg, built, data, callbacks)
    trainer.fit()
    return trainer
