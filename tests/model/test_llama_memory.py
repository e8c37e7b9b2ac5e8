"""The planner's activation arithmetic for model.arch=llama (harness/model/llama_memory.py) and for
qk_norm and the chunked loss (harness/model/memory.py) against the saved-bytes meter on real
forwards, through DeepSpeed's checkpointing; and one case worked out by hand."""
import pytest
import torch
from engine_utils import make_data, small_cfg

from harness.config import ModelConfig
from harness.model import build_model
from harness.model.memory import block_parts, head_bytes, measure_step, predict_peak
from harness.train.engine import build

AC = "activation_checkpointing"
LLAMA = ["model.arch=llama", "model.n_kv_head=1", "model.bias=false"]
SHAPE = ["model.n_layer=4", "model.d_model=64", "model.block_size=32",
         "train.micro_batch_size=4", "train.grad_accum_steps=1"]


@pytest.mark.parametrize("policy", ["none", "every_layer", "sqrt", "attention", "mlp"])
@pytest.mark.parametrize("extra", [[], ["model.dropout=0.1"], ["model.qk_norm=true"],
                                   ["train.loss_chunk_tokens=32"], ["train.z_loss=1e-4"]],
                         ids=["plain", "dropout", "qk_norm", "chunked", "z_loss"])
def test_llama_prediction_matches_the_meter(policy, extra):
    """fp32: exact up to a few small tensors (token ids, the loss scalar): within 1%."""
    cfg = small_cfg(*LLAMA, *SHAPE, f"{AC}.policy={policy}", *extra)
    built = build(cfg)
    x, y = make_data(cfg, 4).micro_batch(0, 0)
    measured = measure_step(built.engine.module, x, y)["peak"]
    t = cfg.train
    head = head_bytes(cfg.model, 4, 4, False, t.loss_chunk_tokens)
    predicted = predict_peak(cfg.model, 4, policy, built.plan.segments, 4, False, head)
    assert predicted == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_qk_norm_prediction_matches_the_meter(arch):
    extra = {"n_kv_head": 2, "bias": False} if arch == "llama" else {}
    for dropout in (0.0, 0.1):
        cfg = ModelConfig(arch=arch, n_layer=2, n_head=4, d_model=64, block_size=32,
                          vocab_size=128, dropout=dropout, qk_norm=True, **extra)
        x = torch.randint(0, 128, (4, 32))
        measured = measure_step(build_model(cfg), x, x)["peak"]
        assert predict_peak(cfg, 4, "none", ()) == pytest.approx(measured, rel=0.01)


def test_bf16_within_15_percent():
    """bf16 on a CPU: RMSNorm's composite upcasts and the math path's dtypes are modelled
    approximately (measured 0.87-1.06 of the meter); a GPU's fused kernels are what the
    planner targets there (fused=True), checked by bench/gpu_check.py when a GPU is at hand."""
    for qk in (False, True):
        cfg = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                          block_size=32, vocab_size=128, qk_norm=qk, bias=False)
        x = torch.randint(0, 128, (4, 32))
        measured = measure_step(build_model(cfg).to(torch.bfloat16), x, x)["peak"]
        assert predict_peak(cfg, 4, "none", (), 2) == pytest.approx(measured, rel=0.15)


def test_one_llama_block_by_hand():
    """b=2, t=8, d=16, 4 heads of 4, 2 kv heads, ffn 32, fp32 on a CPU, no dropout."""
    cfg = ModelConfig(arch="llama", n_layer=1, n_head=4, n_kv_head=2, d_model=16, block_size=8,
                      vocab_size=64, ffn_hidden=32, bias=False)
    unit = 2 * 8 * 16 * 4  # b t d x 4 B = 1024
    norm = 2 * 8 * 4 + unit + unit  # rstd, x * rstd, and the output the matmuls keep
    attention = norm + 2 * 8 * 4 * 4 + unit + unit // 2 + unit // 2 + unit + 2 * 4 * 8 * 4
    #                  cos, sin (t x d_head)  q   k (2 of 4 heads)  v   out   logsumexp
    mlp = unit + norm + 4 * (2 * 8 * 32 * 4)  # ln_2 input; w1, silu, w3 outputs, product
    assert block_parts(cfg, 2) == {"input": unit, "attention": attention, "mlp": mlp}
    logits = 2 * 8 * 64 * 4
    assert head_bytes(cfg, 2, 4, False) == unit + norm + logits
    assert head_bytes(cfg, 2, 4, False, chunk_tokens=4) == unit + norm + 64 * 16 * 4
