"""One rank of an activation measurement on the real engine (torchrun, or alone at TP 1), for
tests/parallel/test_tensor_parallel.py and tests/plan/test_tp_memory.py.

usage: tp_activation_worker.py OUT key=value ... [-- OUT2 key=value ... ...]

Each group (OUT and its overrides; groups separated by `--`, so one launch pays the process
start and the rendezvous once) builds the real engine, runs one forward + backward of the
engine's module under the saved-bytes meter (harness.model.memory.SavedActivations, DeepSpeed's
checkpoint wrapped with wrap_checkpoint) and writes this rank's numbers to OUT.rankR.json:
`checkpointed`, the bytes of the inputs DeepSpeed's checkpoint holds for backward after the
forward (its ctx.deepspeed_saved_tensors: with partition_activations the rank's partition,
harness.model.memory.checkpointed_data), with the device they lie on; `forward`, everything held
after the forward; `peak`, the most held at once, recompute included; `loss`; `sharded`, the
names and local shapes of the parameters AutoTP cut on this rank.
"""
import json
import sys

import torch
from engine_utils import make_data, small_cfg

from harness.model.memory import SavedActivations, checkpointed_data
from harness.parallel.tensor_parallel import is_sharded
from harness.train.engine import build
from harness.train.run import leave_together


def measure(overrides: list[str]) -> dict:
    cfg = small_cfg(*overrides)
    built = build(cfg)
    model = built.engine.module
    b = built.plan.batch
    x, y = (t.to(built.engine.device) for t in make_data(
        cfg, b.micro_batch, built.plan.dp_rank(built.dist.rank), b.dp_size).micro_batch(0, 0))
    meter = SavedActivations(model.parameters())
    held, devices = [], set()
    checkpoint_fn = model.checkpoint_fn
    if checkpoint_fn is not None:
        wrapped = meter.wrap_checkpoint(checkpoint_fn)

        def counted(function, *args):
            result = wrapped(function, *args)
            saved = getattr(result.grad_fn, "deepspeed_saved_tensors", ())
            for t in saved:
                if torch.is_tensor(t):
                    kept = checkpointed_data(t)
                    held.append(kept.numel() * kept.element_size())
                    if kept.is_floating_point():  # the activations, not their int64 sizes
                        devices.add(kept.device.type)
            return result

        model.checkpoint_fn = counted
    try:
        with meter:
            loss = model(x, y)
            forward = meter.live
            loss.backward()
    finally:
        model.checkpoint_fn = checkpoint_fn
    return {"rank": built.dist.rank, "checkpointed": sum(held), "tensors": len(held),
            "devices": sorted(devices), "forward": forward, "peak": meter.peak,
            "loss": loss.item(),
            "sharded": {n: list(p.shape) for n, p in model.named_parameters() if is_sharded(p)}}


def groups(argv: list[str]) -> list[tuple[str, list[str]]]:
    """[(OUT, overrides), ...] from `OUT k=v ... -- OUT2 k=v ...`."""
    found, current = [], []
    for arg in [*argv, "--"]:
        if arg == "--":
            found.append((current[0], current[1:]))
            current = []
        else:
            current.append(arg)
    return found


def main() -> None:
    for out, overrides in groups(sys.argv[1:]):
        res = measure(overrides)
        with open(f"{out}.rank{res['rank']}.json", "w") as f:
            json.dump(res, f)
    leave_together()


if __name__ == "__main__":
    main()
