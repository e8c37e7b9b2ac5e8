"""The output head and its loss: cross-entropy, PaLM's z-loss, and a chunked form of both that
never holds a micro-batch's full fp32 logits.

`OutputHead` is the models' `lm_head` (an nn.Linear, so state dicts and ZeRO 3's parameter
gathering see a plain Linear). Called with targets it returns the training loss

    mean_t CE_t + z_loss x mean_t log(Z_t)^2,        log Z_t = logsumexp(logits_t)

and keeps `stats` (detached, fp32): [mean CE, mean log(Z)^2, max log Z] for the metrics. With
`keep_rows` set (the trainer sets it for a data mixture's per-source losses) a forward in
training mode also keeps
`row_ce` (detached, fp32): each row's SUM of per-token CE, from the same forward. The per-token
CE is a by-product of both paths (the picked log-probability, the chunk's lse minus its target
logit), written into a buffer, so the loss and its gradients are the same ops as without it;
without keep_rows nothing is allocated or written (row_ce is None).

chunk_tokens = 0 is the plain path: logits for every token, upcast to fp32, F.cross_entropy
(autograd keeps the fp32 log-softmax: tokens x vocab x 4 bytes; log Z is read off it, so the
z-loss keeps nothing more: ce_and_lse). chunk_tokens = C computes logits C tokens at a time
inside one autograd Function and makes their gradients right there (Liger's fused linear
cross-entropy, Wijmans et al. 2024 "Cut your losses"): what stays for backward is the gradient
of the head's input (tokens x d) and of its weight (vocab x d, fp32), not tokens x vocab. The
matmuls are the plain path's (forward, input grad, weight grad); the chunks' logits are never
kept. Each chunk's one logsumexp serves its CE, z-loss and stats (_chunk).

The gradients made in the forward are those of the SUM of the per-token losses; backward scales
them by g / tokens in fp32. With fp16 that matters: g carries the loss scale, and unnormalised
(p - onehot) rounds to fp16 without the underflow that p / tokens would meet.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _z_term(z_loss: float, lse: torch.Tensor) -> torch.Tensor | float:
    return z_loss * (lse * lse).mean() if z_loss > 0 else 0.0


def _stats(ce: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    lse = lse.detach()
    return torch.stack((ce.detach().float(), (lse * lse).mean(), lse.max()))


def ce_and_lse(logits: torch.Tensor, targets: torch.Tensor,
               token_ce: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE and every token's log Z from one pass over the vocab: F.cross_entropy is
    log_softmax then nll_loss, and log Z_t = logit_t[target] - log p_t[target] is read off the
    same log-probabilities. A second logsumexp over the fp32 logits, only for the stats, made
    the loss 1.44x slower at z_loss = 0 and 1.67x with z_loss > 0, where it also kept the logits
    for backward (bench/bench_loss.py: 4096 tokens x 50257, forward + backward on this CPU).

    The CE and its gradients are F.cross_entropy's bit for bit (the same ops; measured equal
    from fp32 and from bf16 logits). log Z carries log_softmax's rounding (its normaliser and
    two subtractions), that of the CE it reports: at the GPT-2 vocab within 9e-6 of
    torch.logsumexp at log Z ~ 20 (4.4e-7 relative), the precision of train/z_loss and
    model/logit_lse_max. With z_loss > 0 the gradients are as close to fp64's as the logsumexp
    form's (both ~1e-8 at a largest entry of 2e-3).

    token_ce: a buffer (tokens,) that receives each token's CE, -log p_t[target], detached."""
    logp = F.log_softmax(logits, dim=-1)
    at = (torch.arange(len(targets), device=targets.device), targets)
    # indexing, not gather: gather's backward keeps its whole input (the logits) alive
    picked = logp[at]
    if token_ce is not None:
        torch.neg(picked.detach(), out=token_ce)
    return F.nll_loss(logp, targets), logits[at] - picked


