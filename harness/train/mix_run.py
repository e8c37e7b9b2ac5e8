"""A weighted mixture's run (data.mix) in the trainer: its sample stream, its per-source
validation, and what its checkpoints record so that a resume draws the same stream.

harness/train/run.py calls these where a run on one corpus takes its single-corpus path: the
MixtureSampler (harness/data/mixture.py) in place of the GlobalSampler, the budgets and
max_repeats checked before the first step, one evaluator per source (eval/loss/<name>,
eval/bpb/<name>) and the mixture's eval/loss, and the weight phases in the checkpoint's meta:
a resume with other sources is refused, with other weights refused unless
data.mix_reweight=true (a new phase from the resumed sample position).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.callbacks.evaluator import eval_set_size, source_evaluators
from harness.common.callback import Callback
from harness.common.errors import HarnessError
from harness.config import Config
from harness.config.data import DataConfig
from harness.data.mix_budget import check_budgets
from harness.data.mix_prepare import MixShards, prepare_mix
from harness.data.mixture import MixedSequences, MixtureSampler, check_repeats
from harness.data.shards import TokenShards
from harness.data.sources import TrainData
from harness.data.tokenizer import piece_bytes
from harness.train.engine import Built

log = logging.getLogger("harness")


def prepare_mix_ready(cfg: DataConfig, start: float) -> str:
    """Prepare the mix (a single process's first run does it itself); returns the line that
    says it is ready, with each source's tokens."""
    dirs = prepare_mix(cfg, progress=sys.stderr.isatty())
    splits = [TokenShards.open(d).manifest["splits"] for d in dirs]
    return (f"data: {cfg.out_dir} ready in {time.perf_counter() - start:.1f} s: "
            + ", ".join(f"{d.name} {t['train']['tokens']:,} train + {t['val']['tokens']:,} val "
                        f"tokens" for d, t in zip(dirs, splits)))


def mix_train_data(cfg: Config, built: Built, shards: MixShards, seqs: MixedSequences,
                   phases: list | None) -> TrainData:
    """The mixture's training stream; refused before any step where the token budgets or a
    source's max_repeats do not fit the run."""
    counts = [len(p) for p in seqs.parts]
    sampler = MixtureSampler(shards.names, counts, phases or [(0, cfg.data.mix_shares())],
                             cfg.train.seed, built.plan.batch.micro_batch,
                             built.plan.dp_rank(built.dist.rank), built.plan.batch.dp_size)
    check_budgets(cfg.data.mix, counts, cfg.model.block_size, cfg.train.max_steps,
                  built.plan.batch.global_batch)
    end = cfg.train.max_steps * built.plan.batch.global_batch
    check_repeats(shards.names, counts, sampler.drawn_by(end),
                  [e.max_repeats for e in cfg.data.mix])
    return TrainData(seqs, sampler, built.engine.device)


class SourceTokens(Callback):
    """data/tokens/<source>: each source's tokens drawn so far (samples x block_size), beside
    train/tokens_seen, which they sum to. Counted from the sampler, not stored: at the first
    step after a start (or a resume, at any DP size) MixtureSampler.drawn_by(consumed), exact,
    then each step's positions added. Rank 0 only: the loggers are rank 0's."""
    order = 10  # before the loggers, so they see the keys

    def __init__(self) -> None:
        self.drawn: np.ndarray | None = None
        self.at = 0  # the stream position self.drawn counts up to

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if not trainer.is_main:
            return
        sampler, end = trainer.data.sampler, trainer.consumed_samples
        if self.drawn is None or end < self.at:  # a start, or a rollback to an earlier step
            self.drawn = sampler.drawn_by(end)
        elif end > self.at:
            sources, _ = sampler.draws(np.arange(self.at, end, dtype=np.int64))
            self.drawn += np.bincount(sources, minlength=len(self.drawn))
        self.at = end
        seq_len = trainer.plan.seq_len
        metrics.update({f"data/tokens/{name}": int(n) * seq_len
                        for name, n in zip(trainer.data.source_names, self.drawn)})


def mix_evaluators(cfg: Config, built: Built, shards: MixShards) -> list[Callback]:
    token_bytes = piece_bytes(shards.tokenizer_path)  # one tokenizer for every source
    return source_evaluators(
        [(name, seqs, token_bytes)
         for name, seqs in shards.named_sequences("val", cfg.model.block_size)],
        cfg.data.mix_shares(), cfg.data.eval_every, eval_set_size(cfg),
        built.plan.batch.micro_batch, built.plan.dp_rank(built.dist.rank),
        built.plan.batch.dp_size)


def mix_meta(shards: MixShards, phases: list) -> dict:
    """What a checkpoint of a mix run records: the sources in order with their shards'
    fingerprints, the weights (shares) and from which sample position each applies."""
    return {"fingerprints": shards.fingerprints,
            "phases": [[start, dict(zip(shards.names, shares))] for start, shares in phases]}


def mix_phases(cfg: Config, shards: MixShards, meta: dict | None, resume: Path | None) -> list:
    """The mix's weight phases: [(0, shares)] for a new run; on resume the checkpoint's, to
    which new weights are added at the resumed position only with data.mix_reweight=true.
    Other sources (names, order or shards) than the checkpoint's are refused."""
    shares = cfg.data.mix_shares()
    if meta is None:
        return [(0, shares)]
    saved = meta.get("data_mix")
    if not isinstance(saved, dict):
        raise HarnessError(f"checkpoint {resume} was trained without data.mix: start a new "
                           f"train.run_dir for the mixture")
    theirs, ours = saved.get("fingerprints", {}), shards.fingerprints
    if list(theirs) != list(ours):
        raise HarnessError(f"data.mix names the sources {list(ours)}, checkpoint {resume} was "
                           f"trained on {list(theirs)} (in that order): restore data.mix's "
                           f"sources or start a new train.run_dir")
    for name in ours:
        if theirs[name] != ours[name]:
            raise HarnessError(f"data.mix source {name}: its shards (fingerprint "
                               f"{ours[name][:12]}) differ from the ones checkpoint {resume} "
                               f"was trained on ({theirs[name][:12]}): point data.out_dir at "
                               f"the original shards or start a new train.run_dir")
    phases = [(int(start), [float(w[n]) for n in ours]) for start, w in saved["phases"]]
    if phases[-1][1] == shares:
        return phases
    old = ", ".join(f"{n} {w:.4g}" for n, w in zip(ours, phases[-1][1]))
    new = ", ".join(f"{n} {w:.4g}" for n, w in zip(ours, shares))
    step, position = int(meta["step"]), int(meta["consumed_samples"])
    if not cfg.data.mix_reweight:
        raise HarnessError(f"data.mix's weights (shares {new}) differ from the ones checkpoint "
                           f"{resume} was trained with ({old}): restore them, or set "
                           f"data.mix_reweight=true to train with the new ones from step "
                           f"{step} on")
    log.info("data.mix_reweight: the weights change at step %d (sample %d) from shares %s to "
             "%s; earlier steps keep their samples", step, position, old, new)
    if phases[-1][0] == position:  # reweighted again before any step was saved
        return [*phases[:-1], (position, shares)]
    return [*phases, (position, shares)]
