"""Gradient and update norms computed by the harness, at every ZeRO stage and precision.

The update norm ||delta theta|| / ||theta|| is read back from AdamW's own state after the
step (the exact update it applied), so no copy of the parameters is kept.

Pre-clip gradient norms are needed BEFORE engine.step() (DeepSpeed computes its own inside
step(), after the update, and not at all at ZeRO 0 in fp32), so that a monitor can skip an
update. Each rank sums squares over the gradient it holds: the full p.grad at ZeRO 0 (already
all-reduced, identical on every rank, so only rank 0 counts it), the fragment of its
partition at ZeRO 1/2 (DeepSpeed's `_hp_mapping`), its partition at ZeRO 3. The trainer sums
the small vector (one entry per layer group) over ranks in its one per-step all-reduce.
"""
from __future__ import annotations

import math

import torch

from harness.model import layer_group


def _local_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    if hasattr(p, "ds_id"):  # ZeRO 3: this rank's partition
        return p._z3_optimizer.get_local_fp32_grad_for_param(p)
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
    full = bf16_full_grads(engine)
    grads = [full[id(p)] if full else _local_grad(p) for p in engine.module.parameters()]
    return [g for g in grads if g is not None and g.numel()]


class GradNorms:
    def __init__(self, engine, comm, rank: int):
        self.engine, self.comm = engine, comm
        named = list(engine.module.named_parameters())
        self.groups = sorted({layer_group(n) for n, _ in named})
        index = {g: i for i, g in enumerate(self.groups)}
        self.params = [(index[layer_group(n)], p) for n, p in named]
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

    def local_squares(self) -> torch.Tensor:
        """Per-group sums of squares of the gradient this rank holds (float64, on the engine's
        device, unreduced): sum them over ranks (one packed all-reduce with the step's other
        scalars), then `signals`. A few foreach kernels, not a loop of kernels per tensor."""
        if self.sync_first:
            torch.cuda.synchronize()
        buckets: dict[tuple, tuple[list, list]] = {}
        for i, p in self.params:
            g = self.full[id(p)] if self.full else _local_grad(p)
            if g is not None and g.numel():
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
        ds_opt = self.engine.optimizer
        opt = getattr(ds_opt, "optimizer", ds_opt)
        acc = torch.zeros(2, dtype=torch.float64, device=self.engine.device)  # |d|^2, |theta|^2
        if lr != 0:  # AdamW scales the weight decay by lr too: nothing moved (still reduce)
            for group, params in _optimized_params(ds_opt, opt):
                for step, batch in _state_batches(opt, group, params):
                    acc += _adamw_delta(*batch, lr, group, step).to(acc.device)
        num, den = self.comm.all_reduce(acc * self.state_weight).sqrt().tolist()
        return num / den if den > 0 else 0.0


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


def _state_batches(opt, group, params, limit: int = 1 << 24):
    """(step, ([theta], [m], [v])) in batches of at most `limit` elements, big tensors cut
    into flat slices, so the foreach temporaries stay bounded on a large model."""
    by_step: dict[float, list] = {}
    for p in params:
        st = opt.state.get(p)
        if st and "exp_avg" in st:  # torch AdamW keeps the step per tensor, FusedAdam per group
            step = float(st.get("step", group.get("step", 1)))
            flat = [t.detach().view(-1) for t in (p, st["exp_avg"], st["exp_avg_sq"])]
            for s in range(0, flat[0].numel(), limit):
                by_step.setdefault(step, []).append([t[s:s + limit] for t in flat])
    for step, slices in by_step.items():
        batch, size = [], 0
        for sl in slices:
            if batch and size + sl[0].numel() > limit:
                yield step, tuple(map(list, zip(*batch)))
                batch, size = [], 0
            batch.append(sl)
            size += sl[0].numel()
        if batch:
            yield step, tuple(map(list, zip(*batch)))


def _adamw_delta(ps, ms, vs, lr, group, step) -> torch.Tensor:
    """Squared norms of the applied update and of the parameters before it, with foreach
    kernels (6 calls for the whole batch; per-tensor calls cost 2% of a small CPU step).
    AdamW: p = p_old (1 - lr wd) - a with a = lr m^ / (sqrt(v^) + eps), so with
    q = p + a = (1 - lr wd) p_old, the change is p - p_old = (p (1 - lr wd) - q) / (1 - lr wd)."""
    (b1, b2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    ps, ms, vs = ([t.float() for t in ts] for ts in (ps, ms, vs))  # no-ops for fp32 state
    denom = torch._foreach_sqrt(vs)  # sqrt(v^) + eps, times sqrt(bc2)
    torch._foreach_add_(denom, eps * math.sqrt(bc2))
    q = torch._foreach_addcdiv(ps, ms, denom, value=lr * math.sqrt(bc2) / bc1)
    delta = torch._foreach_add(q, ps, alpha=-(1 - lr * wd))
    sq = torch.stack([torch.stack(torch._foreach_norm(x)) for x in (delta, q)]).double() ** 2
    return sq.sum(dim=1) / (1 - lr * wd) ** 2
