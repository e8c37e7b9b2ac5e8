"""Gradient and update norms computed by the harness, at every ZeRO stage and precision.

The update norm ||delta theta|| / ||theta|| is read back from AdamW's own state after the
step (the exact update it applied), so no copy of the parameters is kept.

Pre-clip gradient norms are needed BEFORE engine.step() (DeepSpeed computes its own inside
step(), after the update, and not at all at ZeRO 0 in fp32), so that a monitor can skip an
update. Each rank sums squares over the gradient it holds: the full p.grad at ZeRO 0 (already
all-reduced, identical on every rank, so only rank 0 counts it), the fragment of its
partition at ZeRO 1/2 (DeepSpeed's `_hp_mapping`), its partition at ZeRO 3 (slices of
DeepSpeed's flat buffers, on the CPU under offload: zero3_grads.py). The trainer sums
the small vector (one entry per layer group) over ranks in its one per-step all-reduce.

Under tensor parallelism (harness.parallel.tensor_parallel) the ranks of one group hold different
shards of the sharded tensors (each counted on its own rank) and identical copies of the
replicated ones (LayerNorms, embeddings, row-parallel biases: counted on the group's first
rank only); "rank 0" above then means the first data-parallel rank of each group position.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch

from harness.model import layer_group
from harness.parallel.tensor_parallel import is_sharded
from harness.train.zero3_grads import Zero3Grads


def _is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


def _local_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    """ZeRO 0-2 (ZeRO 3: Zero3Grads)."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is not None:  # ZeRO 1/2, bf16: this rank's fragment of the flat partition
        frag = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
        if frag.numel() == p.numel():  # bf16 keeps a full buffer: count only our fragment
            address = mapping.lp_fragment_address
            frag = frag.narrow(0, address.start, address.numel)
        return frag
    return p.grad


def bf16_full_grads(engine) -> dict[int, torch.Tensor] | None:
    """id(param) -> its fp32 gradient under DeepSpeed's BF16_Optimizer (bf16 with fp32
    accumulation at ZeRO 1), which keeps the FULL all-reduced fp32 gradient on every rank and
    partitions only the optimizer state; None for every other optimizer."""
    opt = engine.optimizer
    if not (hasattr(opt, "bf16_groups") and hasattr(opt, "fp32_groups_gradients")):
        return None
    return {id(lp): g for lps, gs in zip(opt.bf16_groups, opt.fp32_groups_gradients)
            for lp, g in zip(lps, gs)}


def local_grads(engine) -> list[torch.Tensor]:
    """The gradient storage this rank holds and the optimizer will read (views, not copies)."""
    if _is_zero3(engine):  # the flat partitions, whole (zero3_grads.py)
        return [f for f in Zero3Grads(engine.optimizer, []).flats() if f.numel()]
    full = bf16_full_grads(engine)
    grads = [full[id(p)] if full else _local_grad(p) for p in engine.module.parameters()]
    return [g for g in grads if g is not None and g.numel()]


