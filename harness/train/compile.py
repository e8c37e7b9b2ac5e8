"""train.compile: torch.compile of the whole model and, on their own, of its transformer blocks.

DeepSpeed's engine.compile() compiles the top-level forward. DeepSpeed's checkpoint function
is dynamo-disabled (torch._disable_dynamo: its autograd.Function saves RNG states and
partitions activations in Python), so with activation checkpointing every checkpoint call is a
graph break and everything inside it, i.e. the checkpointed blocks, ran eager: measured with
torch._dynamo.explain on the tiny preset, every_layer, 7 graphs and 6 breaks holding 17 of the
model's 89 ops. Compiling each block as well (torchtitan's per-block compile) puts compiled
code inside the checkpoint: the first forward (no_grad) and the backward's recompute each run
one compiled graph per block, compiled once for all blocks (their parameters are graph inputs),
with 0 graph breaks inside a block. Without checkpointing the top-level compile still traces
the whole model as one graph (the blocks' compiled forwards inlined into it).

The attention/mlp policies checkpoint a block's attention_part or mlp_part, not the block:
those two methods are compiled instead. ZeRO 3 is refused with train.compile
(harness.config): DeepSpeed's parameter-gathering hooks are compiler-disabled, a break at
every submodule (12-19 per block, GPT and Llama; the top-level compile alike).
block_graph_breaks counts the breaks of a built model (bench/gpu_check.py fails a compiled row
on any).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

SUB_BLOCKS = ("attention_part", "mlp_part")  # what the attention / mlp policies checkpoint


def compile_model(engine: Any, model: nn.Module, policy: str, backend: Optional[Any] = None):
    """engine.compile() of the top level, then each block of `model` (engine.module): the whole
    block, or its two parts under activation_checkpointing.policy attention / mlp.
    backend: the accelerator's (inductor) unless given (tests pass a counting backend)."""
    if backend is None:
        from deepspeed.accelerator import get_accelerator  # noqa: WPS433 (after the pin)

        backend = get_accelerator().get_compile_backend()
    engine.compile(backend=backend)  # the embeddings, the head and its loss
    for block in model.blocks:
        if policy in ("attention", "mlp"):
            for part in SUB_BLOCKS:  # BlockStack looks them up on the block at each call
                setattr(block, part, torch.compile(getattr(block, part), backend=backend))
        else:
            block.compile(backend=backend)  # block(x): what a checkpointed range calls


def block_graph_breaks(model: nn.Module, seq_len: int = 16) -> list[int]:
    """Per block of `model` (a built harness model, DeepSpeed's hooks included), the graph
    breaks torch._dynamo.explain finds in the call that compile_model compiles (the block with
    its module hooks), the larger count of the two grad modes a checkpointed block runs in
    (no_grad forward, grad-enabled recompute). Runs each block once on zeros of shape
    (1, seq_len, d_model). explain resets dynamo's caches: an already compiled model
    recompiles on its next step."""
    p = next(model.parameters())
    x = torch.zeros(1, min(seq_len, model.cfg.block_size), model.cfg.d_model,
                    dtype=p.dtype, device=p.device)
    counts = []
    for block in model.blocks:
        breaks = 0
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                breaks = max(breaks, torch._dynamo.explain(block._call_impl)(x).graph_break_count)
        counts.append(breaks)
    return counts
