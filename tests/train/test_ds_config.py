"""The DeepSpeed JSON: ds_configs/ is what the code generates, and DeepSpeed parses it."""
import json
from pathlib import Path

import pytest

from harness.config import load_config
from harness.parallel.batch import make_plan
from harness.train.ds_config import SNAPSHOTS, build_ds_config, snapshot

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", sorted(SNAPSHOTS))
def test_ds_configs_dir_is_in_sync(preset):
    path = ROOT / "ds_configs" / f"{preset}.json"
    assert path.read_text() == snapshot(preset), f"{path} drifted: run `make ds-configs`"


class _DataParallel:
    """DeepSpeed's mpu interface, reduced to what its config parser asks: the DP size."""

    def __init__(self, size):
        self.size = size

    def get_data_parallel_world_size(self):
        return self.size


# tiny and tiny-llama pin a global batch of 16 at micro batch 8: it divides over 1 and 2 ranks only
CASES = [(p, ws, []) for p in SNAPSHOTS
         for ws in ((1, 2) if p.startswith("tiny") else (1, 2, 8))] + [
    ("tiny", 2, ["activation_checkpointing.policy=sqrt", "model.n_layer=8",
                 "activation_checkpointing.partition_activations=true",
                 "activation_checkpointing.cpu_checkpointing=true",
                 "activation_checkpointing.contiguous_memory_optimization=true"]),
    ("tiny", 4, ["train.precision=fp16", "zero.stage=3", "train.micro_batch_size=2"]),
    ("tiny", 1, ["zero.stage=2", "zero.offload_optimizer=true"]),
]


@pytest.mark.parametrize("preset,world_size,overrides", CASES)
def test_deepspeed_parses_generated_json(preset, world_size, overrides, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed.runtime.config as ds_runtime_config
    from deepspeed.runtime.config import DeepSpeedConfig

    # the parser asks the process group for this rank before it asks the mpu for the DP
    # size; with no process group it silently assumes world size 1
    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda *a, **k: 0)

    cfg = load_config(preset, overrides)
    plan = make_plan(cfg, world_size)
    ds = build_ds_config(cfg, plan, "cpu")
    parsed = DeepSpeedConfig(json.loads(json.dumps(ds)), mpu=_DataParallel(world_size))
    assert parsed.train_batch_size == (parsed.train_micro_batch_size_per_gpu
                                       * parsed.gradient_accumulation_steps * world_size)
    assert parsed.train_batch_size == plan.batch.global_batch
    assert parsed.gradient_clipping == cfg.clip.max_norm
    assert parsed.zero_optimization_stage == cfg.zero.stage
    if plan.segments:
        ac = parsed.activation_checkpointing_config
        assert ac.number_checkpoints == len(plan.segments)
        assert ac.partition_activations == cfg.activation_checkpointing.partition_activations
