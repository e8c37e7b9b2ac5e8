"""Activation memory as autograd sees it: bytes saved for backward, counted exactly.

torch.autograd.graph.saved_tensors_hooks sees every tensor an op keeps for its backward,
on any device. We count each storage once (views share it), skip parameters (they are
model state, not activations) and track the live total until autograd drops the saved
tensor, so `peak` includes what a checkpointed segment recomputes during backward.

DeepSpeed's checkpoint keeps its inputs on ctx.deepspeed_saved_tensors, out of the hooks'
sight; `wrap_checkpoint` counts those too (with partition_activations, the partition each
input carries as .saved_data), and frees them when DeepSpeed drops that tuple.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch

from harness.config.model import ffn_hidden
from harness.model.llama_memory import llama_block_parts, llama_head


class _Held:
    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int, meter: "SavedActivations"):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class _HeldTuple(tuple):
    """deepspeed_saved_tensors with our accounting attached: freed together."""

    held: list


def checkpointed_data(t: torch.Tensor) -> torch.Tensor:
    """What DeepSpeed's checkpoint really keeps of input `t`: with partition_activations it
    empties t and keeps this rank's partition (on the host with cpu_checkpointing) as
    t.saved_data until the backward."""
    return getattr(t, "saved_data", t)


class SavedActivations:
    """with SavedActivations(model.parameters()) as m: loss.backward() ... m.peak, m.forward."""

    def __init__(self, params: Iterable[torch.nn.Parameter] = ()):
        self._param_keys = {p.untyped_storage().data_ptr() for p in params}
        self._refs: dict[int, int] = defaultdict(int)
        self._sizes: dict[int, int] = {}
        self.live = self.peak = self.packed = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._param_keys or storage.nbytes() == 0:
            return t
        return self._hold(t, key, storage.nbytes())

    def _hold(self, t: torch.Tensor, key: int, nbytes: int) -> _Held:
        if self._refs[key] == 0:
            self._sizes[key] = nbytes
            self.live += nbytes
            self.packed += nbytes
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        return _Held(t, key, self)

    def wrap_checkpoint(self, checkpoint_fn):
        def counted(function, *args):
            out = checkpoint_fn(function, *args)
            ctx = out.grad_fn
            saved = getattr(ctx, "deepspeed_saved_tensors", None)
            if saved is not None:
                held = _HeldTuple(saved)
                held.held = [self._pack(checkpointed_data(t)) for t in saved
                             if torch.is_tensor(t)]
                ctx.deepspeed_saved_tensors = held
            return out
        return counted

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live -= self._sizes.pop(key)
            del self._refs[key]

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def measure_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """One forward+backward; bytes held after the forward, and the peak including recompute."""
    meter = SavedActivations(model.parameters())
    original = getattr(model, "checkpoint_fn", None)
    if original is not None:
        model.checkpoint_fn = meter.wrap_checkpoint(original)
    try:
        with meter:
            loss = model(x, y)
            after_forward = meter.live
            loss.backward()
    finally:
        if original is not None:
            model.checkpoint_fn = original
    return {"forward": after_forward, "peak": meter.peak}


# ---- prediction from shapes ------------------------------------------------------------
# What one block saves for backward (from the ops in harness/model/gpt.py), B = b*t*d elements:
# attention: ln_1 input B and output B, then either SDPA's fused path (qkv 3B, output B,
# logsumexp b*h*t fp32) or, with attention dropout, the math path (q, k, v copies 3B, scores
# softmax and dropout mask and dropped probabilities 3 x b*h*t*t, output B); residual dropout
# mask B. MLP: ln_2 input B and output B, fc output 4B, GELU output 4B, dropout mask B.
# Layer norms keep mean and rstd (2 x b*t, fp32).
#
# Per rank of a tensor-parallel group of tp (harness/parallel/tensor_parallel.py; measured op by op
# in tests/plan/test_tp_memory.py): what lies between a column-parallel layer (qkv, fc) and the next
# row-parallel one (attn.proj, mlp.proj) is the rank's h/tp heads or 4d/tp MLP columns, so
# /tp: qkv's output, SDPA's saved tensors (the math path's copies and T x T tensors too), the
# attention output, fc's output and GELU's. Full on every rank: the LayerNorms' inputs,
# outputs (the column-parallel layers' input) and statistics, the residual stream, the
# row-parallel outputs' dropout masks, the embeddings and the head. AutoTP's layers add no
# saved tensor of their own (their all-reduces are identity functions for autograd).
# The math path reshapes v to (b*h, t, d_head): a copy, except with one head per rank, where it
# is a view and v keeps qkv's whole output alive (3B/tp instead of B/tp).


# qk_norm adds a LayerNorm on q (input B, stats 2 x b*h*t) and k (the same), and a copy of the
# attention output for proj (the norm leaves q in (b, h, t) order). llama, at any tp:
# harness/model/llama_memory.py. fused: a GPU, where FlashAttention applies attention dropout
# inside its kernel (no T x T tensors) and RMSNorm has a fused kernel.


def block_parts(cfg, micro: int, act_bytes: int = 4, fused: bool = False,
                tp: int = 1) -> dict[str, int]:
    """Bytes one block saves for backward on one rank of a tensor-parallel group of tp."""
    if cfg.arch == "llama":
        return llama_block_parts(cfg, micro, act_bytes, fused, ffn_hidden(cfg), tp)
    b, t, d = micro, cfg.block_size, cfg.d_model
    heads = cfg.n_head // tp  # this rank's
    unit, stats = b * t * d * act_bytes, 2 * b * t * 4
    shard = unit // tp  # a (b, t, d) tensor's columns between column- and row-parallel layers
    mask = unit if cfg.dropout > 0 else 0
    if cfg.dropout > 0 and not fused:
        v = 3 * shard if heads == 1 else shard
        core = 2 * shard + v + 3 * b * heads * t * t * act_bytes + shard
    else:
        core = 3 * shard + shard + b * heads * t * 4
    qk = 3 * shard + 4 * b * heads * t * 4 if cfg.qk_norm else 0
    return {"input": unit,
            "attention": stats + unit + core + qk + mask,  # without its input
            "mlp": unit + stats + unit + 4 * shard + 4 * shard + mask}  # with ln_2's input


def checkpoint_kept(parts: dict[str, int], tp: int = 1, partitioned: bool = False) -> int:
    """What a checkpoint holds of its input through the forward: with partition_activations
    at tp > 1, DeepSpeed's checkpoint keeps this rank's 1/tp of it (plus a 3-element int64
    size tensor, not counted); at tp 1 the partition is the whole input."""
    return parts["input"] // tp if partitioned else parts["input"]


def head_bytes(cfg, micro: int, act_bytes: int, fused: bool, chunk_tokens: int = 0) -> int:
    """ln_f (input, output, statistics) and the loss (harness.model.loss): the fp32 log-softmax
    output for full logits (z_loss or not: log Z is read off it); chunked, the head input's
    gradient (ln_f's output is then kept by nobody: the same size) and the weight's."""
    b, t, v, d = micro, cfg.block_size, cfg.vocab_size, cfg.d_model
    if cfg.arch == "llama":
        norm = llama_head(cfg, micro, act_bytes, fused)
    else:
        norm = 2 * b * t * d * act_bytes + 2 * b * t * 4
    if chunk_tokens:
        return norm + v * d * 4
    return norm + b * t * v * 4


def _units(cfg, micro: int, policy: str, segments, act_bytes: int, fused: bool = False,
           head: int = 0, tp: int = 1, partitioned: bool = False) -> list[tuple[int, int]]:
    """(bytes stored through the forward, bytes recomputed in its backward), forward order.
    tp, partitioned: per rank of a tensor-parallel group, partition_activations on."""
    p = block_parts(cfg, micro, act_bytes, fused, tp)
    full = p["input"] + p["attention"] + p["mlp"]
    kept = checkpoint_kept(p, tp, partitioned)
    # the recompute's input: the kept storage itself, or, split across tp > 1 ranks, gathered
    # into a new full-size storage (the meter still holds the partition until the checkpoint's
    # tuple is dropped, so this counts one partition more than the allocator would)
    gathered = p["input"] if partitioned and tp > 1 else 0
    units = [(p["input"] if cfg.dropout > 0 else 0, 0)]  # embedding dropout mask
    if policy == "attention":  # its own MLP's tensors are freed before the attention recompute
        units += [(kept, p["input"] + p["attention"]), (p["mlp"], 0)] * cfg.n_layer
    elif policy == "mlp":  # the recompute's ln_2 input is the checkpoint's input: one storage
        units += [(p["input"] + p["attention"], 0),
                  (kept, p["mlp"] - p["input"] + gathered)] * cfg.n_layer
    else:
        starts = {a: b_ for a, b_ in segments}
        i = 0
        while i < cfg.n_layer:
            if i in starts:
                # the recompute re-saves the segment, its input storage excepted
                units.append((kept, (starts[i] - i) * full - p["input"] + gathered))
                i = starts[i]
            else:
                units.append((full, 0))
                i += 1
    return units + [(head or head_bytes(cfg, micro, act_bytes, fused), 0)]


def predict_peak(cfg, micro: int, policy: str, segments, act_bytes: int = 4,
                 fused: bool = False, head: int = 0, tp: int = 1,
                 partitioned: bool = False) -> int:
    """Peak bytes saved for backward: the end of the forward, or a segment's recompute
    while everything before it is still held (later units are already freed). head: the
    head's bytes when not full logits without z-loss (head_bytes). tp: per rank of a
    tensor-parallel group of that size (the head and embeddings replicated, full);
    partitioned: activation_checkpointing.partition_activations."""
    units = _units(cfg, micro, policy, segments, act_bytes, fused, head, tp, partitioned)
    peak, held = sum(s for s, _ in units), 0
    for stored, recompute in units:
        held += stored
        peak = max(peak, held + recompute)
    return peak
