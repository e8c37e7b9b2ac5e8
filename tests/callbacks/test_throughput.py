"""Throughput's FLOPs per token come from the model as defined, whatever ZeRO did to it."""
from types import SimpleNamespace

from engine_utils import small_cfg

from harness.callbacks.throughput import Throughput
from harness.model import count_params
from harness.model.flops import flops_per_token
from harness.model.gpt import GPT
from harness.train.engine import build

BATCH = ["train.micro_batch_size=2", "train.grad_accum_steps=1"]


def _flops(stage: int) -> tuple[float, int]:
    cfg = small_cfg(*BATCH, f"zero.stage={stage}")
    built = build(cfg)
    cb = Throughput()
    cb.on_train_start(SimpleNamespace(cfg=cfg, built=built, is_main=True, step=0))
    return cb.flops_per_token, sum(p.numel() for p in built.engine.module.parameters())


def test_flops_per_token_are_the_same_at_zero0_and_zero3():
    cfg = small_cfg(*BATCH)
    expected = flops_per_token(cfg.model, count_params(GPT(cfg.model)))
    (f0, numel0), (f3, numel3) = _flops(0), _flops(3)
    assert numel3 < numel0  # ZeRO 3 really emptied the parameters (the trap)
    assert f0 == f3 == expected
