"""A mixture's validation (harness.callbacks.evaluator.source_evaluators): each source's
eval/loss/<name> equals a plain evaluation of that source's own set by the trained model,
eval/bpb/<name> is it over that set's bytes per token, and the mixture's eval/loss and eval/bpb
are the weight-averaged losses and total bits over total bytes; without a mix the Evaluator's
keys are unchanged. Run on the real engine through Trainer.fit."""
import math

import numpy as np
import pytest
import torch
from engine_utils import Record, build, make_data, small_cfg, tokens

from harness.callbacks.evaluator import (Evaluator, MixtureLoss, eval_set, set_targets,
                                         source_evaluators)
from harness.common.errors import HarnessError
from harness.data.shards import Sequences
from harness.train.trainer import Trainer


def _plain_eval(model, seqs: Sequences, size: int) -> float:
    """Mean over the set of each sequence's mean next-token CE, in plain PyTorch."""
    rows = torch.from_numpy(seqs.batch(eval_set(len(seqs), size)))
    with torch.no_grad():
        logits = model(rows[:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), rows[:, 1:],
                                               reduction="none")
    return ce.mean(1).mean().item()


def test_per_source_and_mixture_eval_equal_plain_evaluation():
    cfg = small_cfg("train.micro_batch_size=2", "train.grad_accum_steps=1", "train.max_steps=2",
                    "model.dropout=0.3")
    built = build(cfg)
    block = cfg.model.block_size
    # two sources of different statistics: uniform tokens and a narrow band of the vocab
    named_seqs = {"web": Sequences(tokens(64, 40 * block + 1, seed=5), block),
                  "code": Sequences(tokens(8, 30 * block + 1, seed=6) + 3, block)}
    table = np.arange(64, dtype=np.int64) % 4  # bytes per token id: 0 to 3
    weights = [0.7, 0.3]
    callbacks = source_evaluators([(n, s, table) for n, s in named_seqs.items()], weights,
                                  every=1, size=5, micro=2, rank=0, world=1)
    assert [type(c) for c in callbacks] == [Evaluator, Evaluator, MixtureLoss]
    rec = Record()
    Trainer(cfg, built, make_data(cfg, 2), [*callbacks, rec]).fit()
    metrics = rec.metrics[-1]
    model = built.engine.module
    model.eval()
    losses, bpt = {}, {}
    for name, seqs in named_seqs.items():
        losses[name] = _plain_eval(model, seqs, 5)
        targets = set_targets(seqs.tokens, block, eval_set(len(seqs), 5))
        bpt[name] = table[targets].sum() / len(targets)
        assert metrics[f"eval/loss/{name}"] == pytest.approx(losses[name], abs=1e-5)
        assert metrics[f"eval/bpb/{name}"] == pytest.approx(
            losses[name] / (math.log(2) * bpt[name]), rel=1e-5)
    assert abs(losses["web"] - losses["code"]) > 0.05  # the sources differ: the test can fail
    mix = 0.7 * losses["web"] + 0.3 * losses["code"]
    assert metrics["eval/loss"] == pytest.approx(mix, abs=1e-5)
    assert metrics["eval/bpb"] == pytest.approx(
        mix / (math.log(2) * (0.7 * bpt["web"] + 0.3 * bpt["code"])), rel=1e-5)
    assert all(f"eval/loss/{n}" in m for m in rec.metrics for n in named_seqs)


def test_mixture_weights_are_normalised_and_bpb_needs_every_source_bytes():
    seqs = Sequences(tokens(64, 5 * 16 + 1), 16)
    a, b = (Evaluator(seqs, 1, 4, 2, 0, 1, name=n) for n in ("a", "b"))
    b.bytes_per_token = 2.0
    mix = MixtureLoss([a, b], [3, 1])
    assert mix.mix({"eval/loss/a": 1.0, "eval/loss/b": 3.0}) == {"eval/loss": 1.5}
    a.bytes_per_token = 1.0
    assert mix.mix({"eval/loss/a": 1.0, "eval/loss/b": 3.0})["eval/bpb"] == pytest.approx(
        1.5 / (math.log(2) * 1.25))
    assert (a.loss_key, a.bpb_key) == ("eval/loss/a", "eval/bpb/a")
    plain = Evaluator(seqs, 1, 4, 2, 0, 1)  # no mix: the keys are the ones they always were
    assert (plain.loss_key, plain.bpb_key) == ("eval/loss", "eval/bpb")


def test_a_source_without_validation_sequences_is_refused_by_name():
    empty = Sequences(tokens(64, 10), 16)
    with pytest.raises(HarnessError, match="'code'"):
        source_evaluators([("web", Sequences(tokens(64, 100), 16), None), ("code", empty, None)],
                          [1, 1], 1, 4, 2, 0, 1)
