"""The validation set does not depend on the data-parallel size: eval_set picks the same
sequences from the config alone, and the ranks' weighted batches at world 1, 2, 3 and 4 add
up to the plain mean over those sequences (the 2-rank run through real gloo processes:
tests/callbacks/test_evaluator.py)."""
import numpy as np
import pytest
import torch
from engine_utils import tokens

from harness.callbacks.evaluator import Evaluator, eval_set, eval_set_size
from harness.common.errors import HarnessError
from harness.config import load_config
from harness.data.shards import Sequences
from harness.model.gpt import GPT


@pytest.mark.parametrize("n, size", [(1, 1), (1, 5), (7, 3), (100, 100), (101, 10), (10**9, 7)])
def test_eval_set_is_spread_over_the_whole_split(n, size):
    got = eval_set(n, size)
    k = min(n, size)
    assert len(got) == k and got[0] == 0 and np.all(np.diff(got) > 0) and got[-1] < n
    # evenly spread: every gap is n // k or n // k + 1 (last: to the end of the split)
    gaps = np.diff(np.append(got, n))
    assert set(gaps.tolist()) <= {n // k, -(-n // k)}


def test_the_set_size_comes_from_the_config_not_the_world():
    tiny = load_config("tiny")
    assert eval_set_size(tiny) == tiny.data.eval_batches * tiny.train.micro_batch_size == 32
    assert eval_set_size(load_config("tiny", ["data.eval_sequences=100"])) == 100
    no_micro = load_config("tiny", ["train.micro_batch_size=null", "train.grad_accum_steps=2"])
    assert eval_set_size(no_micro) == 4 * no_micro.train.global_batch_size
    with pytest.raises(HarnessError, match="data.eval_sequences"):
        load_config("tiny", ["data.eval_sequences=-1"])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_add_up_to_the_plain_mean_at_every_world_size(world):
    """Each rank's batches, weighted and summed as Evaluator.evaluate sums them, over all
    ranks and divided by the all-reduced count: the plain mean loss over eval_set's
    sequences; the bytes per token are the set's, on every rank."""
    cfg = load_config("tiny", ["model.n_layer=1", "model.d_model=32", "model.n_head=2",
                               "model.block_size=16", "model.vocab_size=64"])
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    seqs = Sequences(tokens(64, 16 * 40 + 1, seed=1), 16)
    table = np.arange(64) % 3  # bytes of each token id
    size, micro = 13, 2
    evs = [Evaluator(seqs, 1, size, micro, r, world, table) for r in range(world)]
    with torch.no_grad():
        total = sum(float(model(torch.from_numpy(b[:, :-1]), torch.from_numpy(b[:, 1:]))) * w
                    for ev in evs for b, w in ev.batches)
        rows = torch.from_numpy(seqs.batch(eval_set(len(seqs), size)))
        want = float(model(rows[:, :-1], rows[:, 1:]))
    assert sum(ev.n_sequences for ev in evs) == size
    assert total / size == pytest.approx(want, rel=1e-6)
    assert {ev.bytes_per_token for ev in evs} == {table[rows[:, 1:].numpy()].mean()}
    assert len({len(ev.batches) for ev in evs}) == 1  # the same number of forwards