def plain_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               z_loss: float, token_ce: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full fp32 logits, as every GPT reference does; the z term only when z_loss > 0 (so the
    loss with z_loss = 0 is bit for bit F.cross_entropy's). token_ce: see ce_and_lse."""
    logits = F.linear(h, weight).float().view(-1, weight.shape[0])
    ce, lse = ce_and_lse(logits, targets.reshape(-1), token_ce)
    return ce + _z_term(z_loss, lse), _stats(ce, lse)


def _chunk(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
           token_ce: Optional[torch.Tensor]):
    """fp32 logits of a chunk of tokens, their log Z, and the chunk's summed CE (each token's
    CE also written into token_ce, the chunk's slice of the buffer, when given)."""
    logits = F.linear(h, weight).float()
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(1, targets[:, None]).squeeze(1)
    if token_ce is not None:
        token_ce.copy_(ce)
    return logits, lse, ce.sum()


def _part(buffer: Optional[torch.Tensor], i: int, chunk: int) -> Optional[torch.Tensor]:
    return None if buffer is None else buffer[i:i + chunk]


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, z_loss: float, chunk: int, token_ce):
        n = h.shape[0]
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=h.device)
        for i in range(0, n, chunk):
            hc, tc = h[i:i + chunk], targets[i:i + chunk]
            logits, lse, ce = _chunk(hc, weight, tc, _part(token_ce, i, chunk))
            lse_all[i:i + chunk] = lse
            ce_sum += ce
            # d(sum CE + z sum lse^2) / d logits = p (1 + 2 z lse) - onehot, p = softmax
            dlogits = logits.sub_(lse[:, None]).exp_()
            if z_loss > 0:
                dlogits.mul_(1 + 2 * z_loss * lse[:, None])
            dlogits.scatter_add_(1, tc[:, None], torch.full_like(lse[:, None], -1.0))
            dlogits = dlogits.to(h.dtype)
            grad_h[i:i + chunk] = dlogits @ weight
            grad_w.add_(dlogits.t() @ hc)  # each chunk's matmul in h's dtype, summed in fp32
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n, ctx.weight_dtype = n, weight.dtype
        ce = ce_sum / n
        loss = ce + _z_term(z_loss, lse_all)
        stats = _stats(ce, lse_all)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g, _g_stats):
        grad_h, grad_w = ctx.saved_tensors
        scale = g.float() / ctx.n
        return ((grad_h.float() * scale).to(grad_h.dtype),
                (grad_w * scale).to(ctx.weight_dtype), None, None, None, None)


def chunked_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 z_loss: float, chunk: int, token_ce: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """token_ce: a buffer (tokens,) that receives each token's CE."""
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedLoss.apply(h2, weight, t2, z_loss, chunk, token_ce)
    # no backward to come (evaluation): the same sums without gradients
    ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    lses = []
    for i in range(0, h2.shape[0], chunk):
        _, lse, ce = _chunk(h2[i:i + chunk], weight, t2[i:i + chunk], _part(token_ce, i, chunk))
        ce_sum += ce
        lses.append(lse)
    lse = torch.cat(lses)
    ce = ce_sum / h2.shape[0]
    return ce + _z_term(z_loss, lse), _stats(ce, lse)


class OutputHead(nn.Linear):
    """lm_head: logits without targets, the training loss with them (see the module doc)."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__(d_model, vocab_size, bias=False)
        self.z_loss = 0.0
        self.chunk_tokens = 0
        self.stats: Optional[torch.Tensor] = None
        self.keep_rows = False
        self.row_ce: Optional[torch.Tensor] = None  # per row: summed CE (keep_rows only)

    def forward(self, h: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if targets is None:
            return super().forward(h)
        z_loss = self.z_loss if self.training else 0.0  # a regulariser: evaluation scores CE
        token_ce = (torch.empty(targets.numel(), dtype=torch.float32, device=h.device)
                    if self.keep_rows and self.training else None)
        if self.chunk_tokens:
            loss, self.stats = chunked_loss(h, self.weight, targets, z_loss, self.chunk_tokens,
                                            token_ce)
        else:
            loss, self.stats = plain_loss(h, self.weight, targets, z_loss, token_ce)
        # rows are targets' leading dimension ((batch, time) from the models)
        self.row_ce = None if token_ce is None else token_ce.view(len(targets), -1).sum(1)
        return loss
