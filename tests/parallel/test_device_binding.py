"""Which GPU a task trains on (harness.parallel.distributed.device_index / bind_device), when
the launcher's LOCAL_RANK and the GPUs the task can see disagree: srun --gpus-per-task=1,
--gpu-bind and per-task cgroups show every task one device, numbered 0.

There is no GPU here: the mapping is tested as a pure function, and engine.build's GPU path
with only torch.cuda's answers faked (is_available, device_count, set_device). What stays
unproven without a GPU: that NCCL's process group and DeepSpeed's engine then really run on
that device (they take it from LOCAL_RANK, which the last test pins in DeepSpeed's source),
and the CUDA_VISIBLE_DEVICES a real Slurm site hands each task.
"""
import inspect

import pytest
import torch
from engine_utils import small_cfg

from harness.common.errors import HarnessError
from harness.parallel import distributed
from harness.parallel.distributed import DistEnv, device_index
from harness.train import engine


@pytest.mark.parametrize("local_rank, visible, cvd, expected", [
    (0, 8, None, 0),            # torchrun / srun without binding: the node's 8 GPUs
    (5, 8, "0,1,2,3,4,5,6,7", 5),
    (5, 1, "5", 0),             # --gpus-per-task=1 / --gpu-bind=map_gpu: its own GPU, as cuda:0
    (7, 1, None, 0),            # cgroups: one device, CUDA_VISIBLE_DEVICES unset
    (0, 1, "GPU-4f2a", 0),      # a UUID
    (1, 2, "2,3", 1),           # two visible, local rank 1: ordinal 1
])
def test_the_ordinal_is_one_the_task_can_see(local_rank, visible, cvd, expected):
    assert device_index(local_rank, visible, cvd) == expected


@pytest.mark.parametrize("local_rank, visible, cvd, words", [
    (3, 2, "2,3", ("local rank 3 sees 2 GPUs", "'2,3'", "--gpu-bind=none", "--gpus-per-task=1")),
    (0, 0, "", ("sees no CUDA GPU", "CUDA_VISIBLE_DEVICES=''", "--gpus-per-task=1",
                "train.device=cpu")),
])
def test_an_ambiguous_or_empty_view_is_one_line_naming_the_fix(local_rank, visible, cvd, words):
    with pytest.raises(HarnessError) as err:
        device_index(local_rank, visible, cvd)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


class _Reached(Exception):
    pass


def _clean_env(monkeypatch) -> None:
    """build() exports RANK, WORLD_SIZE, ...: restored after the test, even where unset before."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def _fake_one_visible_gpu(monkeypatch) -> list[int]:
    selected: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    return selected


@pytest.mark.parametrize("local_rank", [0, 5, 7])
def test_build_binds_the_one_visible_gpu_before_deepspeed(monkeypatch, local_rank):
    """Rank 5 of 8 on a node where srun gave it one GPU: before DeepSpeed is imported (and so
    before NCCL and the engine pick a device from LOCAL_RANK) the GPU is cuda:0, LOCAL_RANK=0."""
    _clean_env(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(local_rank))
    selected = _fake_one_visible_gpu(monkeypatch)
    seen = {}

    def stop(device):  # the first step after the binding: stop before a real NCCL start
        seen.update(device=device, local_rank=distributed.os.environ["LOCAL_RANK"],
                    selected=list(selected))
        raise _Reached

    monkeypatch.setattr(engine, "import_deepspeed", stop)
    dist = DistEnv(8 + local_rank, 16, local_rank, "127.0.0.1", 29500, "slurm")
    with pytest.raises(_Reached):
        engine.build(small_cfg("train.device=cuda"), dist)
    assert seen == {"device": "cuda", "local_rank": "0", "selected": [0]}


def test_build_refuses_a_task_that_sees_two_gpus_but_not_its_own(monkeypatch):
    _clean_env(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    selected = _fake_one_visible_gpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    dist = DistEnv(5, 8, 5, "127.0.0.1", 29500, "slurm")
    with pytest.raises(HarnessError, match="local rank 5 sees 2 GPUs"):
        engine.build(small_cfg("train.device=cuda"), dist)
    assert selected == []


def test_deepspeed_takes_the_device_from_local_rank():
    """Why bind_device rewrites LOCAL_RANK: DeepSpeed 0.19.8's engine and its process-group start
    read the device ordinal from it (a DeepSpeed that stops doing so fails here)."""
    import importlib

    from deepspeed.runtime.engine import DeepSpeedEngine

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # NCCL's device_id at init

    assert "self.local_rank = int(os.environ['LOCAL_RANK'])" in inspect.getsource(DeepSpeedEngine)
    assert "else self.local_rank" in inspect.getsource(DeepSpeedEngine._set_distributed_vars)
    assert "os.environ.get('LOCAL_RANK', 0)" in inspect.getsource(ds_torch)
