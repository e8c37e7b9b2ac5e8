"""What one Llama block (harness/model/llama.py) saves for backward, by op, for
harness.model.memory's predictions; measured against the saved-bytes meter in
tests/model/test_llama_memory.py.

B = b*t*d elements in the activation dtype (a bytes), F = b*t*ffn_hidden, r = n_kv_head/n_head.
- RMSNorm on the CPU is composite (fp32 upcast, x * rstd, * weight): it keeps its input (the
  fp32 copy under bf16), rstd (b*t fp32), the normalised fp32 tensor and, through the next
  matmul, its output. fused=True (a GPU's fused kernel): the input and rstd only.
- Attention: RoPE's tables (cos, sin: t x d_head fp32; the rotation keeps nothing else), then
  SDPA's fused path (q B, k and v r*B each, output B, logsumexp b*h*t fp32; the output is laid
  out (b, t, h) as q was, so wo reads it without a copy); or, with
  attention dropout off the fused path, the math path (q and k, v expanded to every head: 3B,
  scores, dropout mask and dropped probabilities 3 x b*h*t*t, wo's input B). qk_norm adds a
  per-head RMSNorm on q (B) and k (r*B), and a copy of the output for wo (the norm leaves q
  in (b, h, t) order).
- SwiGLU: w1's output, silu's output, w3's output and their product: 4F. Dropout masks B.

Per rank of a tensor-parallel group of tp (harness/parallel/tensor_parallel.py; measured on 2 real
ranks in tests/plan/test_tp_memory.py): what lies between the column-parallel wq/wk/wv, w1/w3 and
the row-parallel wo, w2 is the rank's h/tp query and kv/tp key/value heads or ffn/tp columns, so
/tp: q, k, v, RoPE's outputs, SDPA's saved tensors (the math path's T x T tensors of h/tp
heads), the attention output, and SwiGLU's 4F. Whole on every rank: the RMSNorms' inputs,
statistics and outputs (the column-parallel layers' input), RoPE's tables, the residual stream,
the row-parallel outputs' dropout masks, and the head.
"""
from __future__ import annotations


def _norm(elems: int, rows: int, a: int, fused: bool, with_input: bool) -> int:
    """Bytes one RMSNorm keeps over `elems` elements in `rows` rows; with_input: count the
    input (False when another part already holds that storage)."""
    if fused:
        return (elems * a if with_input else 0) + rows * 4
    upcast = elems * 4 if a != 4 else 0  # the fp32 copy of a bf16 input: a storage of its own
    own_input = elems * a if with_input and a == 4 else 0
    return upcast + own_input + rows * 4 + elems * 4


def llama_block_parts(cfg, micro: int, a: int, fused: bool, ffn: int,
                      tp: int = 1) -> dict[str, int]:
    """Bytes one block saves for backward on one rank of a tensor-parallel group of tp."""
    b, t, d, h = micro, cfg.block_size, cfg.d_model, cfg.n_head
    r = (cfg.n_kv_head or h) / h
    unit, rows = b * t * d * a, b * t
    shard, heads = unit // tp, h // tp  # this rank's columns and heads between the layers
    mask = unit if cfg.dropout > 0 else 0
    tables = 2 * t * (d // h) * 4
    math_path = cfg.dropout > 0 and not fused
    if math_path:
        core = 3 * shard + 3 * b * heads * t * t * a + shard
    else:
        core = shard + 2 * int(r * shard) + shard + b * heads * t * 4
    qk = 0
    if cfg.qk_norm:  # q's and k's per-head norms (tp 1 only: config refuses it at tp > 1)
        qk = sum(_norm(int(share * b * t * d), int(share * b * h * t), a, fused, True)
                 for share in (1.0, r))
        if not math_path:  # q leaves the norm in (b, h, t) order: wo's input is a copy
            qk += unit
    out = unit  # the norm's output, saved by the next matmul(s)
    return {"input": unit,
            "attention": _norm(b * t * d, rows, a, fused, False) + out + tables + qk + core
            + mask,
            "mlp": unit + _norm(b * t * d, rows, a, fused, False) + out
            + 4 * b * t * (ffn // tp) * a + mask}


def llama_head(cfg, micro: int, a: int, fused: bool) -> int:
    """ln_f's saved bytes with its input and output (the output is the head matmul's input)."""
    b, t, d = micro, cfg.block_size, cfg.d_model
    return _norm(b * t * d, b * t, a, fused, True) + b * t * d * a
