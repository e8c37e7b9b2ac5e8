"""Every collective the harness makes goes through harness.parallel.collectives, which refuses a
tensor that is not on the engine's device (NCCL rejects CPU tensors, gloo does not: CPU tests alone
would never see one).

There is no GPU here, so the wrong-device case uses a Collectives told that the engine is on
"cuda" (constructing the device needs no GPU); the real NCCL path is bench/gpu_check.py's.
"""
import ast
from pathlib import Path

import pytest
import torch

from harness.parallel.collectives import Collectives, WrongDevice

HARNESS = Path(__file__).resolve().parents[2] / "harness"
COLLECTIVES = {"all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object",
               "reduce_scatter", "broadcast_object_list", "all_gather_into_tensor",
               "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all"}


@pytest.mark.parametrize("call", [
    lambda c, t: c.all_reduce(t),
    lambda c, t: c.reduce_scalars({"loss": t}),
])
def test_a_cpu_tensor_is_refused_when_the_engine_is_on_a_gpu(call):
    comm = Collectives("cuda")
    with pytest.raises(WrongDevice, match="cpu"):
        call(comm, torch.zeros(2))
    assert comm.calls == 0  # refused before anything reached torch.distributed


def test_no_module_calls_torch_distributed_collectives_directly():
    offenders = []
    for path in HARNESS.rglob("*.py"):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                base = ast.unparse(node.value)
                if base in ("torch.distributed", "dist", "torch.distributed.distributed_c10d"):
                    offenders.append(f"{path.relative_to(HARNESS)}:{node.lineno} {base}.{node.attr}")
    assert not offenders, "use harness.parallel.collectives.Collectives: " + ", ".join(offenders)


def test_reduce_scalars_packs_one_all_reduce(monkeypatch):
    import torch.distributed as dist

    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: seen.append(t.clone()))
    comm = Collectives("cpu")
    out = comm.reduce_scalars({"a": torch.tensor(1.5), "b": torch.tensor([2.0, 3.0]),
                               "c": torch.ones(2, 2, dtype=torch.bfloat16)})
    assert len(seen) == 1 and seen[0].tolist() == [1.5, 2.0, 3.0, 1, 1, 1, 1]
    assert out["a"].shape == () and out["b"].tolist() == [2.0, 3.0]
    assert out["c"].shape == (2, 2) and out["a"].device.type == "cpu"
