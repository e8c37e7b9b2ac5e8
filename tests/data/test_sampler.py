"""The sampler: rank splits without overlap, full coverage per epoch, world-size-free resume."""
import numpy as np
import pytest

from harness.data.sampler import GlobalSampler

N, GLOBAL, MICRO = 120, 12, 2  # 10 optimizer steps per epoch


def step_indices(dp, consumed, seed=5):
    """Every sample index of one optimizer step, per rank."""
    accum = GLOBAL // (MICRO * dp)
    return [np.concatenate([GlobalSampler(N, seed, MICRO, r, dp).indices(consumed, k)
                            for k in range(accum)]) for r in range(dp)]


@pytest.mark.parametrize("dp", [2, 3])
def test_ranks_partition_each_global_batch(dp):
    for step in range(25):  # two and a half epochs
        single = step_indices(1, step * GLOBAL)[0]
        ranks = step_indices(dp, step * GLOBAL)
        together = np.concatenate(ranks)
        assert len(together) == len(set(together.tolist())) == GLOBAL  # no overlap
        assert set(together.tolist()) == set(single.tolist())  # same samples as one rank


def test_one_epoch_covers_every_sample_once():
    seen = np.concatenate([step_indices(3, s * GLOBAL)[r] for s in range(N // GLOBAL)
                           for r in range(3)])
    assert sorted(seen.tolist()) == list(range(N))


def test_epochs_are_reshuffled_and_seeded():
    first = np.concatenate([step_indices(1, s * GLOBAL)[0] for s in range(10)])
    second = np.concatenate([step_indices(1, (10 + s) * GLOBAL)[0] for s in range(10)])
    assert sorted(first.tolist()) == sorted(second.tolist()) and not np.array_equal(first, second)
    again = np.concatenate([step_indices(1, s * GLOBAL)[0] for s in range(10)])
    assert np.array_equal(first, again)
    other_seed = np.concatenate([step_indices(1, s * GLOBAL, seed=6)[0] for s in range(10)])
    assert not np.array_equal(first, other_seed)


def test_resume_at_step_k_sees_the_same_batches_on_another_world_size():
    """A run on 2 ranks saves at step 4 (consumed = 48); resumed on 1 rank it must draw the
    global batches an uninterrupted run draws: the sampler is a pure function of position."""
    uninterrupted = [set(step_indices(2, s * GLOBAL)[0].tolist()) |
                     set(step_indices(2, s * GLOBAL)[1].tolist()) for s in range(4, 12)]
    resumed = [set(step_indices(1, s * GLOBAL)[0].tolist()) for s in range(4, 12)]
    assert resumed == uninterrupted
