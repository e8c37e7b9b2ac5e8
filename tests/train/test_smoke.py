"""Smoke test: the tiny preset in bf16, ZeRO 1, every layer checkpointed, on CPU and on GPU.

The same body runs on both devices. CI has no GPU: the `gpu` case is skipped there and runs
wherever `torch.cuda.is_available()` (`make test ARGS="-m gpu"`).
"""
import math

import pytest
import torch
from engine_utils import Record

from harness.config import load_config
from harness.train.run import make_trainer

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]),
]


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_bf16_zero1_checkpointed(tmp_path, shards_dir, device):
    cfg = load_config("tiny", [f"train.device={device}", "train.precision=bf16", "zero.stage=1",
                               "activation_checkpointing.policy=every_layer",
                               "train.max_steps=30", f"train.run_dir={tmp_path}",
                               f"data.out_dir={shards_dir}", "checkpoint.every=0"])
    trainer, _ = make_trainer(cfg)
    keep = Record()
    trainer.callbacks.append(keep)
    trainer.fit()
    seen = keep.metrics
    assert trainer.engine.device.type == device
    assert next(trainer.engine.module.parameters()).dtype == torch.bfloat16
    assert len(seen) == 30
    assert all(math.isfinite(m["optim/grad_norm_preclip"]) for m in seen)
    first, last = seen[0]["train/loss"], sum(m["train/loss"] for m in seen[-5:]) / 5
    assert last < first - 0.5, (first, last)
    if device == "cuda":
        assert seen[-1]["memory/gpu_max_allocated_gb"] > 0
        if "throughput/mfu" in seen[-1]:
            assert 0 < seen[-1]["throughput/mfu"] < 1
    else:
        assert seen[-1]["memory/cpu_rss_gb"] > 0
