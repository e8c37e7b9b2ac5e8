"""The host reads of tensor values in one optimizer step are exactly those listed in
harness.train.host_syncs.HOST_SYNCS (the trainer's docstring points there), per configuration:
a new one, in the harness or after a DeepSpeed or torch upgrade, fails here with its location.

Counted on the real CPU engine, 2 steps after 2 warm-up steps (the first builds caches;
DeepSpeed's throughput timer synchronizes from its third step), by a TorchFunctionMode (Tensor
methods that read a value: item, tolist, cpu, numpy, bool/float/int of a tensor, `if t:`;
torch.tensor(data, device=...)) and a TorchDispatchMode (aten._local_scalar_dense called from
C++, and ops whose output shape depends on the data: nonzero, masked_select, unique), plus the
accelerator's synchronize; each attributed to the first frame outside torch. torch AdamW runs
its fused kernel as on a GPU (harness.train.ds_config gives it fused=True on CUDA only): the
CPU's per-tensor path reads its CPU step counters with .item(), which a GPU run never does.

Unproven here: which reads are of device tensors on a GPU (every tensor is on the CPU; the
list says which, from the code), and .to() copies between host and device (on the CPU a copy
to the host and one to the engine's device are the same call, so .to() is not counted; the
known ones are in host_syncs' docstring). fp16 does not run on the CPU accelerator.
"""
import os
import sys
from collections import Counter

import pytest
import torch
from engine_utils import build, make_data, precision_args, small_cfg
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from harness.train.host_syncs import expected
from harness.train.trainer import Trainer

READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
         "__format__"}
ATEN = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
        "unique_consecutive"}
TORCH = os.path.dirname(torch.__file__)
SITE = os.path.dirname(TORCH)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPTIMIZER = {"FP16_UnfusedOptimizer": "unfused", "BF16_Optimizer": "bf16opt",
             "DeepSpeedZeroOptimizer": "zero12", "DeepSpeedZeroOptimizer_Stage3": "zero3"}


def caller() -> str:
    """file:function of the innermost frame outside torch and this file."""
    f = sys._getframe(1)
    while f.f_code.co_filename.startswith(TORCH) or f.f_code.co_filename == __file__:
        f = f.f_back
    path = f.f_code.co_filename
    return f"{os.path.relpath(path, SITE if path.startswith(SITE) else ROOT)}:{f.f_code.co_name}"


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.counts, self.inside = Counter(), 0

    def note(self, op: str) -> None:
        self.counts[(op, caller())] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        read = name in READS or (name in ("tensor", "as_tensor")
                                 and kwargs.get("device") is not None)
        if read and not self.inside:  # its own _local_scalar_dense is not counted again
            self.note(name)
        self.inside += read
        try:
            return func(*args, **kwargs)
        finally:
            self.inside -= read


class DataReads(TorchDispatchMode):
    def __init__(self, reads: HostReads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ATEN and not self.reads.inside:
            self.reads.note(f"aten.{name}")
        return func(*args, **(kwargs or {}))


CASES = {  # name: overrides (all bf16, ZeRO 0 accumulating in bf16 as it must)
    "zero0": ["zero.stage=0"],
    "zero0 monitor off": ["zero.stage=0", "monitor.enabled=false"],
    "zero0 clip.value": ["zero.stage=0", "clip.value=0.5"],
    "zero1": ["zero.stage=1"],
    "zero1 monitor off, no norm clip": ["zero.stage=1", "monitor.enabled=false",
                                        "clip.max_norm=0"],
    "zero2": ["zero.stage=2"],
    "zero3": ["zero.stage=3"],
}


@pytest.mark.parametrize("case", CASES)
def test_host_reads_per_step_are_the_listed_ones(case, monkeypatch):
    overrides = CASES[case]
    stage = int(overrides[0].split("=")[1])
    cfg = small_cfg("train.micro_batch_size=2", "train.grad_accum_steps=2", "train.max_steps=4",
                    "optim.warmup_steps=1", *precision_args(stage, "bf16"), *overrides)
    monkeypatch.setattr("harness.train.ds_config._fused_on", lambda device, offload: True)
    built = build(cfg)
    from deepspeed.accelerator import get_accelerator

    reads, accelerator = HostReads(), get_accelerator()
    sync = accelerator.synchronize
    monkeypatch.setattr(accelerator, "synchronize",
                        lambda *a, **k: (reads.note("synchronize"), sync(*a, **k))[1])
    trainer = Trainer(cfg, built, make_data(cfg, 2))
    conditions = {OPTIMIZER[type(built.engine.optimizer).__name__]}
    conditions |= {"monitor"} if trainer.measure_update else set()
    conditions |= {"clip"} if cfg.clip.max_norm > 0 else set()
    counts = {"micro": built.plan.batch.grad_accum,
              "tensor": len(list(built.model.parameters())),
              "group": len(built.engine.optimizer.param_groups)}
    want = expected(conditions, counts)
    for step in range(4):
        reads.counts = Counter()
        with reads, DataReads(reads):
            trainer.train_step()
        if step >= 2:
            new, missing = dict(reads.counts - want), dict(want - reads.counts)
            assert not new and not missing, (
                f"step {step + 1}, {sorted(conditions)}: reads not in "
                f"harness.train.host_syncs.HOST_SYNCS {new}; listed but not read {missing}")
