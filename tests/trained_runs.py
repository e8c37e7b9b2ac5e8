"""Small trained runs for the after-training tests (eval, sample, export, init_from): a real
`harness` run directory with a DeepSpeed checkpoint, trained in-process for a couple of steps.

Tiny shapes so that each costs about a second after DeepSpeed's first import.
"""
from __future__ import annotations

from pathlib import Path

from harness.config import load_config
from harness.train.run import make_trainer

BASE = ["model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.block_size=64",
        "model.vocab_size=512", "train.global_batch_size=4", "train.micro_batch_size=4",
        "train.max_steps=2", "optim.warmup_steps=1", "optim.lr=1e-2", "checkpoint.every=0",
        "data.eval_every=0", "wandb.mode=disabled"]
VARIANTS = {
    "gpt2": [],
    "llama": ["model.arch=llama", "model.n_kv_head=2", "model.ffn_hidden=96", "model.bias=false",
              "model.rope_theta=5000.0"],
    "llama_untied": ["model.arch=llama", "model.n_kv_head=1", "model.ffn_hidden=96",
                     "model.bias=false", "model.tie_embeddings=false"],
}


def train_run(run_dir: Path, shards_dir: Path, *overrides: str) -> Path:
    """Train BASE + overrides into run_dir; returns run_dir (its checkpoint is the last step)."""
    cfg = load_config("tiny", [*BASE, *overrides, f"train.run_dir={run_dir}",
                               f"data.out_dir={shards_dir}"])
    trainer, _ = make_trainer(cfg)
    trainer.fit()
    return Path(run_dir)
