"""Validation loss every `data.eval_every` steps on a fixed set of held-out sequences.

The set is the first eval_batches x micro_batch x world_size sequences of the validation
split, so every evaluation sees the same tokens and the numbers are comparable over a run;
each rank scores its own slice and the mean is all-reduced. Dropout is off while scoring.
"""
from __future__ import annotations

import numpy as np
import torch

from harness.callbacks.base import Callback
from harness.data.shards import Sequences


class Evaluator(Callback):
    order = 15  # before the monitor and the loggers, so eval/loss is in the step's metrics

    def __init__(self, sequences: Sequences, every: int, batches: int, micro: int,
                 rank: int, world: int):
        self.every, self.micro = every, micro
        total = min(len(sequences), batches * micro * world)
        mine = np.arange(rank, total, world)  # rank r scores every world-th sequence
        self.rows = [sequences.batch(mine[i:i + micro]) for i in range(0, len(mine), micro)]
        self.world = world

    def evaluate(self, engine) -> float:
        model = engine.module
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss sum, count
        with torch.no_grad():
            for rows in self.rows:
                batch = torch.from_numpy(rows).to(engine.device)
                loss = model(batch[:, :-1], batch[:, 1:])
                total += torch.tensor([loss.item() * len(rows), len(rows)],
                                      dtype=torch.float64, device=engine.device)
        model.train(was_training)
        if self.world > 1:
            torch.distributed.all_reduce(total)
        return (total[0] / total[1]).item()

    def on_step_end(self, trainer, step, metrics):
        if self.every and step % self.every == 0:
            metrics["eval/loss"] = self.evaluate(trainer.engine)
