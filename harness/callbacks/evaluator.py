"""Validation loss every `data.eval_every` steps, and at train.max_steps, on a fixed set of
held-out sequences.

The set is the same at every data-parallel size, so eval/loss and eval/bpb stay comparable
when a run resumes on another number of ranks: `eval_set_size(cfg)` sequences
(data.eval_sequences, by default data.eval_batches x the micro batch the config names), spread
evenly over the whole validation split by `eval_set` (all of it when it is smaller), so the
set covers every part of the split, not only its first documents. Rank r scores every
world-th sequence of the set; dropout is off. `harness eval RUN --split val --trainer-set`
scores the same set (harness/after/evaluate_split.py).

Every rank runs the SAME number of forwards: at ZeRO 3 each forward all-gathers the
parameters, so a rank that stopped early would leave the others waiting for ever. When the
set does not split evenly, the ranks with fewer batches run a real batch again with weight 0
(it adds nothing to the sum), so the mean over the set is exact at every world size. The
weighted loss sum and the sequence count stay on the device until one all-reduce through the
engine's collectives (made at every world size, also 1) and one device-to-host copy at the end.

eval/bpb, beside eval/loss, is the same loss in bits per UTF-8 byte of the text the targets
stand for: loss / (ln 2 x bytes per token of the set), counted once at start from each token's
decoded bytes (</s> counts 0 bytes). It compares across tokenizers, as the loss cannot.

With a data mixture (data.mix), `source_evaluators` builds one Evaluator per source, on that
source's own validation sequences (a set of `size` sequences each, chosen as above), writing
eval/loss/<source> and eval/bpb/<source>, and a MixtureLoss after them writing eval/loss as the
weight-averaged per-source losses: the expected loss per token of a stream drawn with those
weights (every sequence has the same length, so sequence weights are token weights), not the
loss on whichever sequences a pooled set would hold. eval/bpb of the mixture is that stream's
bits per byte: sum_i w_i loss_i / (ln 2 x sum_i w_i bytes_per_token_i), total bits over total
bytes, written only when every source has its bytes per token.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from harness.common.callback import Callback
from harness.common.errors import HarnessError
from harness.data.shards import Sequences
from harness.parallel.collectives import Collectives


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def eval_set_size(cfg) -> int:
    """The validation set's size in sequences, from the config alone (never the world size):
    data.eval_sequences, or 0 there: data.eval_batches x train.micro_batch_size (the set one
    rank scored before it was fixed), x train.global_batch_size where no micro batch is set."""
    if cfg.data.eval_sequences:
        return cfg.data.eval_sequences
    return cfg.data.eval_batches * (cfg.train.micro_batch_size or cfg.train.global_batch_size or 1)


def eval_set(n_sequences: int, size: int) -> np.ndarray:
    """min(size, n) sequence indices spread evenly over [0, n): i x n // k for i < k, so
    distinct, first 0, and every part of the split in proportion."""
    k = min(size, n_sequences)
    return np.arange(k, dtype=np.int64) * n_sequences // max(k, 1)


class Evaluator(Callback):
    order = 15  # before the monitor and the loggers, so eval/loss is in the step's metrics

    def __init__(self, sequences: Sequences, every: int, size: int, micro: int,
                 rank: int, world: int, token_bytes: Optional[np.ndarray] = None,
                 name: str = ""):
        """`size`: sequences in the set (eval_set_size); `micro`: sequences per forward;
        `name`: a mixture's source, whose keys are eval/loss/<name> and eval/bpb/<name>."""
        self.every = every
        suffix = f"/{name}" if name else ""
        self.loss_key, self.bpb_key = f"eval/loss{suffix}", f"eval/bpb{suffix}"
        chosen = eval_set(len(sequences), size)
        total = len(chosen)
        self.bytes_per_token = _bytes_per_token(sequences, chosen, token_bytes)
        mine = chosen[rank::world]  # rank r scores every world-th sequence of the set
        chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
        # rank 0 holds the most sequences (ceil(total / world)): everyone runs its batch count
        forwards = _ceil_div(_ceil_div(total, world), micro)
        # (rows, weight): a batch's mean loss counts once per sequence in it
        self.batches = [(sequences.batch(c), float(len(c))) for c in chunks]
        pad = self.batches[0][0] if self.batches else sequences.batch([0])
        self.batches += [(pad, 0.0)] * (forwards - len(chunks))
        self.n_sequences = len(mine)  # this rank's share of the set (padding not counted)
        self.total = total
        self._on_device: list[tuple[torch.Tensor, float]] | None = None

    def _device_batches(self, device: torch.device) -> list[tuple[torch.Tensor, float]]:
        # the set is small and fixed: copied to the device once, not at every evaluation
        if self._on_device is None or self._on_device[0][0].device != device:
            self._on_device = [(torch.from_numpy(rows).to(device), w) for rows, w in self.batches]
        return self._on_device

    def evaluate(self, engine, comm: Collectives) -> float:
        """Mean loss per sequence over the whole set, the same value on every rank."""
        model = engine.module
        was_training = model.training
        model.eval()
        acc = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss sum, count
        try:
            with torch.no_grad():
                for batch, weight in self._device_batches(engine.device):
                    loss = model(batch[:, :-1], batch[:, 1:])
                    acc[0] += loss.double() * weight  # no host sync: stays on the device
        finally:
            model.train(was_training)
        acc[1] = self.n_sequences
        comm.all_reduce(acc)
        return (acc[0] / acc[1]).item()

    def on_step_end(self, trainer, step, metrics):
        # and at the last step, so the closing eval loss is the final model's, whatever
        # max_steps is (every rank knows it is the last: the same config)
        last = step == trainer.cfg.train.max_steps
        if self.every and (step % self.every == 0 or last):
            loss = self.evaluate(trainer.engine, trainer.built.comm)
            metrics[self.loss_key] = loss
            if self.bytes_per_token:
                metrics[self.bpb_key] = loss / (math.log(2) * self.bytes_per_token)


