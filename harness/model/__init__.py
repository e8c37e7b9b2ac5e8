"""The models and what is computed from their shape alone.

gpt.py (GPT-2: the shared block stack, attention, MLP), llama.py (Llama: RMSNorm, RoPE,
SwiGLU, grouped-query attention), loss.py (the output head: chunked cross-entropy, z-loss),
hf_format.py (weight names in Hugging Face's layout), and the arithmetic: flops.py (FLOPs per
token, peak FLOP/s, MFU), memory.py and llama_memory.py (activation bytes per checkpointing
policy). This package imports harness.config and harness.common only.
"""
from __future__ import annotations

import torch.nn as nn

from harness.config import ModelConfig
from harness.model.gpt import GPT
from harness.model.llama import Llama


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, norms (1-D) stay undecayed, as in GPT-2/nanoGPT."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def layer_group(name: str) -> str:
    """Group a parameter name for per-group gradient norms (the head is tied to wte unless
    llama's model.tie_embeddings=false: then lm_head is the head). harness.model.llama uses the same
    names: wte, blocks.N.ln_1/ln_2 and ln_f (RMSNorm), blocks.N.attn.*, blocks.N.mlp.*."""
    if name.startswith(("wte", "wpe")):
        return "embeddings"
    if "ln_" in name:
        return "norms"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "head"


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model `model.arch` names: GPT (gpt2) or harness.model.llama.Llama (llama)."""
    return Llama(cfg) if cfg.arch == "llama" else GPT(cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
