"""Drop one optimizer update (the spike monitor's `skip`) at every ZeRO stage and precision.

Contract: parameters and optimizer state stay exactly as they were, the accumulated gradient
(NaN or inf included) is discarded so that nothing of it reaches a later step, and DeepSpeed's
step counters and the LR schedule advance as for a taken step.
"""
from __future__ import annotations

import torch

from harness.grad_norms import local_grads


def skip_update(engine) -> None:
    """Zero the gradients this rank holds, step with learning rate 0 (AdamW's weight decay is
    scaled by it too), restore the moments."""
    for g in local_grads(engine):
        g.zero_()
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    saved = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
             for p, st in opt.state.items()}
    for group in opt.param_groups:
        group["lr"] = 0.0
    engine.step()  # the scheduler sets the next step's learning rate again
    for p, st in saved.items():
        opt.state[p] = st
