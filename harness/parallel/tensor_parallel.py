"""Tensor parallelism through DeepSpeed's own AutoTP (the JSON's `tensor_parallel` section).

`deepspeed.initialize` replaces the GPT's linear layers by DeepSpeed's tensor-parallel ones
(deepspeed.module_inject.layers), by name, from the layer specs below:

- attn.qkv: column-parallel, cut as 3 sub-matrices (q, k, v) so each rank holds the same heads
  of all three; attn.proj: row-parallel (all-reduce of the output, bias replicated);
- mlp.fc: column-parallel; mlp.proj: row-parallel.

and llama's (harness/model/llama.py), whose names the gpt2 patterns never match:

- attn.wq, attn.wk, attn.wv: column-parallel, each cut on its own, so rank i holds query heads
  i*h/tp.. and key/value heads i*kv/tp..: the query heads of a key/value head stay on its rank
  (repeat_interleave order), so the GQA ratio per rank is the model's;
- attn.wo: row-parallel; mlp.w1 (gate) and mlp.w3 (up): column-parallel, the same columns on
  a rank, so SwiGLU's product is elementwise per rank; mlp.w2: row-parallel. No biases.

Everything else stays replicated on every rank of the group: LayerNorms and RMSNorms, position and token
embeddings and the tied output head (the loss, z-loss and chunked loss of harness.model.loss run
unchanged on full logits). The model's forward is written for any head count per rank
(harness/model/gpt.py reads the local width), so one model file serves TP 1 and TP N.

Why AutoTP and not hand-written Megatron layers: measured on this CPU (gloo, TP 2 vs TP 1,
ZeRO 0, 1 and 2, with deepspeed.checkpointing and partition_activations at mp_size 2), the
losses and DeepSpeed's own gradient norms agree to the printed digits; it is DeepSpeed's
supported training path (ZeRO 0-2, not 3), so the engine's data-parallel groups, gradient
clipping and checkpoint layout already know the tensor-parallel groups.

Process groups are DeepSpeed's (deepspeed.utils.groups): consecutive ranks form a
tensor-parallel group, rank = dp_rank x tp + tp_rank (harness.parallel.batch.Plan.dp_rank).
"""
from __future__ import annotations

import re
from typing import Any, Iterator

import torch

# attribute DeepSpeed's tensor-parallel layers set on the tensors they shard
SHARDED_ATTR = "tensor_model_parallel"

LAYER_SPECS = [
    {"patterns": [r".*\.attn\.qkv\.weight$", r".*\.attn\.qkv\.bias$"],
     "partition_type": "column", "shape": [3, -1]},
    {"patterns": [r".*\.mlp\.fc\.weight$", r".*\.mlp\.fc\.bias$"], "partition_type": "column"},
    {"patterns": [r".*\.attn\.proj\.weight$", r".*\.mlp\.proj\.weight$"],
     "partition_type": "row"},
    # llama (no biases)
    {"patterns": [r".*\.attn\.w[qkv]\.weight$", r".*\.mlp\.w[13]\.weight$"],
     "partition_type": "column"},
    {"patterns": [r".*\.attn\.wo\.weight$", r".*\.mlp\.w2\.weight$"],
     "partition_type": "row"},
]


def ds_section(tp: int) -> dict[str, Any]:
    """The DeepSpeed JSON's `tensor_parallel` section for `tp` ranks per group."""
    return {"autotp_size": tp,
            "partition_config": {"use_default_specs": False, "layer_specs": LAYER_SPECS}}


def is_sharded(p: torch.Tensor) -> bool:
    """True for a tensor each rank of the tensor-parallel group holds a different part of."""
    return bool(getattr(p, SHARDED_ATTR, False))


def groups_mpu():
    """DeepSpeed's process-group module, as the `mpu` deepspeed.checkpointing.configure takes
    (get_tensor_model_parallel_rank/world_size/group); valid after deepspeed.initialize."""
    from deepspeed.utils import groups

    return groups



def spec_of(name: str) -> dict[str, Any] | None:
    """The LAYER_SPECS entry that cuts parameter `name`; None for a replicated one."""
    return next((s for s in LAYER_SPECS if any(re.match(p, name) for p in s["patterns"])), None)


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Full tensors from the tensor-parallel ranks' own state dicts (rank order), as
    LAYER_SPECS cut them: column-parallel tensors joined along dim 0, each of a `shape`'s
    sub-blocks apart (qkv: every rank holds its heads of q, k and v), row-parallel weights along
    dim 1; everything else is replicated (rank 0's copy)."""
    out = {}
    for name, first in shards[0].items():
        spec = spec_of(name)
        if spec is None:  # (a tied copy may be named on rank 0 only)
            out[name] = first
            continue
        parts = [s[name] for s in shards]
        if spec["partition_type"] == "row":
            out[name] = torch.cat(parts, dim=1)
        else:
            k = spec.get("shape", [1])[0]
            blocks = [p.chunk(k, dim=0) for p in parts]
            out[name] = torch.cat([b[i] for i in range(k) for b in blocks])
    return out


def full_params(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter, the shards gathered across the tensor-parallel
    group (DeepSpeed's own gather; a collective: every rank of the group must call it)."""
    from deepspeed.module_inject.layers import GatherReplacedLayerParams

    seen: set[int] = set()  # a tied weight once, under its first name (as named_parameters)
    for name, sub in module.named_modules():
        own = [(n, p) for n, p in sub.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if not own:
            continue
        params = [p for _, p in own]
        if any(is_sharded(p) for p in params):
            # gather_params takes (weight, bias) in that order
            ordered = [getattr(sub, "weight", None), getattr(sub, "bias", None)]
            with GatherReplacedLayerParams([t for t in ordered if t is not None], sub):
                for n, p in own:
                    yield f"{name}.{n}" if name else n, p.detach().clone()
        else:
            for n, p in own:
                yield f"{name}.{n}" if name else n, p.detach().clone()
