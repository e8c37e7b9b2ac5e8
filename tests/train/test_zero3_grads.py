"""ZeRO 3's pre-clip norms read DeepSpeed's flat gradient partitions once per step
(harness/train/zero3_grads.py), not parameter by parameter through
get_local_fp32_grad_for_param (a stream sync and a copy to the accelerator each call).

One engine per case, on the real DeepSpeed ZeRO-3 optimizer: fp32, bf16 summed in bf16 (the flat
buffer then holds bf16), and optimizer offload (the fp32 gradients on the CPU). The reference is
DeepSpeed's own per-parameter accessor. What the CPU cannot show: the GPU paths (the stream wait
without offload, the per-group sums moved to the GPU with offload) run only on a GPU; the
norms' agreement across ranks and with plain PyTorch is tests/parallel/test_norms_across_ranks.py.
"""
import pytest
import torch
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from engine_utils import build, make_data, small_cfg

from harness.train.grad_norms import local_grads
from harness.train.trainer import Trainer

# the per-parameter accessors: none may run in a step
ACCESSORS = ("get_local_fp32_grad_for_param", "get_fp32_grad_for_param",
             "_get_fp32_grad_state_partition")
CASES = {"fp32": ["train.precision=fp32"],
         "bf16-sum-bf16": ["train.precision=bf16", "train.grad_accum_dtype=bf16"],
         "offload": ["train.precision=bf16", "zero.offload_optimizer=true"]}


@pytest.fixture(scope="module", params=list(CASES))
def stepped(request):
    """(trainer after one step with the accessors counted, their calls): one engine per case,
    the next step's gradients accumulated (before its engine.step())."""
    cfg = small_cfg("zero.stage=3", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                    *CASES[request.param])
    built = build(cfg)
    trainer = Trainer(cfg, built, make_data(cfg, 2), [])
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ACCESSORS:
            mp.setattr(DeepSpeedZeroOptimizer_Stage3, name,
                       _counted(getattr(DeepSpeedZeroOptimizer_Stage3, name), name, calls))
        trainer.train_step()
    trainer._forward_backward()
    return trainer, calls


def _counted(fn, name: str, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)
    return wrapper


def test_a_step_reads_no_gradient_parameter_by_parameter(stepped):
    trainer, calls = stepped
    assert trainer.step == 1
    assert calls == []


def test_spans_are_the_partitions_deepspeed_hands_out(stepped):
    """Each parameter's partition (where DeepSpeed keeps it, holding what its accessor returns,
    bit for bit) lies inside one span of its layer group; the spans cover the flat buffers
    once. Under offload they are the CPU fp32 partitions the optimizer steps."""
    trainer, _ = stepped
    norms, opt = trainer.norms, trainer.engine.optimizer
    spans, flats = norms.zero3.spans, norms.zero3.flats()
    for i, p in norms.params:
        sub, offset, numel = opt.grad_position[opt.get_param_id(p)]
        f, start = (sub, offset) if opt.offload_optimizer else (0, _start(opt, p))
        assert any(sf == f and g == i and s <= start and start + numel <= s + n
                   for sf, s, n, g in spans), p.ds_id
        theirs = opt.get_local_fp32_grad_for_param(p)
        assert torch.equal(flats[f].narrow(0, start, numel).float(), theirs), p.ds_id
    ends = [(f, s + n) for f, s, n, _ in spans]
    assert all(ends[k] <= spans[k + 1][:2] for k in range(len(spans) - 1))  # no overlap
    assert sum(n for _, _, n, _ in spans) == sum(f.numel() for f in flats)
    if opt.offload_optimizer:
        assert {(f.device.type, f.dtype) for f in flats} == {("cpu", torch.float32)}
    assert [f.data_ptr() for f in local_grads(trainer.engine)] == [f.data_ptr() for f in flats]


def _start(opt, p) -> int:
    """p's partition's offset in grad_partitions_flat_buffer, from DeepSpeed's own view."""
    view = opt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition[p.ds_id]
    return view.storage_offset() - opt.grad_partitions_flat_buffer.storage_offset()


def test_group_squares_equal_the_per_parameter_sums(stepped):
    """local_squares against sums of squares of the accessor's per-parameter tensors, in
    float64: fp32 norms of longer slices differ by rounding only (rel 1e-6)."""
    trainer, _ = stepped
    norms, opt = trainer.norms, trainer.engine.optimizer
    want = torch.zeros(len(norms.groups), dtype=torch.float64)
    for i, p in norms.params:
        want[i] += opt.get_local_fp32_grad_for_param(p).double().square().sum()
    got = norms.local_squares()
    assert got.device == trainer.engine.device and got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-6)
    assert (want > 0).all()
