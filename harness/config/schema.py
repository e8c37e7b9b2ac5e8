"""The root of the config: one field per section, each section's dataclass in its own module."""
from __future__ import annotations

from dataclasses import dataclass, field

from harness.config.checkpoint import CheckpointConfig
from harness.config.data import DataConfig
from harness.config.model import ModelConfig
from harness.config.monitor import MonitorConfig
from harness.config.slurm import SlurmConfig
from harness.config.train import (ActivationCheckpointingConfig, ClipConfig, Fp16Config,
                                  OptimConfig, ParallelConfig, TrainConfig, ZeroConfig)
from harness.config.wandb import WandbConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    fp16: Fp16Config = field(default_factory=Fp16Config)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
