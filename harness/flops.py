"""Model FLOPs utilisation: the accelerator peaks and the one formula, kept free of torch.

MFU (PaLM, appendix B) is the fraction of the hardware's peak that the model's own arithmetic
would use at the measured speed; recomputation (activation checkpointing) and padding do not
count, so it compares runs and systems fairly.

Derivation. One training token costs F = `harness.model.flops_per_token` FLOPs (6N for the
matmuls forward and backward, plus attention's 12 L d T). The metrics report the GLOBAL rate
R = global batch tokens / step time, produced by W accelerators together. So the model
performs F x R FLOP/s across the job, and each accelerator contributes F x R / W of them,
against its peak P:

    MFU = F x R / (W x P)

Example, GPT-2 small (F = 855,166,464) at R = 400,000 tokens/s on W = 8 H100s
(P = 989e12): 855,166,464 x 400,000 / (8 x 989e12) = 0.0432.
"""
from __future__ import annotations

import re
from typing import Optional

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets
# (SXM parts unless named). V100 has no bf16: its fp16 tensor-core peak stands in.
# The first pattern that matches the device name as a whole word wins, so the more specific
# names come first ("H100 PCIe" before "H100"); whole words keep "A10" from matching "A100",
# "A10G", and "L4" from matching "L40S".
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("V100", 125e12),
)


def peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a device given its torch.cuda.get_device_name(); None if unknown."""
    for pattern, peak in PEAK_FLOPS:
        if re.search(rf"(?<!\w){re.escape(pattern)}(?!\w)", device_name):
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_s: float, world_size: int, peak: float) -> float:
    """Model FLOPs utilisation of ONE accelerator; tokens_per_s is the global (whole-job)
    rate, world_size the number of accelerators producing it, peak one device's FLOP/s."""
    return flops_per_token * tokens_per_s / (world_size * peak)
