"""Validation loss: the fixed held-out set, scored with dropout off, equals a direct computation."""
import torch

from engine_utils import small_cfg, tokens
from harness.callbacks.evaluator import Evaluator
from harness.data.shards import Sequences
from harness.engine import build


def test_eval_loss_is_the_mean_over_the_fixed_set():
    cfg = small_cfg("model.dropout=0.5", "train.micro_batch_size=2", "train.grad_accum_steps=1")
    built = build(cfg)
    seqs = Sequences(tokens(64, 2000, seed=3), cfg.model.block_size)
    ev = Evaluator(seqs, every=1, batches=3, micro=2, rank=0, world=1)
    model = built.engine.module
    model.train()
    got = ev.evaluate(built.engine)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        rows = torch.from_numpy(seqs.batch(range(6)))
        want = torch.stack([model(rows[i:i + 1, :-1], rows[i:i + 1, 1:]) for i in range(6)]).mean()
    assert abs(got - want.item()) < 1e-5
    assert ev.evaluate(built.engine) == got  # the same set every time, no dropout noise