class MixtureLoss(Callback):
    """eval/loss (and eval/bpb) of a mixture from its sources' Evaluators' results in the same
    step's metrics (see the module doc); runs after them."""
    order = 16

    def __init__(self, sources: Sequence[Evaluator], weights: Sequence[float]):
        self.sources, self.weights = list(sources), list(weights)  # mixture_loss normalises

    def mix(self, metrics: dict) -> dict[str, float]:
        """eval/loss and, when every source has bytes, eval/bpb from the per-source keys."""
        loss, bpb = mixture_loss([metrics[ev.loss_key] for ev in self.sources],
                                 [ev.bytes_per_token for ev in self.sources], self.weights)
        return {"eval/loss": loss, **({"eval/bpb": bpb} if bpb is not None else {})}

    def on_step_end(self, trainer, step, metrics):
        if all(ev.loss_key in metrics for ev in self.sources):
            metrics.update(self.mix(metrics))


def mixture_loss(losses: Sequence[float], bytes_per_token: Sequence[Optional[float]],
                 weights: Sequence[float]) -> tuple[float, Optional[float]]:
    """(loss, bits per byte) of a mixture: sum_i w_i loss_i, and that over (ln 2 x sum_i w_i
    bytes_per_token_i), None unless every source has its bytes per token; `weights` of any
    positive scale (normalised here)."""
    total = float(sum(weights))
    w = [x / total for x in weights]
    loss = sum(wi * x for wi, x in zip(w, losses))
    if not all(bytes_per_token):
        return loss, None
    return loss, loss / (math.log(2) * sum(wi * b for wi, b in zip(w, bytes_per_token)))


def source_evaluators(named: list[tuple[str, Sequences, Optional[np.ndarray]]],
                      weights: list[float], every: int, size: int, micro: int, rank: int,
                      world: int) -> list[Callback]:
    """A mixture's validation: for each (source name, its validation sequences, its token
    bytes table or None) an Evaluator of `size` sequences writing eval/loss/<name> and
    eval/bpb/<name>, then a MixtureLoss writing eval/loss (eval/bpb) as the weight-averaged
    per-source values; `weights` in the order of `named`, any positive scale."""
    if len(named) != len(weights) or not named:
        raise ValueError(f"{len(named)} sources but {len(weights)} weights")
    for name, sequences, _ in named:
        if not len(sequences):
            raise HarnessError(f"data.mix: source {name!r} has no validation sequence of "
                               f"model.block_size + 1 tokens; give it more text or set "
                               f"data.eval_every=0")
    evaluators = [Evaluator(seqs, every, size, micro, rank, world, token_bytes, name=name)
                  for name, seqs, token_bytes in named]
    return [*evaluators, MixtureLoss(evaluators, weights)]


def _bytes_per_token(sequences: Sequences, chosen: np.ndarray,
                     token_bytes: Optional[np.ndarray]) -> Optional[float]:
    """UTF-8 bytes per target token over the whole fixed set (the same on every rank), from
    each token's decoded bytes (harness.data.tokenizer.piece_bytes): the targets of sequence i
    are tokens[i x L + 1 : (i + 1) x L + 1]. None without a table or without bytes."""
    if token_bytes is None or not len(chosen):
        return None
    n_bytes = int(token_bytes[set_targets(sequences.tokens, sequences.seq_len, chosen)].sum())
    return n_bytes / (len(chosen) * sequences.seq_len) if n_bytes else None


def set_targets(tokens: np.ndarray, seq_len: int, chosen: np.ndarray) -> np.ndarray:
    """The target token ids of the chosen sequences (sequence i's are tokens[i x L + 1 :
    (i + 1) x L + 1]), in order."""
    parts = [np.asarray(tokens[i * seq_len + 1:(i + 1) * seq_len + 1]) for i in chosen.tolist()]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
