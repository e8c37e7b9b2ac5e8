"""The per-rank RNG file holds this rank's GPU generator only (harness.checkpoint.checkpointer
_rng_state / _set_rng_state), so a resume that sees fewer GPUs (one per task instead of the
node's 8) loads it; files saved before, with every visible GPU's state, still load.

No GPU here: torch.cuda's generator calls are faked (is_available, get_rng_state[_all],
set_rng_state[_all]); the save goes through torch.save/torch.load as in a checkpoint. Unproven
without a GPU: that the restored state then reproduces dropout masks on a real device (the
CPU resume tests check that for the CPU generator).
"""
import random

import pytest
import torch

from harness.checkpoint import checkpointer as ckpt


def _never(*_args, **_kwargs):
    raise AssertionError("touched every visible GPU's generator")


@pytest.fixture
def gpu(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7, 7]))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", _never)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", _never)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": seen.append(state.tolist()))
    return seen


def _round_trip(state, tmp_path):
    torch.save(state, tmp_path / "rank5.pt")
    return torch.load(tmp_path / "rank5.pt", weights_only=False)


def test_this_ranks_gpu_state_is_saved_and_restored(gpu, tmp_path):
    state = _round_trip(ckpt._rng_state(), tmp_path)
    assert "cuda" not in state and state["cuda_device"].tolist() == [7, 7]
    random.random()
    ckpt._set_rng_state(state, local_rank=5)  # rank 5 now on its only visible GPU, cuda:0
    assert gpu == [[7, 7]]


def test_a_file_with_every_gpus_state_loads_on_one_visible_gpu(gpu, tmp_path):
    old = ckpt._rng_state()
    del old["cuda_device"]
    old["cuda"] = [torch.tensor([i, i]) for i in range(8)]  # saved by get_rng_state_all on 8
    ckpt._set_rng_state(_round_trip(old, tmp_path), local_rank=5)
    assert gpu == [[5, 5]]  # local rank 5 trained on cuda:5 then
