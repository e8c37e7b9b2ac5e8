"""train.compile: DeepSpeed's engine.compile() (torch.compile, inductor on the CPU) trains
like the eager engine for 3 steps, with and without activation checkpointing (the blocks then
compiled on their own: harness/train/compile.py). ZeRO 3 is refused with train.compile.

Tolerance: inductor fuses and reorders fp32 arithmetic (a fused layer norm, a different matmul
blocking), so gradients differ from eager by rounding, not by a formula: rel 1e-5 on the loss
and the pre-clip norms, engine_utils.ROUNDING_TOL on the parameters after 3 AdamW steps (the
same bound as for a different summation order)."""
import pytest
import torch
from engine_utils import ROUNDING_TOL, max_diff, run_harness, small_cfg

from harness.train.compile import SUB_BLOCKS

pytestmark = pytest.mark.slow
ARGS = ["train.micro_batch_size=2", "train.grad_accum_steps=2", "model.n_layer=2"]


@pytest.mark.parametrize("arch, policy, stage", [("gpt2", "none", 0), ("llama", "every_layer", 1),
                                                 ("gpt2", "attention", 2)])
def test_compiled_trains_like_eager(arch, policy, stage):
    args = [*ARGS, f"activation_checkpointing.policy={policy}", f"zero.stage={stage}",
            *(["model.arch=llama", "model.n_kv_head=1"] if arch == "llama" else [])]
    eager_params, eager, _ = run_harness(small_cfg(*args))
    torch._dynamo.reset()
    params, compiled, built = run_harness(small_cfg(*args, "train.compile=true"))
    assert built.engine.is_compiled
    for block in built.model.blocks:  # compiled on its own: whole, or its two parts
        assert (set(SUB_BLOCKS) <= vars(block).keys() if policy == "attention"
                else block._compiled_call_impl is not None)
    for key in ("train/loss", "optim/grad_norm_preclip", "model/attn_logit_bound",
                "train/z_loss"):
        assert [m[key] for m in compiled] == pytest.approx([m[key] for m in eager], rel=1e-5), key
    assert max_diff(params, eager_params) <= ROUNDING_TOL
