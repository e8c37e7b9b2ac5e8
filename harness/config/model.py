"""model.*: the architecture's shape (gpt2 or llama) and its range checks, and the one derived
width other modules share (Llama's SwiGLU hidden size)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from harness.common.errors import HarnessError, check_line, check_number

ARCHS = ("gpt2", "llama")
FFN_MULTIPLE = 256  # Llama rounds its SwiGLU width up to a multiple of this


@dataclass
class ModelConfig:
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    block_size: int = 64  # sequence length
    vocab_size: int = 256
    dropout: float = 0.0
    bias: bool = True
    init_std: float = 0.02
    # gpt2: harness/model/gpt.py (LayerNorm, learned positions, GELU MLP, tied head); llama:
    # harness/model/llama.py (RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases:
    # model.bias is unused there)
    arch: str = "gpt2"
    n_kv_head: Optional[int] = None  # llama: key/value heads (null = n_head); divides n_head
    rope_theta: float = 10000.0  # llama: rotary base
    tie_embeddings: bool = True  # llama: the output head shares the token embedding
    # llama: SwiGLU hidden width; null = int(8 d / 3) rounded up to a multiple of 256 (Llama's)
    ffn_hidden: Optional[int] = None
    # LayerNorm (gpt2) / RMSNorm (llama) over each head's queries and keys before attention
    # (Wortsman et al. 2023; OLMo 2): bounds the attention logits' growth
    qk_norm: bool = False
    # a Hugging Face directory from `harness export --to hf` (or a GPT-2 / Llama checkpoint of
    # this shape): the initial weights of a new run; a run that resumes ignores it
    init_from: Optional[str] = None

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise HarnessError(f"model.arch={self.arch!r} is not one of {', '.join(ARCHS)}")
        for key, high in (("n_layer", 4096), ("n_head", 4096), ("d_model", 2**20),
                          ("block_size", 2**24), ("vocab_size", 2**24)):
            check_number(f"model.{key}", getattr(self, key), 1, high, integer=True)
        if self.d_model % self.n_head:
            raise HarnessError(f"model.d_model={self.d_model} must be divisible by "
                               f"model.n_head={self.n_head}")
        check_number("model.dropout", self.dropout, 0, 1, high_open=True, fix="e.g. 0.0 or 0.1")
        check_number("model.init_std", self.init_std, 0, 1, low_open=True, fix="e.g. 0.02")
        check_number("model.n_kv_head", self.n_kv_head, 1, 4096, integer=True, none_ok=True,
                     fix="null uses model.n_head")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise HarnessError(f"model.n_kv_head={self.n_kv_head} must divide "
                               f"model.n_head={self.n_head}")
        check_number("model.rope_theta", self.rope_theta, 0, 1e12, low_open=True,
                     fix="e.g. 10000.0")
        check_number("model.ffn_hidden", self.ffn_hidden, 1, 2**22, integer=True, none_ok=True,
                     fix="null uses int(8 d / 3) rounded up to a multiple of 256")
        if self.init_from is not None:
            check_line("model.init_from", self.init_from,
                       fix="set it to a Hugging Face model directory, or null")
        if self.arch == "gpt2":
            for key, unset in (("n_kv_head", None), ("ffn_hidden", None),
                               ("tie_embeddings", True)):
                if getattr(self, key) != unset:
                    raise HarnessError(f"model.{key}={getattr(self, key)} needs model.arch=llama "
                                       f"(gpt2 has no such setting): set model.arch=llama or "
                                       f"remove model.{key}")


def ffn_hidden(cfg: ModelConfig) -> int:
    """model.ffn_hidden, or Llama's rounding: int(2/3 of 4 d), up to a multiple of 256."""
    if cfg.ffn_hidden is not None:
        return cfg.ffn_hidden
    return FFN_MULTIPLE * math.ceil(int(8 * cfg.d_model / 3) / FFN_MULTIPLE)
