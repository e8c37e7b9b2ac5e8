"""Our models in Hugging Face's standard architectures, both ways: the config.json, and the
weights renamed (and, for GPT-2, transposed).

model.arch=gpt2 -> GPT2LMHeadModel. HF's GPT-2 keeps its projections in Conv1D modules,
whose weight is (in, out): our nn.Linear weights (out, in) are transposed. Our qkv packs
q, k, v along the output dimension in that order, as c_attn does. Our MLP uses the exact
(erf) GELU: activation_function "gelu" (OpenAI's checkpoints use "gelu_new", the tanh one).
LayerNorm eps 1e-5 both sides. HF's GPT-2 always has biases and a tied head.

model.arch=llama -> LlamaForCausalLM, a renaming: harness/model/llama.py uses HF's rotate-half RoPE,
repeat_interleave key/value head sharing, RMSNorm eps 1e-5, SwiGLU w2(silu(w1 x) * w3 x).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from harness.common.errors import HarnessError
from harness.config import ModelConfig

LLAMA_NORM_EPS = 1e-5
GPT2_LN_EPS = 1e-5
EOS_ID = 1  # harness.data.tokenizer: unk 0, eos 1, no bos, no pad

# (our name pattern, HF name pattern, transpose); {i} is the layer
GPT2_NAMES = [
    ("wte.weight", "transformer.wte.weight", False),
    ("wpe.weight", "transformer.wpe.weight", False),
    ("blocks.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight", False),
    ("blocks.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", False),
    ("blocks.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight", True),
    ("blocks.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias", False),
    ("blocks.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight", True),
    ("blocks.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias", False),
    ("blocks.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight", False),
    ("blocks.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", False),
    ("blocks.{i}.mlp.fc.weight", "transformer.h.{i}.mlp.c_fc.weight", True),
    ("blocks.{i}.mlp.fc.bias", "transformer.h.{i}.mlp.c_fc.bias", False),
    ("blocks.{i}.mlp.proj.weight", "transformer.h.{i}.mlp.c_proj.weight", True),
    ("blocks.{i}.mlp.proj.bias", "transformer.h.{i}.mlp.c_proj.bias", False),
    ("ln_f.weight", "transformer.ln_f.weight", False),
    ("ln_f.bias", "transformer.ln_f.bias", False),
]
LLAMA_NAMES = [
    ("wte.weight", "model.embed_tokens.weight", False),
    ("blocks.{i}.ln_1.weight", "model.layers.{i}.input_layernorm.weight", False),
    ("blocks.{i}.attn.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", False),
    ("blocks.{i}.attn.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", False),
    ("blocks.{i}.attn.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", False),
    ("blocks.{i}.attn.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", False),
    ("blocks.{i}.ln_2.weight", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("blocks.{i}.mlp.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", False),
    ("blocks.{i}.mlp.w3.weight", "model.layers.{i}.mlp.up_proj.weight", False),
    ("blocks.{i}.mlp.w2.weight", "model.layers.{i}.mlp.down_proj.weight", False),
    ("ln_f.weight", "model.norm.weight", False),
]


def check_expressible(m: ModelConfig, where: str = "harness export") -> None:
    """Refuse what the standard architecture cannot compute as our model does."""
    if getattr(m, "qk_norm", False):
        raise HarnessError(f"{where}: model.qk_norm=true has no place in Hugging Face's "
                           f"{_hf_class(m)} (no query/key norm): export a run trained "
                           f"without it")
    if m.arch == "gpt2" and not m.bias:
        raise HarnessError(f"{where}: model.bias=false cannot be expressed by "
                           f"GPT2LMHeadModel (it always has biases): train with "
                           f"model.bias=true, or use model.arch=llama")


def _hf_class(m: ModelConfig) -> str:
    return "LlamaForCausalLM" if m.arch == "llama" else "GPT2LMHeadModel"


def hf_config(m: ModelConfig) -> dict[str, Any]:
    """config.json for transformers (readable by 4.x and 5.x: rope_theta is written both as
    the old top-level key and in 5.x's rope_parameters)."""
    common = {"architectures": [_hf_class(m)], "vocab_size": m.vocab_size,
              "bos_token_id": None, "eos_token_id": EOS_ID, "pad_token_id": None,
              "initializer_range": m.init_std, "torch_dtype": "float32", "dtype": "float32",
              "use_cache": True}
    if m.arch == "gpt2":
        return {**common, "model_type": "gpt2", "n_positions": m.block_size, "n_ctx": m.block_size,
                "n_embd": m.d_model, "n_layer": m.n_layer, "n_head": m.n_head, "n_inner": None,
                "activation_function": "gelu", "layer_norm_epsilon": GPT2_LN_EPS,
                "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "tie_word_embeddings": True}
    from harness.config.model import ffn_hidden

    return {**common, "model_type": "llama", "hidden_size": m.d_model,
            "intermediate_size": ffn_hidden(m), "num_hidden_layers": m.n_layer,
            "num_attention_heads": m.n_head, "num_key_value_heads": m.n_kv_head or m.n_head,
            "head_dim": m.d_model // m.n_head, "max_position_embeddings": m.block_size,
            "rms_norm_eps": LLAMA_NORM_EPS, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "attention_dropout": m.dropout, "pretraining_tp": 1,
            "rope_theta": m.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "rope_scaling": None, "tie_word_embeddings": m.tie_embeddings}


def _table(m: ModelConfig) -> list[tuple[str, str, bool]]:
    names = GPT2_NAMES if m.arch == "gpt2" else LLAMA_NAMES
    rows = []
    for ours, theirs, transpose in names:
        layers = range(m.n_layer) if "{i}" in ours else [None]
        rows += [(ours.format(i=i), theirs.format(i=i), transpose) for i in layers]
    if m.arch == "llama" and not m.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head.weight", False))
    return rows


def to_hf(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF's (contiguous fp32 copies, tied head left out as HF saves it)."""
    out = {}
    for ours, theirs, transpose in _table(m):
        t = state[ours].detach().float()
        out[theirs] = (t.t() if transpose else t).contiguous().clone()
    return out


def from_hf(hf: dict[str, torch.Tensor], m: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """HF's state dict (with or without the `transformer.`/`model.` prefix, as the original
    OpenAI GPT-2 checkpoints are saved) -> ours; the tied head is the embedding."""
    hf = _with_prefix(hf, m)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, transpose in _table(m):
        if theirs not in hf:
            raise HarnessError(f"model.init_from={where}: no tensor {theirs} in its weights: "
                               f"not a {_hf_class(m)} of this shape (model.n_layer="
                               f"{m.n_layer}, model.arch={m.arch})")
        t = hf[theirs]
        out[ours] = t.t() if transpose else t
    out["lm_head.weight"] = out.get("lm_head.weight", out["wte.weight"])
    return out


def _with_prefix(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    prefix = "transformer." if m.arch == "gpt2" else "model."
    if any(k.startswith(prefix) for k in hf):
        return hf
    return {(k if k == "lm_head.weight" else prefix + k): v for k, v in hf.items()}


def shape_mismatch(hf_cfg: dict[str, Any], m: ModelConfig) -> str | None:
    """The first way an HF config.json differs from our model config, as `key: theirs vs
    model.ours`, or None when our model computes the same function."""
    want = hf_config(m)
    kind = hf_cfg.get("model_type")
    if kind != want["model_type"]:
        return f"model_type {kind!r} vs model.arch={m.arch} (wants {want['model_type']!r})"
    keys: list[tuple[str, str, Callable[[Any], Any]]] = [
        ("vocab_size", "vocab_size", int)]
    if m.arch == "gpt2":
        keys += [("n_layer", "n_layer", int), ("n_embd", "d_model", int),
                 ("n_head", "n_head", int), ("n_positions", "block_size", int)]
        if (hf_cfg.get("n_inner") or 4 * hf_cfg.get("n_embd", 0)) != 4 * m.d_model:
            return f"n_inner {hf_cfg.get('n_inner')} vs 4 x model.d_model={4 * m.d_model}"
    else:
        keys += [("num_hidden_layers", "n_layer", int), ("hidden_size", "d_model", int),
                 ("num_attention_heads", "n_head", int),
                 ("num_key_value_heads", "n_kv_head", int),
                 ("intermediate_size", "ffn_hidden", int), ("rope_theta", "rope_theta", float),
                 ("tie_word_embeddings", "tie_embeddings", bool)]
    for theirs, ours, cast in keys:
        got = _hf_value(hf_cfg, theirs)
        if got is None:
            continue
        if cast(got) != cast(want[theirs]):
            return f"{theirs} {got} vs model.{ours}={want[theirs]}"
    return None


def _hf_value(hf_cfg: dict[str, Any], key: str) -> Any:
    if key == "rope_theta":
        params = hf_cfg.get("rope_parameters") or {}
        return hf_cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if key == "num_key_value_heads":
        return hf_cfg.get(key) or hf_cfg.get("num_attention_heads")
    if key == "tie_word_embeddings":
        return hf_cfg.get(key, True)
    return hf_cfg.get(key)

