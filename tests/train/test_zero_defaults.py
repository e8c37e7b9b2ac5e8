"""Defaults the DeepSpeed JSON resolves for the device (issue 23 items 10, 12a).

- The optimizer under zero.offload_optimizer: torch AdamW with its fused kernel, which steps the
  CPU partitions as fast as DeepSpeed's JIT-built CPU Adam (bench/bench_offload_adam.py; the
  numbers are in harness/train/ds_config.py). The engine really builds it, and trains as plain
  PyTorch does.
- zero.overlap_comm: null = on on a GPU at ZeRO >= 1, off on a CPU and at ZeRO 0; an explicit
  value is kept. On the CPU accelerator DeepSpeed runs it (no streams: the same arithmetic), so
  turning it on changes no norm and no parameter. What stays unproven here: the overlap itself
  (the reduction on its own CUDA stream), which only a GPU shows.
"""
import pytest
import torch
from engine_utils import ROUNDING_TOL, run_harness, run_reference, small_cfg

from harness.common.errors import HarnessError
from harness.config import load_config
from harness.config.train import ZeroConfig
from harness.parallel.batch import make_plan
from harness.plan.planner import predict_memory
from harness.train.ds_config import build_ds_config

ACCUM = ["train.micro_batch_size=2", "train.grad_accum_steps=2"]


def ds_json(device: str, *overrides: str) -> dict:
    cfg = load_config("tiny", list(overrides))
    return build_ds_config(cfg, make_plan(cfg, 1), device)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("offload", [False, True])
def test_torch_adamw_fused_where_it_steps(device, offload):
    """torch AdamW by default; its fused kernel on the GPU and, under offload, on the CPU; the
    CPU without offload keeps torch's default loop. optim.torch_adam=false: DeepSpeed's own."""
    extra = ["zero.stage=2", f"zero.offload_optimizer={str(offload).lower()}"]
    params = ds_json(device, *extra)["optimizer"]["params"]
    assert params["torch_adam"] is True
    assert params.get("fused", False) is (offload or device == "cuda")
    params = ds_json(device, *extra, "optim.torch_adam=false")["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params


@pytest.fixture(scope="module")
def offloaded():
    cfg = small_cfg("zero.stage=2", "zero.offload_optimizer=true", *ACCUM)
    params, metrics, built = run_harness(cfg)
    return cfg, params, metrics, built


def test_offload_steps_with_torch_fused_adamw(offloaded):
    """The engine steps the CPU partition with torch's fused AdamW, and ends where plain
    PyTorch's default AdamW does, to rounding (engine_utils.ROUNDING_TOL)."""
    cfg, params, _, built = offloaded
    opt = built.engine.optimizer.optimizer
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert {p.device.type for g in opt.param_groups for p in g["params"]} == {"cpu"}
    ref, _, _ = run_reference(cfg, 2, 2)
    for name, p in params.items():
        torch.testing.assert_close(p, ref[name].detach(), rtol=0, atol=ROUNDING_TOL)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("setting", [None, True, False])
def test_overlap_comm_resolved_for_the_device(stage, device, setting):
    extra = [] if setting is None else [f"zero.overlap_comm={str(setting).lower()}"]
    zero = ds_json(device, f"zero.stage={stage}", *extra)["zero_optimization"]
    if stage == 0:
        assert "overlap_comm" not in zero
        return
    want = (device == "cuda") if setting is None else setting
    assert zero["overlap_comm"] is want


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_planner_counts_the_buckets_of_the_resolved_setting(stage):
    """ZeRO 1/2 hold a second reduce bucket with overlap_comm (DeepSpeed's double buffer):
    on a GPU by default, not on a CPU; ZeRO 3 keeps one bucket either way."""
    cfg = load_config("tiny", [f"zero.stage={stage}"])
    bucket = cfg.zero.reduce_bucket_size * 4  # fp32
    gpu, cpu = (predict_memory(cfg, 1, device=d)["comm_buffers"] for d in ("cuda", "cpu"))
    assert gpu - cpu == (bucket if stage < 3 else 0)
    off = load_config("tiny", [f"zero.stage={stage}", "zero.overlap_comm=false"])
    assert predict_memory(off, 1, device="cuda")["comm_buffers"] == cpu


def test_overlap_comm_takes_a_boolean_or_null():
    assert load_config("tiny", ["zero.overlap_comm=null"]).zero.overlap_comm is None
    assert load_config("tiny", []).zero.overlap_comm is None
    for bad in ("yes", 1, 2.0):
        with pytest.raises(HarnessError, match="zero.overlap_comm"):
            ZeroConfig(overlap_comm=bad).validate()
    with pytest.raises(HarnessError, match="zero.overlap_comm"):
        load_config("tiny", ["zero.overlap_comm=maybe"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_overlap_comm_on_a_cpu_changes_nothing(stage):
    """DeepSpeed's CPU accelerator runs overlap_comm=true at ZeRO 1-3 (measured: the same norms
    and parameters, bit for bit, 1 rank; 2 ranks: tests/parallel/test_norms_across_ranks.py)."""
    runs = [run_harness(small_cfg(f"zero.stage={stage}", f"zero.overlap_comm={on}", *ACCUM))
            for on in ("false", "true")]
    (p_off, m_off, b_off), (p_on, m_on, b_on) = runs
    assert b_on.engine.zero_overlap_comm() and not b_off.engine.zero_overlap_comm()
    norms = [[m["optim/grad_norm_preclip"] for m in ms] for ms in (m_off, m_on)]
    assert norms[0] == norms[1]
    assert all(torch.equal(p_off[n], p_on[n]) for n in p_off)
