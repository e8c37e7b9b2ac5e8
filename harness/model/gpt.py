"""A GPT decoder: pre-LayerNorm blocks, causal SDPA attention, GELU MLP, tied embeddings.

Activation checkpointing is decided outside (plan.checkpoint_segments) and applied here by
wrapping block ranges, or one sub-block per layer, in a checkpoint function; the trainer
passes deepspeed.checkpointing.checkpoint after calling deepspeed.checkpointing.configure.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.config import ModelConfig
from harness.model.loss import OutputHead

CheckpointFn = Callable[..., torch.Tensor]


@torch.no_grad()
def attention_logit_bound(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """An upper bound on every attention logit q_i . k_j / sqrt(d_head) of a layer, from
    Cauchy-Schwarz: max |q_i| x max |k_j| per (sequence, head). SDPA never hands back its
    logits; this costs two norms over q and k. q (b, h, t, d_head), k (b, h_kv, t, d_head): query
    head i reads key head i // (h / h_kv)."""
    q_max = q.float().norm(dim=-1).amax(dim=-1)
    k_max = k.float().norm(dim=-1).amax(dim=-1)
    k_max = k_max.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q_max * k_max).amax() / math.sqrt(q.shape[-1])


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        d_head = cfg.d_model // cfg.n_head
        if cfg.qk_norm:  # per head, over d_head: Wortsman et al. 2023's qk-layernorm
            self.q_norm = nn.LayerNorm(d_head, bias=cfg.bias)
            # no key bias: it adds q_i . b to every logit of query i, which softmax ignores, so
            # its gradient is 0 up to rounding, and Adam would turn that rounding into steps
            self.k_norm = nn.LayerNorm(d_head, bias=False)
        self.logit_bound: Optional[torch.Tensor] = None  # of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        # the local width: under tensor parallelism (harness.parallel.tensor_parallel) a rank holds
        # n_head / tp heads of q, k and v, so heads are counted from it, not from n_head
        q, k, v = self.qkv(x).chunk(3, dim=2)
        q, k, v = (z.reshape(b, t, -1, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        self.logit_bound = attention_logit_bound(q, k)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, -1)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm residual block, x + attn(ln_1(x)) then x + mlp(ln_2(x)), from the parts an
    architecture chooses (GPT-2: LayerNorm, CausalSelfAttention, MLP; harness.model.llama: its
    own)."""

    def __init__(self, ln_1: nn.Module, attn: nn.Module, ln_2: nn.Module, mlp: nn.Module):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    def attention_part(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln_1(x))

    def mlp_part(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_part(self.attention_part(x))


class BlockStack(nn.Module):
    """Activation checkpointing over `self.blocks` (each with attention_part / mlp_part),
    the output head's loss settings and the per-forward statistics; shared by GPT and
    harness.model.llama.Llama."""

    blocks: nn.ModuleList
    lm_head: OutputHead
    _segments: tuple[tuple[int, int], ...] = ()
    _sub_block: Optional[str] = None
    checkpoint_fn: Optional[CheckpointFn] = None

    def set_checkpointing(self, segments: tuple[tuple[int, int], ...], policy: str,
                          checkpoint_fn: Optional[CheckpointFn]) -> None:
        """segments from plan.checkpoint_segments; policy attention/mlp checkpoints that
        sub-block of every layer; checkpoint_fn e.g. deepspeed.checkpointing.checkpoint."""
        if segments and checkpoint_fn is None:
            raise ValueError("checkpointing segments given without a checkpoint function")
        self._segments = tuple(segments)
        self._sub_block = policy if policy in ("attention", "mlp") else None
        self.checkpoint_fn = checkpoint_fn

    def set_loss(self, z_loss: float, chunk_tokens: int) -> None:
        """train.z_loss and train.loss_chunk_tokens (harness.model.loss)."""
        self.lm_head.z_loss, self.lm_head.chunk_tokens = z_loss, chunk_tokens

    def keep_row_losses(self, on: bool) -> None:
        """Make each training forward with targets keep its rows' summed CE (row_losses)."""
        self.lm_head.keep_rows = on

    def row_losses(self) -> Optional[torch.Tensor]:
        """Of the last training forward with targets, with keep_row_losses on: each row's sum
        of per-token CE (fp32, detached, on the model's device); None otherwise."""
        return self.lm_head.row_ce

    def forward_stats(self) -> torch.Tensor:
        """Of the last forward with targets, fp32 on the model's device: mean CE, mean log(Z)^2,
        max log Z, then each layer's attention-logit bound (STATS_HEAD names the first three)."""
        bounds = torch.stack([block.attn.logit_bound for block in self.blocks])
        return torch.cat((self.lm_head.stats, bounds.float()))

    def _run_range(self, start: int, end: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks[start:end]:
                x = block(x)
            return x
        return run

    def _blocks_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            # no backward will follow (evaluation, sampling): there is nothing to save, so
            # nothing to checkpoint; and DeepSpeed's contiguous-memory buffers, which only a
            # backward resets, would overflow on the next forward (IndexError)
            return self._run_range(0, len(self.blocks))(x)
        if self._sub_block is not None:
            for block in self.blocks:
                if self._sub_block == "attention":
                    x = block.mlp_part(self.checkpoint_fn(block.attention_part, x))
                else:
                    x = self.checkpoint_fn(block.mlp_part, block.attention_part(x))
            return x
        i = 0
        for start, end in self._segments:
            x = self._run_range(i, start)(x)
            x = self.checkpoint_fn(self._run_range(start, end), x)
            i = end
        return self._run_range(i, len(self.blocks))(x)


class GPT(BlockStack):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(nn.LayerNorm(cfg.d_model, bias=cfg.bias), CausalSelfAttention(cfg),
                  nn.LayerNorm(cfg.d_model, bias=cfg.bias), MLP(cfg))
            for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = OutputHead(cfg.d_model, cfg.vocab_size)
        self.lm_head.weight = self.wte.weight  # tied
        self._segments: tuple[tuple[int, int], ...] = ()
        self._sub_block: Optional[str] = None
        self.checkpoint_fn: Optional[CheckpointFn] = None
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits without targets; with them the loss of harness.model.loss.OutputHead (mean
        next-token cross-entropy, plus the z-loss term in training when train.z_loss > 0)."""
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        return self.lm_head(self.ln_f(self._blocks_forward(x)), targets)


STATS_HEAD = ("ce", "z_sq", "lse_max")  # forward_stats()'s first three entries
