"""ZeRO 3: this rank's gradient partition read from DeepSpeed's flat buffers, once per step.

DeepSpeed 0.19.8's per-parameter accessor (`get_local_fp32_grad_for_param`, stage3.py) waits
for the reduce stream and copies the partition to the accelerator as fp32 on every call: a
sync and a copy per parameter, and with optimizer offload the whole fp32 gradient partition
crossed to the GPU each step. The buffers it reads from (filled by the backward at the
accumulation boundary under managed accumulation, DeepSpeed's default):
- without offload, `grad_partitions_flat_buffer`: on the accelerator, in the gradient
  accumulation dtype, every sub-group's parameters' partitions back to back (partition_numel
  each, padding included), in the order of `fp16_groups`;
- with `offload_optimizer`, each sub-group's fp32 master partition's `.grad`, on the CPU, the
  parameter at `grad_position[ds_id] = (sub-group, offset, numel)`: what the CPU optimizer
  steps, read where it lives; only the per-group sums travel to the device.
The spans are the same partitions the accessor returns (tests/train/test_zero3_grads.py checks
them against it); adjacent parameters of one layer group are read as one slice.
"""
from __future__ import annotations

import itertools

import torch


class Zero3Grads:
    def __init__(self, opt, params: list[tuple[int, torch.nn.Parameter]]):
        """opt: DeepSpeedZeroOptimizer_Stage3; params: (layer group index, parameter) of the
        parameters this rank counts."""
        self.opt, self.offload = opt, bool(opt.offload_optimizer)
        sizes = [sum(p.partition_numel() for p in group) for group in opt.fp16_groups]
        starts = list(itertools.accumulate(sizes, initial=0))  # sub-groups in the flat buffer
        spans = []
        for group, p in params:
            if not p.requires_grad:
                continue
            sub, offset, numel = opt.grad_position[opt.get_param_id(p)]
            spans.append((sub, offset, numel, group) if self.offload
                         else (0, starts[sub] + offset, numel, group))
        self.spans = _merge(sorted(spans))
        self._cached: tuple = ((), [])

    def flats(self) -> list[torch.Tensor]:
        """The flat tensors the spans index: one per sub-group with offload, else one."""
        if self.offload:
            return [flat.grad for flat in self.opt.fp32_partitioned_groups_flat]
        return [self.opt.grad_partitions_flat_buffer]

    def pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        """(slices of the flat buffers, their layer groups): views, cut once (cutting costs
        more Python time than reading), again only if DeepSpeed replaced a buffer."""
        flats = self.flats()
        key = tuple(f.data_ptr() for f in flats)
        if self._cached[0] != key:
            views = [flats[f].narrow(0, start, n) for f, start, n, _ in self.spans]
            self._cached = (key, (views, [g for *_, g in self.spans]))
        stream = getattr(self.opt, "reduce_and_partition_stream", None)
        if stream is not None and not self.offload:  # a GPU: order after the reduction, on
            torch.cuda.current_stream().wait_stream(stream)  # the device (no host sync)
        return self._cached[1]


def _merge(spans: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """(flat, start, numel, group) sorted; touching spans of one group joined."""
    out: list[tuple[int, int, int, int]] = []
    for flat, start, numel, group in spans:
        if out and out[-1][0] == flat and out[-1][3] == group and sum(out[-1][1:3]) == start:
            out[-1] = (flat, out[-1][1], out[-1][2] + numel, group)
        else:
            out.append((flat, start, numel, group))
    return out