class GradNorms:
    def __init__(self, engine, comm, rank: int, tp_rank: int = 0):
        """rank: the data-parallel rank; tp_rank: the rank within the tensor-parallel group
        (harness.parallel.batch.Plan.dp_rank / tp_rank)."""
        self.engine, self.comm = engine, comm
        named = list(engine.module.named_parameters())
        self.groups = sorted({layer_group(n) for n, _ in named})
        index = {g: i for i, g in enumerate(self.groups)}
        # a tensor replicated across the tensor-parallel group: its first rank counts it
        self.all_params = [(index[layer_group(n)], p) for n, p in named]
        self.params = [(i, p) for i, p in self.all_params if tp_rank == 0 or is_sharded(p)]
        self.counted = {id(p) for _, p in self.params}  # the tensors this rank counts
        self.full = bf16_full_grads(engine)
        # ZeRO 0 (any precision) leaves the full all-reduced gradient and the full optimizer
        # state on every rank, BF16_Optimizer the full gradient: only rank 0 counts what is
        # replicated, or sums over ranks are world x too large. What is partitioned (ZeRO 1-3),
        # every rank counts its own part of.
        stage0 = engine.zero_optimization_stage() == 0
        self.grad_weight = 1.0 if not (stage0 or self.full) or rank == 0 else 0.0
        self.state_weight = 1.0 if not stage0 or rank == 0 else 0.0
        self.fp16 = engine.fp16_enabled()
        # ZeRO-Offload copies gradients to pinned host memory without blocking: wait for them
        self.sync_first = engine.device.type == "cuda" and bool(engine.zero_cpu_offload())
        self._index: dict[tuple[int, ...], torch.Tensor] = {}  # group indices, on the device
        # ZeRO 3: slices of DeepSpeed's flat partitions, not a sync and a copy per parameter
        self.zero3 = Zero3Grads(engine.optimizer, self.params) if _is_zero3(engine) else None

    def local_squares(self) -> torch.Tensor:
        """Per-group sums of squares of the gradient this rank holds (float64, on the engine's
        device, unreduced): sum them over ranks (one packed all-reduce with the step's other
        scalars), then `signals`. A few foreach kernels, not a loop of kernels per tensor."""
        if self.sync_first:
            torch.cuda.synchronize()
        buckets: dict[tuple, tuple[list, list]] = {}
        for g, i in zip(*self._pieces()):
            if g.numel():
                ts, idx = buckets.setdefault((g.device, g.dtype), ([], []))
                ts.append(g)
                idx.append(i)
        device = self.engine.device
        sq = torch.zeros(len(self.groups), dtype=torch.float64, device=device)
        for ts, idx in buckets.values():
            norms = torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32)).to(device)
            sq.index_add_(0, self._device_index(tuple(idx)), norms.double() ** 2)
        scale = float(self.engine.optimizer.loss_scale) if self.fp16 else 1.0  # scaled grads
        return sq * (self.grad_weight / scale ** 2)

    def _pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        """(gradient tensors this rank counts, their layer groups)."""
        if self.zero3 is not None:
            return self.zero3.pieces()
        grads = [(self.full[id(p)] if self.full else _local_grad(p), i) for i, p in self.params]
        return [g for g, _ in grads if g is not None], [i for g, i in grads if g is not None]

    def _device_index(self, idx: tuple[int, ...]) -> torch.Tensor:
        # copied to the GPU once: a copy from pageable host memory every step would sync
        if idx not in self._index:
            self._index[idx] = torch.tensor(idx, device=self.engine.device)
        return self._index[idx]

    def signals(self, sq: torch.Tensor) -> dict[str, float]:
        """optim/grad_norm_preclip and grad_norm/<group> from the rank-summed squares."""
        norms = sq.sqrt().tolist()
        return {"optim/grad_norm_preclip": math.sqrt(sum(n * n for n in norms)),
                **{f"grad_norm/{g}": v for g, v in zip(self.groups, norms)}}

    def update_ratio(self, lr: float) -> float:
        """||delta theta|| / ||theta|| of the AdamW step just taken with learning rate `lr`."""
        return self.update_metrics(lr, remember=False)["optim/update_norm"]

    def update_metrics(self, lr: float, sample: float = 1.0,
                       remember: bool = True) -> dict[str, float]:
        """After the AdamW step with learning rate `lr`, from one pass over the optimizer state
        (one all-reduce): optim/update_norm = ||delta theta|| / ||theta_before||,
        optim/param_norm = ||theta_after||, optim/param_jump = the largest relative change of
        a layer group's ||theta|| between the end of the previous step and the start of this
        one (weights changed OUTSIDE the optimizer: exactly 0 up to rounding in a healthy run;
        0 where this process has no previous step),
        and update_ratio/<group> per layer group at ZeRO 0-2 (flat fp32 copies are read
        tensor by tensor: `_flat_fragments`; ZeRO 3's partitions mix the groups).
        Under tensor parallelism a replicated tensor is counted on the group's first rank only.

        `sample` < 1 reads a fixed subset of that fraction of each tensor's coordinates
        (stratified blocks of 1024, the same every step, squares scaled by numel / sampled):
        the norms are estimates (their error: tests/train/test_param_signals.py,
        bench/README.md) but the jump compares the same coordinates step to step, so it stays
        exact. Flat partitions are always read whole, so a run logs the same numbers at every
        world size. One host read a step, of the norms after their all-reduce: the bias
        corrections come from AdamW's step count where it lives (`_corrections`), the slices'
        groups and weights are kept on the device (`_batches`)."""
        ds_opt = self.engine.optimizer
        opt = getattr(ds_opt, "optimizer", ds_opt)
        n, corr, parts = len(self.groups) + 1, {}, {}  # parts: (3, n) sums per device
        for group, st, batch, where, ws in self._batches(ds_opt, opt, sample):
            step = st.get("step", group.get("step", 1))
            key = (id(group), id(step))  # batches of one group share their first tensor's step
            if key not in corr:
                corr[key] = _corrections(step, group, ws.device)
            sq = _adamw_delta(*batch, ws, lr, group, corr[key])  # (3, slices) on ws.device
            if sq.device not in parts:
                parts[sq.device] = torch.zeros(3, n, dtype=torch.float64, device=sq.device)
            parts[sq.device].index_add_(1, where, sq)
        acc = torch.zeros(3, n, dtype=torch.float64, device=self.engine.device)
        for part in parts.values():  # under offload one copy per step, not one per batch
            acc += part.to(acc.device)
        acc = self.comm.all_reduce(acc * self.state_weight)
        return self._update_signals(acc.sqrt().tolist(), sample, remember)

    def _batches(self, ds_opt, opt, sample: float) -> list[tuple]:
        """The pass's slices (views into the optimizer state), with each batch's layer groups
        and weights on its device, built once: cutting them costs more Python time than the
        pass's arithmetic, and copying them every pass would block (a copy from the host).
        Rebuilt when the state tensors change (a checkpoint load replaces them; Adam updates
        them in place) and after forget_params."""
        key = (sample, tuple(id(st.get("exp_avg")) for st in opt.state.values()))
        cached = getattr(self, "_slices", None)
        if cached is None or cached[0] != key:
            owned = _Owned({id(p): i for i, p in self.all_params}, self.counted,
                           _flat_fragments(ds_opt, (p for _, p in self.all_params)))
            slices = [(group, st, (ps, ms, vs), _on(where, torch.long, ps[0].device),
                       _on(ws, torch.float64, ps[0].device))
                      for group, params in _optimized_params(ds_opt, opt)
                      for st, (ps, ms, vs, ws), where
                      in _state_batches(opt, group, params, owned, sample)]
            cached = self._slices = (key, slices)
        return cached[1]

    def _update_signals(self, norms: list[list[float]], sample: float,
                        remember: bool) -> dict[str, float]:
        delta, before, after = norms
        total = [math.sqrt(sum(x * x for x in row)) for row in norms]
        out = {"optim/update_norm": total[0] / total[1] if total[1] > 0 else 0.0,
               "optim/param_norm": total[2]}
        # the jump compares the same coordinates only: the same `sample`, the last remembered
        last_sample, last = getattr(self, "_last_after", None) or (None, None)
        if remember:
            self._last_after = (sample, after)
        # 0 by definition where this process has no previous step to compare with (its first
        # step, the first after a resume, after a rollback): a column every step has
        out["optim/param_jump"] = 0.0
        if last is not None and last_sample == sample:
            out["optim/param_jump"] = max((abs(b - a) / a for a, b in zip(last, before) if a > 0),
                                          default=0.0)
        if before[-1] == 0:  # every coordinate belongs to one layer group
            out.update({f"update_ratio/{g}": d / b for g, d, b in zip(self.groups, delta, before)
                        if b > 0})
        return out

    def forget_params(self) -> None:
        """The weights were replaced on purpose (a rollback): no jump to the next step, and the
        pass's slices are cut again (the state tensors they view may have been replaced)."""
        self._last_after = self._slices = None


