"""Gradient and update norms computed by the harness, at every ZeRO stage and precision.

The update norm ||delta theta|| / ||theta|| is read back from AdamW's own state after the
step (the exact update it applied), so no copy of the parameters is kept.

Pre-clip gradient norms are needed BEFORE engine.step() (DeepSpeed computes its own inside
step(), after the update, and not at all at ZeRO 0 in fp32), so that a monitor can skip an
update. Each rank sums squares over the gradient it holds: the full p.grad at ZeRO 0 in fp32
(already all-reduced), the fragment of its partition at ZeRO 1/2 and under bf16
(DeepSpeed's `_hp_mapping`), its partition at ZeRO 3; one all-reduce of a small vector
(one entry per layer group) then gives global and per-group norms.
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


def local_grads(engine) -> list[torch.Tensor]:
    """The gradient storage this rank holds and the optimizer will read (views, not copies)."""
    grads = [_local_grad(p) for p in engine.module.parameters()]
    return [g for g in grads if g is not None and g.numel()]


class GradNorms:
    def __init__(self, engine, world_size: int, fp16: bool):
        self.engine, self.fp16 = engine, fp16
        named = list(engine.module.named_parameters())
        self.groups = sorted({layer_group(n) for n, _ in named})
        index = {g: i for i, g in enumerate(self.groups)}
        self.params = [(index[layer_group(n)], p) for n, p in named]
        # full, identical gradients on every rank only at ZeRO 0 in fp32
        stage0_fp32 = engine.zero_optimization_stage() == 0 and not (
            engine.bfloat16_enabled() or engine.fp16_enabled())
        self.reduce = world_size > 1 and not stage0_fp32

    def preclip(self) -> tuple[float, dict[str, float]]:
        """Global L2 norm of the accumulated, averaged gradient and the norm of each group."""
        sq = torch.zeros(len(self.groups), dtype=torch.float64, device=self.engine.device)
        for i, p in self.params:
            g = _local_grad(p)
            if g is not None and g.numel():
                sq[i] += torch.linalg.vector_norm(g.float()).double() ** 2
        if self.reduce:
            torch.distributed.all_reduce(sq)
        sq = sq.cpu()  # the one device-to-host sync
        scale = self.engine.optimizer.cur_scale if self.fp16 else 1.0  # fp16 grads are scaled
        norms = (sq.sqrt() / scale).tolist()
        return math.sqrt(sum(n * n for n in norms)), dict(zip(self.groups, norms))

    def update_ratio(self, lr: float) -> float:
        """||delta theta|| / ||theta|| of the AdamW step just taken with learning rate `lr`."""
        opt = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        acc = torch.zeros(2, dtype=torch.float64, device=self.engine.device)  # |d|^2, |theta|^2
        for group in opt.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                state = opt.state.get(p)
                if state and "exp_avg" in state:
                    step = float(state.get("step", group.get("step", 1)))
                    acc += _adamw_delta(p, state, lr, group["weight_decay"], b1, b2,
                                        group["eps"], step)
        if self.reduce:
            torch.distributed.all_reduce(acc)
        num, den = acc.sqrt().tolist()
        return num / den if den > 0 else 0.0


def _adamw_delta(p, state, lr, wd, b1, b2, eps, step, chunk=1 << 24) -> torch.Tensor:
    """Squared norms of the applied update and of the parameters before it, in chunks so
    the temporaries stay small. AdamW: p_new = p_old (1 - lr wd) - lr m^ / (sqrt(v^) + eps)."""
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    out = torch.zeros(2, dtype=torch.float64, device=p.device)
    flat, m, v = p.detach().view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
    for s in range(0, flat.numel(), chunk):
        pc, mc, vc = (t[s:s + chunk].float() for t in (flat, m, v))
        adam = (lr / bc1) * mc / (vc.sqrt() / math.sqrt(bc2) + eps)
        old = (pc + adam) / (1 - lr * wd)
        out[0] += torch.linalg.vector_norm(pc - old).double() ** 2
        out[1] += torch.linalg.vector_norm(old).double() ** 2
    return out.to(p.device)
