"""Model FLOPs utilisation: the accelerator peaks and the one formula, kept free of torch.

MFU (PaLM, appendix B) is the fraction of the hardware's peak that the model's own arithmetic
would use at the measured speed; recomputation (activation checkpointing) and padding do not
count, so it compares runs and systems fairly. The peak is the one of the precision the
matmuls run in: bf16/fp16 on the dense 16-bit tensor-core rate, fp32 on the dense TF32
tensor-core rate (harness.train.engine turns TF32 on for fp32 matmuls on a GPU).

Derivation. One training token costs F = `harness.model.flops.flops_per_token` FLOPs (6N for the
matmuls forward and backward, plus attention's 12 L d T). The metrics report the GLOBAL rate
R = global batch tokens / step time, produced by W accelerators together. So the model
performs F x R FLOP/s across the job, and each accelerator contributes F x R / W of them,
against its peak P:

    MFU = F x R / (W x P)

Example, GPT-2 small (F = 855,166,464) at R = 400,000 tokens/s on W = 8 H100 SXMs in bf16
(P = 989e12): 855,166,464 x 400,000 / (8 x 989e12) = 0.0432.
"""
from __future__ import annotations

import re
from typing import Optional

from harness.config import ModelConfig

PRECISIONS = ("bf16", "fp16", "fp32")
_T = 1e12

# Dense (no 2:4 sparsity) tensor-core peaks per GPU in FLOP/s: (16-bit, fp32). NVIDIA's data
# sheets print the sparse rates with an asterisk; the dense rate is half (rounded down to
# whole TFLOP/s for the 16-bit Hopper rates, as usually quoted). 16-bit is bf16 and
# fp16, which run at the same rate; fp32 is TF32 on the tensor cores. Sources:
#   H100 SXM / NVL: NVIDIA H100 Tensor Core GPU data sheet (SXM: BF16 1,979*, TF32 989*;
#     NVL: BF16 1,671*, TF32 835*). H100 PCIe: the 2022 data sheet (BF16 1,513*, TF32 756*).
#   H200 SXM / NVL: NVIDIA H200 data sheet (as H100 SXM / NVL). GH200: Grace Hopper data
#     sheet (as H100 SXM). H800 SXM / PCIe: as H100 SXM / PCIe (same GH100 compute).
#   A100 (SXM4 and PCIe alike; A800 the same): A100 data sheet, BF16 312, TF32 156.
#   A10: A10 data sheet, BF16 125, TF32 62.5. A10G (AWS's variant, more SMs but lower tensor
#     rate): NVIDIA's A10G data sheet for AWS, BF16 70, TF32 35.
#   L4: L4 data sheet, BF16 242*, TF32 120*. L40S: L40S data sheet, BF16 362.05, TF32 183.
#   L40: L40 data sheet, BF16 181.05, TF32 90.5.
#   V100 (SXM2): V100 data sheet, fp16 tensor 125; no bf16 or TF32 tensor cores, so bf16
#     has no peak to measure against and fp32 is the plain FP32 rate, 15.7.
# The first pattern that matches the device name (torch.cuda.get_device_name(), e.g.
# "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB") as a whole word, ignoring case, wins:
# the more specific names come first ("H100 NVL", "H100 PCIe" before "H100"), and whole
# words keep "A10" from matching "A100" or "A10G", "L4" from "L40S", "H200" from "GH200".
PEAK_FLOPS: tuple[tuple[str, dict[str, Optional[float]]], ...] = tuple(
    (pattern, {"bf16": bf16, "fp16": fp16, "fp32": fp32})
    for pattern, bf16, fp16, fp32 in (
        ("H100 NVL", 835 * _T, 835 * _T, 417.5 * _T),
        ("H100 PCIe", 756 * _T, 756 * _T, 378 * _T),
        ("H100", 989 * _T, 989 * _T, 494.7 * _T),
        ("GH200", 989 * _T, 989 * _T, 494.7 * _T),
        ("H200 NVL", 835 * _T, 835 * _T, 417.5 * _T),
        ("H200", 989 * _T, 989 * _T, 494.7 * _T),
        ("H800 PCIe", 756 * _T, 756 * _T, 378 * _T),
        ("H800", 989 * _T, 989 * _T, 494.7 * _T),
        ("A100", 312 * _T, 312 * _T, 156 * _T),
        ("A800", 312 * _T, 312 * _T, 156 * _T),
        ("A10G", 70 * _T, 70 * _T, 35 * _T),
        ("A10", 125 * _T, 125 * _T, 62.5 * _T),
        ("L40S", 362.05 * _T, 362.05 * _T, 183 * _T),
        ("L40", 181.05 * _T, 181.05 * _T, 90.5 * _T),
        ("L4", 121 * _T, 121 * _T, 60 * _T),
        ("V100", None, 125 * _T, 15.7 * _T),
    ))


def peak_flops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak FLOP/s of one device, given torch.cuda.get_device_name() and the run's
    train.precision (bf16, fp16, fp32); None when the device (or that precision on it) has
    no known peak."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    for pattern, peaks in PEAK_FLOPS:
        if re.search(rf"(?<!\w){re.escape(pattern)}(?!\w)", device_name, re.IGNORECASE):
            return peaks[precision]
    return None


def mfu(flops_per_token: float, tokens_per_s: float, world_size: int, peak: float) -> float:
    """Model FLOPs utilisation of ONE accelerator; tokens_per_s is the global (whole-job)
    rate, world_size the number of accelerators producing it, peak one device's FLOP/s."""
    return flops_per_token * tokens_per_s / (world_size * peak)


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token (forward + backward): 6N plus attention's 12 L d T
    (PaLM appendix B); position embeddings are lookups, not matmuls.

    llama: no position table to subtract (RoPE has no parameters); SwiGLU's three matrices
    and GQA's narrower key/value projections are already in n_params, and the attention term
    stays 12 L d T (QK^T and AV run over all n_head query heads of width d / n_head, whatever
    n_kv_head is). An untied input embedding is a lookup: its vocab x d is subtracted; a tied
    one is counted once, as the output head's matmul. RMSNorm weights are in n_params but
    cost no matmul (< 0.01% of N)."""
    if cfg.arch == "llama":
        embedding_lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
        return 6 * (n_params - embedding_lookup) + 12 * cfg.n_layer * cfg.d_model * cfg.block_size
    n_matmul = n_params - cfg.block_size * cfg.d_model
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.d_model * cfg.block_size