def _optimized_params(ds_opt, opt):
    """(param group, the tensors the optimizer updates and keys its state by) for each group.
    ZeRO 3 hands each group its fp32 partition only for the step and empties
    group["params"] afterwards, so its partitions are read from the ZeRO optimizer."""
    flat = getattr(ds_opt, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        for i, p in enumerate(flat):
            yield opt.param_groups[ds_opt.sub_group_to_group_id[i]], [p]
    else:
        for group in opt.param_groups:
            yield group, group["params"]


class _Owned:
    """Which coordinates of the optimizer's tensors belong to which layer group, and which of
    them this rank counts: all of them, but a tensor replicated across the tensor-parallel
    group only on its first rank (GradNorms.counted), so sums over ranks count it once."""

    def __init__(self, groups: dict[int, int], counted: set[int],
                 fragments: dict[int, list[tuple[int, int, int]]]):
        self.groups, self.counted, self.fragments = groups, counted, fragments
        self.none = max(groups.values(), default=-1) + 1  # the slot of state no group owns

    def spans(self, p: torch.Tensor, sample: float, limit: int) -> list[tuple]:
        """(start, numel, layer group, weight) of the parts of optimizer tensor `p` to read.
        A model tensor is read at `sample` of its coordinates when sample < 1 (weight = numel
        / sampled, for its squares); a flat partition (ZeRO 1/2) whole, fragment by fragment."""
        frags = self.fragments.get(p.data_ptr())
        if frags is not None:
            return [(s, n, self.groups[i], 1.0) for start, numel, i in frags
                    if i in self.counted for s, n in _cut(start, numel, limit)]
        where = self.groups.get(id(p))
        if where is None:  # ZeRO 3's flat partitions mix the groups
            return [(s, n, self.none, 1.0) for s, n in _cut(0, p.numel(), limit)]
        if id(p) not in self.counted:
            return []
        spans = _sample_spans(p.numel(), sample) if sample < 1 else _cut(0, p.numel(), limit)
        weight = p.numel() / sum(n for _, n in spans)
        return [(s, n, where, weight) for s, n in spans]


def _cut(start: int, numel: int, limit: int) -> list[tuple[int, int]]:
    return [(s, min(limit, start + numel - s)) for s in range(start, start + numel, limit)]


def _flat_fragments(ds_opt, params) -> dict[int, list[tuple[int, int, int]]]:
    """data_ptr of each flat fp32 tensor the optimizer steps -> (start, numel, id(model
    tensor)) of the model tensors' parts in it; padding belongs to none. ZeRO 1/2 and
    BF16_Optimizer: DeepSpeed's `_hp_mapping` (the link it keeps for universal checkpoints);
    ZeRO 0 in bf16/fp16: FP16_Optimizer's groups flattened tensor after tensor, or
    FP16_UnfusedOptimizer's fp32 copy of each tensor."""
    out: dict[int, list[tuple[int, int, int]]] = {}
    params = list(params)
    for p in params:
        m = getattr(p, "_hp_mapping", None)
        if m is not None:
            address, frag = m.hp_fragment_address, m.hp_fragment
            flat = frag.data_ptr() - address.start * frag.element_size()
            out.setdefault(flat, []).append((address.start, address.numel, id(p)))
    if not out and hasattr(ds_opt, "fp16_groups") and hasattr(ds_opt, "fp32_groups_flat"):
        for lps, flat in zip(ds_opt.fp16_groups, ds_opt.fp32_groups_flat):
            starts = itertools.accumulate((p.numel() for p in lps), initial=0)
            out[flat.data_ptr()] = [(s, p.numel(), id(p)) for s, p in zip(starts, lps)]
    if not out and hasattr(ds_opt, "fp16_groups") and hasattr(ds_opt, "fp32_groups"):
        for lps, copies in zip(ds_opt.fp16_groups, ds_opt.fp32_groups):  # a copy per tensor
            out.update({c.data_ptr(): [(0, p.numel(), id(p))] for p, c in zip(lps, copies)})
    return out


def _state_batches(opt, group, params, owned: _Owned, sample: float = 1.0,
                   limit: int = 1 << 24):
    """(state of the batch's first tensor (for its step count), ([theta], [m], [v], [weight]),
    [layer group per slice]) in batches of at most `limit` elements, big tensors cut into flat
    slices, so the foreach temporaries stay bounded on a large model (`_Owned.spans`)."""
    by_step: dict[float, list] = {}
    for p in params:
        st = opt.state.get(p)
        if st and "exp_avg" in st:  # torch AdamW keeps the step per tensor, FusedAdam per group
            step = float(st.get("step", group.get("step", 1)))
            flat = [t.detach().view(-1) for t in (p, st["exp_avg"], st["exp_avg_sq"])]
            first = by_step.setdefault(step, [])
            if not first:
                first.append(st)  # read for the step count on each pass
            for s, n, where, weight in owned.spans(p, sample, limit):
                by_step[step].append(([t.narrow(0, s, n) for t in flat], weight, where))
    for step, (st, *slices) in by_step.items():
        batch, size = [], 0
        for sl in slices:
            if batch and size + sl[0][0].numel() > limit:
                yield st, _pack(batch), [w for _, _, w in batch]
                batch, size = [], 0
            batch.append(sl)
            size += sl[0][0].numel()
        if batch:
            yield st, _pack(batch), [w for _, _, w in batch]


def _pack(batch: list) -> tuple:
    ps, ms, vs = (list(ts) for ts in zip(*(views for views, _, _ in batch)))
    return ps, ms, vs, [w for _, w, _ in batch]


SAMPLE_BLOCK = 1024  # elements per sampled block: long enough to stream, short enough to stratify
SAMPLE_MIN = 4096  # tensors this small are read whole (their pass costs next to nothing)


@functools.lru_cache(maxsize=4096)  # drawn once per tensor size: the same subset every step
def _sample_spans(numel: int, fraction: float) -> list[tuple[int, int]]:
    """A fixed stratified subset: the tensor cut into equal strata, one SAMPLE_BLOCK-long block
    per stratum at an offset drawn once (seeded by the size, so the same on every rank and
    every run). Strata keep it spread over rows/columns; whole for small tensors."""
    want = int(numel * fraction)
    if numel <= SAMPLE_MIN or want < SAMPLE_BLOCK:
        return [(0, numel)]
    k = want // SAMPLE_BLOCK
    stratum = numel // k
    gen = torch.Generator().manual_seed(numel)
    offs = torch.randint(0, stratum - SAMPLE_BLOCK + 1, (k,), generator=gen).tolist()
    return [(i * stratum + o, SAMPLE_BLOCK) for i, o in enumerate(offs)]


def _on(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _corrections(step, group, device: torch.device) -> tuple:
    """AdamW's bias corrections bc = 1 - beta^step as (bc1 / sqrt(bc2), eps bc1) for
    _adamw_delta. torch's fused AdamW keeps the step count in a tensor on the parameters'
    device: computed there from it (float64, as its kernel does), 0-dim float32 tensors, as
    reading it would wait for the device; a Python count (DeepSpeed's Adams) or one on the
    host (torch AdamW without fused/capturable on a GPU) gives Python floats, read for free."""
    (b1, b2), eps = group["betas"], group["eps"]
    here = isinstance(step, torch.Tensor) and step.device == device
    s = step.double() if here else float(step)
    bc1, bc2 = 1 - b1 ** s, 1 - b2 ** s
    scale, shift = bc1 / bc2 ** 0.5, eps * bc1
    return (scale.float(), shift.float()) if here else (scale, shift)


def _adamw_delta(ps, ms, vs, ws, lr, group, corrections) -> torch.Tensor:
    """Per slice (3, slices): squared norms of the applied update, of the parameters before it
    and after it, each times the slice's weight `ws` (float64, on the slices' device), with
    foreach kernels (8 calls for the whole batch; per-tensor calls cost 2% of a small CPU
    step), no host read or copy (the bias corrections: `_corrections`).
    AdamW: p = p_old (1 - lr wd) - a with a = lr m^ / (sqrt(v^) + eps), so with
    q = p + a = (1 - lr wd) p_old, the change is p - p_old = (p (1 - lr wd) - q) / (1 - lr wd)."""
    scale, shift = corrections
    keep = 1 - lr * group["weight_decay"]
    ps, ms, vs = ([t.float() for t in ts] for ts in (ps, ms, vs))  # no-ops for fp32 state
    denom = torch._foreach_sqrt(vs)  # (sqrt(v^) + eps) bc1 = sqrt(v) bc1 / sqrt(bc2) + eps bc1
    torch._foreach_mul_(denom, scale)
    # alpha picks the Tensor overload: without it the binding reads a 0-dim tensor as a Scalar
    torch._foreach_add_(denom, shift, **({"alpha": 1} if torch.is_tensor(shift) else {}))
    q = torch._foreach_addcdiv(ps, ms, denom, value=lr)
    delta = torch._foreach_add(q, ps, alpha=-keep)
    sq = torch.stack([torch.stack(torch._foreach_norm(x)) for x in (delta, q, ps)]).double() ** 2
    sq[:2] *= 1 / keep ** 2  # a Python float: no tensor copied to the device
    return sq.mul_(ws)
