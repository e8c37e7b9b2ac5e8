"""A Llama-style decoder (model.arch=llama): pre-RMSNorm blocks, rotary positions, SwiGLU MLP,
grouped-query causal SDPA attention, no biases, tied or untied output head.

The interface is GPT's (harness/model/gpt.py): forward(idx, targets) returns the loss of
harness.model.loss.OutputHead (logits without targets), `blocks` with attention_part /
mlp_part, set_checkpointing from the shared BlockStack, and parameter names that
harness.model.layer_group groups as it groups GPT's: wte, blocks.N.ln_1 / ln_2 and ln_f
(RMSNorm weights), blocks.N.attn.{wq,wk,wv,wo}, blocks.N.mlp.{w1,w2,w3}, lm_head (untied).

Conventions, chosen so a Hugging Face LlamaForCausalLM export is a renaming: RoPE rotates
the two halves of each head (HF's rotate_half, not Meta's interleaved pairs), with frequency
theta^(-2i/d_head) for i < d_head/2, computed in fp32 and applied to q and k before attention;
query head h shares key/value head h // (n_head / n_kv_head) (repeat_interleave order);
mlp(x) = w2(silu(w1 x) * w3 x); RMSNorm eps 1e-5. model.qk_norm adds RMSNorm over each head's
queries and keys (blocks.N.attn.q_norm / k_norm) before RoPE, as Qwen3 does.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.config.model import ModelConfig, ffn_hidden
from harness.model.gpt import Block, BlockStack, CheckpointFn, attention_logit_bound
from harness.model.loss import OutputHead

NORM_EPS = 1e-5

def rope_tables(t: int, d_head: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (t, d_head) fp32, for positions 0..t-1 in the rotate-half layout."""
    inv = 1.0 / theta ** (torch.arange(0, d_head, 2, device=device, dtype=torch.float32) / d_head)
    angles = torch.outer(torch.arange(t, device=device, dtype=torch.float32), inv)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, h, t, d_head) rotated in fp32, returned in x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class GQAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.d_head = cfg.d_model // cfg.n_head
        self.theta = cfg.rope_theta
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * self.d_head, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_head * self.d_head, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_head * self.d_head, bias=False)
        self.wo = nn.Linear(cfg.n_head * self.d_head, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        if cfg.qk_norm:  # per head, before RoPE (as Qwen3 and OLMo 2's per-head variant)
            self.q_norm, self.k_norm = RMSNorm(self.d_head), RMSNorm(self.d_head)
        self.logit_bound: Optional[torch.Tensor] = None  # of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the head counts from the projections' widths: under tensor parallelism
        # (harness/parallel/tensor_parallel.py) this rank's n_head/tp and n_kv_head/tp heads
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.d_head).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.d_head).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.d_head).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_tables(t, self.d_head, self.theta, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.logit_bound = attention_logit_bound(q, k)  # rotations keep the norms
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=k.shape[1] != q.shape[1])
        y = y.transpose(1, 2).contiguous().view(b, t, -1)
        return self.resid_drop(self.wo(y))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden(cfg)
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)  # down
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Llama(BlockStack):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(RMSNorm(cfg.d_model), GQAttention(cfg), RMSNorm(cfg.d_model), SwiGLU(cfg))
            for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.d_model)
        self.lm_head = OutputHead(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._segments: tuple[tuple[int, int], ...] = ()
        self._sub_block: Optional[str] = None
        self.checkpoint_fn: Optional[CheckpointFn] = None
        # N(0, init_std) for every matrix, residual outputs (wo, w2) scaled by 1/sqrt(2 L)
        # as GPT's; RMSNorm weights start at 1
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits without targets; with them the loss of harness.model.loss.OutputHead (mean
        next-token cross-entropy, plus the z-loss term in training when train.z_loss > 0)."""
        x = self.drop(self.wte(idx))
        return self.lm_head(self.ln_f(self._blocks_forward(x)), targets)
