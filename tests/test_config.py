"""Bad configs fail before any model is built: one line naming the key, exit code 2."""
import subprocess
import sys

import pytest
import torch

from harness.config import load_config, preset_names
from harness.errors import HarnessError
from harness.plan import checkpoint_segments, make_plan, plan_batch
from engine_utils import child_env

AC = "activation_checkpointing"
BAD = [  # (overrides, the key the message must name)
    (["model.n_layre=4"], "model.n_layre"),
    (["model.n_layer=four"], "model.n_layer"),
    ([f"{AC}.partition_activation=true"], f"{AC}.partition_activation"),
    ([f"{AC}.policy=every_layer", f"{AC}.cpu_checkpointing=true"], f"{AC}.cpu_checkpointing"),
    ([f"{AC}.contiguous_memory_optimization=true"], f"{AC}.contiguous_memory_optimization"),
    ([f"{AC}.policy=count"], f"{AC}.number_checkpoints"),
    ([f"{AC}.policy=count", f"{AC}.number_checkpoints=9"], f"{AC}.number_checkpoints"),
    ([f"{AC}.policy=sometimes"], f"{AC}.policy"),
    (["train.global_batch_size=30"], "train.global_batch_size"),  # 30 != 8 x 2 x 1
    (["train.grad_accum_steps=null", "train.global_batch_size=20"], "train.global_batch_size"),
    (["train.global_batch_size=null", "train.grad_accum_steps=null"], "train.global_batch_size"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.precision=fp8"], "train.precision"),
    (["zero.stage=4"], "zero.stage"),
    (["zero.offload_optimizer=true"], "zero.offload_optimizer"),
    (["model.n_head=3"], "model.d_model"),
    (["optim.warmup_steps=1000"], "optim.warmup_steps"),
    (["optim.lr_scaling=true"], "optim.base_global_batch"),
    (["clip.max_norm=-1"], "clip.max_norm"),
    (["clip.value=0.5", "zero.stage=2"], "clip.value"),
    (["model.dropout=1.5"], "model.dropout"),
    ([f"{AC}.policy=every_k", f"{AC}.every_k=9"], f"{AC}.every_k"),
    # fp32 accumulation of bf16 gradients exists only in DeepSpeed's ZeRO optimizers
    (["train.precision=bf16"], "train.grad_accum_dtype"),
    (["train.precision=bf16", "zero.stage=1", "train.grad_accum_dtype=fp16"], "train.grad_accum_dtype"),
    (["train.precision=bf16", "zero.stage=1", "train.reduce_dtype=int8"], "train.reduce_dtype"),
]


def test_bf16_at_stage0_is_accepted_when_summed_in_bf16():
    cfg = load_config("tiny", ["train.precision=bf16", "train.grad_accum_dtype=bf16"])
    assert (cfg.train.grad_accum_dtype, cfg.train.reduce_dtype) == ("bf16", "fp32")


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(HarnessError) as err:
        cfg = load_config("tiny", ["model.n_layer=4", *overrides])
        make_plan(cfg, 1)
    assert key in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args,needle", [
    (["train", "model.n_layre=4"], "model.n_layre"),
    (["ds-config", "train.global_batch_size=30"], "train.global_batch_size"),
    (["ds-config", "--config", "nope"], "nope"),
    (["ds-config", "--config", "missing.yaml"], "missing.yaml"),
    (["train", f"{AC}.cpu_checkpointing=true", f"{AC}.policy=every_layer"], "partition_activations"),
    # refused before any engine exists (CI has no GPU; a GPU machine skips these two)
    (["train", "train.device=cpu", "train.precision=fp16"], "train.precision=fp16"),
    (["train", "train.device=cuda"], "train.device=cuda"),
])
def test_cli_exit_2_one_line_no_traceback(args, needle):
    if "train.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_preset_loads():
    assert {"tiny", "gpt2-small", "gpt2-medium", "gpt-1.3b"} <= set(preset_names())
    for name in preset_names():
        load_config(name)


@pytest.mark.parametrize("g,m,a,dp,want", [
    (None, 4, 8, 2, (64, 4, 8)), (64, None, 8, 2, (64, 4, 8)), (64, 4, None, 2, (64, 4, 8)),
    (64, 4, 8, 2, (64, 4, 8)), (512, 16, None, 8, (512, 16, 4)),
])
def test_any_two_determine_the_third(g, m, a, dp, want):
    b = plan_batch(g, m, a, dp)
    assert (b.global_batch, b.micro_batch, b.grad_accum) == want
    assert b.global_batch == b.micro_batch * b.grad_accum * b.dp_size


def test_linear_lr_scaling():
    cfg = load_config("tiny", ["optim.lr_scaling=true", "optim.base_global_batch=8", "optim.lr=1e-3",
                               "train.global_batch_size=null", "train.grad_accum_steps=2"])
    assert make_plan(cfg, 2).lr == pytest.approx(1e-3 * 32 / 8)  # global 8 x 2 x 2 = 32


@pytest.mark.parametrize("policy,extra,want", [
    ("none", [], ()),
    ("every_layer", [], ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8))),
    ("every_k", ["every_k=3"], ((2, 3), (5, 6))),
    ("sqrt", [], ((0, 3), (3, 5), (5, 8))),  # round(sqrt 8) = 3 segments
    ("count", ["number_checkpoints=2"], ((0, 4), (4, 8))),
])
def test_checkpoint_segments(policy, extra, want):
    cfg = load_config("tiny", ["model.n_layer=8", f"{AC}.policy={policy}",
                               *[f"{AC}.{e}" for e in extra]])
    assert checkpoint_segments(cfg.activation_checkpointing, 8) == want
