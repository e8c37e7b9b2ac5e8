"""train.compile with activation checkpointing: every block's forward runs compiled, inside
DeepSpeed's checkpoint, with no graph break inside a block (harness/train/compile.py).

Before, engine.compile() alone compiled the top level; DeepSpeed's checkpoint is
dynamo-disabled, so the checkpointed blocks ran eager. These tests count instead of timing:
block_graph_breaks (torch._dynamo.explain) on built engines, and a counting backend that runs
each captured graph as it is (eager FX execution: the numbers equal the eager run's) and counts
every call of a block's graph during one real training step. Inductor's own numerics are in
test_compile.py. What stays unproven here: that the compiled blocks are faster on a GPU
(bench/gpu_check.py's compile row, which calls block_graph_breaks too).
"""
import re
from collections import Counter

import pytest
import torch
from engine_utils import Record, build, make_data, run_harness, small_cfg

from harness.common.errors import HarnessError
from harness.train.compile import block_graph_breaks, compile_model
from harness.train.trainer import Trainer

ARGS = ["train.micro_batch_size=2", "train.grad_accum_steps=2", "train.max_steps=1",
        "optim.warmup_steps=1"]
ACCUM, N_LAYER = 2, 2  # engine_utils.SMALL: 2 layers


@pytest.mark.parametrize("policy, arch", [("none", "gpt2"), ("every_layer", "gpt2"),
                                          ("attention", "llama")])
def test_no_graph_break_inside_a_block(policy, arch):
    built = build(small_cfg(*ARGS, f"activation_checkpointing.policy={policy}",
                            f"model.arch={arch}", "train.compile=true"))
    assert block_graph_breaks(built.model) == [0] * N_LAYER


def test_a_graph_break_inside_a_block_is_counted(monkeypatch):
    """The counter's control: a forced break in one block's MLP shows on that block only (as
    several: explain counts the break once per frame it cuts, the MLP's and its callers')."""
    built = build(small_cfg(*ARGS))
    mlp = built.model.blocks[1].mlp
    forward = mlp.forward

    def broken(x):
        torch._dynamo.graph_break()
        return forward(x)

    monkeypatch.setattr(mlp, "forward", broken)
    first, second = block_graph_breaks(built.model)
    assert first == 0 and second > 0


class CountingBackend:
    """A torch.compile backend: runs each graph as captured (FX, eager kernels) and counts its
    calls under the submodules it reads (ln_1+attn: attention_part, ln_2+mlp: mlp_part, all
    four: a whole block; graphs of the top level read wte/blocks and are not counted)."""

    def __init__(self):
        self.calls = Counter()

    def __call__(self, gm, example_inputs):
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        pattern = r"^L_self_modules_(\w+?)_(?:modules|param)"
        used = frozenset(m for n in names for m in re.findall(pattern, n))
        kind = {frozenset({"ln_1", "attn"}): "attention_part",
                frozenset({"ln_2", "mlp"}): "mlp_part",
                frozenset({"ln_1", "attn", "ln_2", "mlp"}): "block"}.get(used)

        def run(*args):
            if kind:
                self.calls[kind] += 1
            return gm.forward(*args)
        return run


@pytest.mark.parametrize("policy, arch, expected", [
    # per micro-step and block: the checkpoint's no_grad forward and the backward's recompute
    ("every_layer", "gpt2", {"block": 2 * N_LAYER * ACCUM}),
    # attention checkpointed (forward + recompute), the MLP part once
    ("attention", "llama", {"attention_part": 2 * N_LAYER * ACCUM, "mlp_part": N_LAYER * ACCUM}),
])
def test_checkpointed_blocks_run_compiled(policy, arch, expected):
    args = [*ARGS, f"activation_checkpointing.policy={policy}", f"model.arch={arch}"]
    _, eager, _ = run_harness(small_cfg(*args))
    torch._dynamo.reset()
    cfg = small_cfg(*args)
    built, backend = build(cfg), CountingBackend()
    compile_model(built.engine, built.model, policy, backend=backend)
    rec = Record()
    Trainer(cfg, built, make_data(cfg, 2), [rec]).fit()
    torch._dynamo.reset()
    assert dict(backend.calls) == expected
    # the same kernels, captured: the forward statistics (set inside the compiled blocks) and
    # the pre-clip norm equal the eager run's
    for key in ("train/loss", "optim/grad_norm_preclip", "model/attn_logit_bound",
                "model/attn_logit_bound/layer_1"):
        assert rec.metrics[0][key] == pytest.approx(eager[0][key], rel=1e-6), key


def test_compile_with_zero3_is_refused():
    with pytest.raises(HarnessError, match=r"train.compile .*zero.stage=3"):
        small_cfg("train.compile=true", "zero.stage=3")
    small_cfg("train.compile=true", "zero.stage=2")  # 0-2 accepted
