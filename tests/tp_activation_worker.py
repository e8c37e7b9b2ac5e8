"""One rank of tests/test_tensor_parallel.py's activation measurement (torchrun, or alone at
TP 1). usage: tp_activation_worker.py OUT_JSON key=value ...

Builds the real engine, runs one forward + backward of the engine's module under the saved-bytes
meter (harness.memory.SavedActivations, DeepSpeed's checkpoint wrapped with wrap_checkpoint) and
writes this rank's numbers: `checkpointed`, the bytes of the inputs DeepSpeed's checkpoint holds
for backward after the forward (its ctx.deepspeed_saved_tensors: with partition_activations the
rank's partition, harness.memory.checkpointed_data), with the device they lie on; `forward`, everything held after the forward.
"""
import json
import sys

import torch

from engine_utils import make_data, small_cfg
from harness.engine import build
from harness.memory import SavedActivations, checkpointed_data
from harness.run import leave_together


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = small_cfg(*overrides)
    built = build(cfg)
    model = built.engine.module
    b = built.plan.batch
    x, y = make_data(cfg, b.micro_batch, built.plan.dp_rank(built.dist.rank),
                     b.dp_size).micro_batch(0, 0)
    meter = SavedActivations(model.parameters())
    held, devices = [], set()
    wrapped = meter.wrap_checkpoint(model.checkpoint_fn)

    def counted(function, *args):
        result = wrapped(function, *args)
        saved = getattr(result.grad_fn, "deepspeed_saved_tensors", ())
        for t in saved:
            if torch.is_tensor(t):
                kept = checkpointed_data(t)
                held.append(kept.numel() * kept.element_size())
                devices.add(kept.device.type)
        return result

    model.checkpoint_fn = counted
    with meter:
        loss = model(x, y)
        forward = meter.live
        loss.backward()
    res = {"rank": built.dist.rank, "checkpointed": sum(held), "tensors": len(held),
           "devices": sorted(devices), "forward": forward, "peak": meter.peak,
           "loss": loss.item()}
    with open(f"{out}.rank{built.dist.rank}.json", "w") as f:
        json.dump(res, f)
    leave_together()


if __name__ == "__main__":
    main()
