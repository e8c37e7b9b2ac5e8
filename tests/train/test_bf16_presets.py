"""train.precision=bf16 works on every preset as given (issue 24, item 6).

DeepSpeed 0.19.8 sums bf16 gradients in fp32 only inside its ZeRO optimizers, so
train.grad_accum_dtype defaults to null: fp32 at zero.stage >= 1, bf16 at stage 0 (the tiny
presets). The reference for stage 0 is the explicit train.grad_accum_dtype=bf16, whose engine
tests/train/test_zero0_bf16_update.py checks against plain AdamW; an explicit fp32 there is
still refused, naming the key. Here: each preset's config and DeepSpeed JSON, parsed by
DeepSpeed's own config reader, in-process.
"""
import json

import pytest

from harness.common.errors import HarnessError
from harness.config import load_config, preset_names
from harness.parallel.batch import make_plan
from harness.train.ds_config import build_ds_config

BF16 = ["train.precision=bf16"]


class _DataParallel:
    """DeepSpeed's mpu interface, reduced to what its config parser asks: the DP size."""

    def __init__(self, size):
        self.size = size

    def get_data_parallel_world_size(self):
        return self.size


@pytest.mark.parametrize("preset", preset_names())
def test_bf16_on_every_preset(preset, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed.runtime.config as ds_runtime_config
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda *a, **k: 0)
    cfg = load_config(preset, BF16)
    stage = cfg.zero.stage
    summed = "fp32" if stage >= 1 else "bf16"
    assert cfg.train.grad_accum_dtype == summed
    # null means what the explicit value says (the explicit one is what the engine tests use)
    assert cfg == load_config(preset, [*BF16, f"train.grad_accum_dtype={summed}"])
    world = 1 if preset.startswith("tiny") else 8
    device = "cpu" if preset.startswith("tiny") else "cuda"
    ds = build_ds_config(cfg, make_plan(cfg, world), device)
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": summed}
    parsed = DeepSpeedConfig(json.loads(json.dumps(ds)), mpu=_DataParallel(world))
    assert parsed.bfloat16_config.enabled and parsed.zero_optimization_stage == stage
    assert parsed.grad_accum_dtype == summed


def test_fp32_stays_unset_and_explicit_fp32_at_stage0_is_refused():
    cfg = load_config("tiny")
    assert cfg.train.grad_accum_dtype is None  # `harness config` output reloads under bf16
    with pytest.raises(HarnessError, match="train.grad_accum_dtype=bf16"):
        load_config("tiny", [*BF16, "train.grad_accum_dtype=fp32"])
    assert load_config("tiny", [*BF16, "zero.stage=1"]).train.grad_accum_dtype == "fp32"
