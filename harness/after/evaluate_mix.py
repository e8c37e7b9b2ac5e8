"""`harness eval RUN --split val` for a run trained on a weighted mixture (data.mix): each
source's own split (its prepared directory <data.out_dir>/<name>/), scored as
harness.after.evaluate_split scores one corpus's, and the mixture's loss and bits per byte
combined from them as the trainer's MixtureLoss combines eval/loss/<name> (evaluator.py):

    loss = sum_i w_i loss_i        bits_per_byte = loss / (ln 2 x sum_i w_i bytes_per_token_i)

with w the shares of the run's config (data.mix_shares(): weights or token budgets, summing to
1). That is the expected loss per token of a stream drawn with those shares, not the loss of
the sources' tokens pooled: a small source counts by its share, not its size. With
--trainer-set each source's set is the trainer's own (eval_set over its validation sequences,
eval_set_size each), so every loss equals the trainer's eval/loss/<name> and eval/loss at the
checkpoint's step (tests/after/test_eval_mix.py).

The printed record: the checkpoint, the split, "weights" {name: share}, the mixture's "loss",
"perplexity" and "bits_per_byte", totals summed over the sources (tokens, bytes, nats,
windows, seconds), and "sources" {name: the record one corpus's split gets}. --max-tokens
applies to each source. evaluate_split.evaluate_split scores the sources; this module opens
them and combines their records.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Optional

from harness.callbacks.evaluator import mixture_loss
from harness.common.errors import HarnessError

log = logging.getLogger("harness")


def open_mix_shards(cfg, candidates: list[Path], run_dir: Path,
                    random_access: bool = True) -> dict:
    """{name: TokenShards} of every source in data.mix's order, in the first of `candidates`
    (where data.out_dir may be: evaluate_split.out_dir_candidates) holding them all, else in
    the first that exists."""
    from harness.data.mix_prepare import source_dir
    from harness.data.shards import MANIFEST, TokenShards

    def dirs(out: Path) -> dict[str, Path]:
        data = dataclasses.replace(cfg.data, out_dir=str(out))
        return {e.name: source_dir(data, e) for e in cfg.data.mix}

    found = next((dirs(d) for d in candidates
                  if all((s / MANIFEST).is_file() for s in dirs(d).values())), None)
    found = found or dirs(next((d for d in candidates if d.is_dir()), candidates[0]))
    missing = [name for name, d in found.items() if not (d / MANIFEST).is_file()]
    if missing:
        raise HarnessError(f"--split: no token shards for data.mix source(s) "
                           f"{', '.join(missing)} in data.out_dir={cfg.data.out_dir} (from "
                           f"{run_dir}/config.yaml): run from the directory the run was "
                           f"trained in, prepare them again (harness prepare-data --config "
                           f"{run_dir}/config.yaml), or score text files with --data")
    return {name: TokenShards.open(d, random_access=random_access)
            for name, d in found.items()}


def mix_fingerprints(meta: dict) -> dict[str, str]:
    """{source: the data fingerprint of its shards} a mix run's checkpoint recorded."""
    return (meta.get("data_mix") or {}).get("fingerprints") or {}


def mix_totals(records: dict[str, dict], shares: list[float]) -> dict:
    """The mixture's loss, perplexity and bits_per_byte from the sources' records (in
    data.mix's order, as `shares`), as MixtureLoss.mix combines them: bits_per_byte only when
    every source has bytes (NaN otherwise, as one corpus's record without bytes)."""
    loss, bpb = mixture_loss([r["loss"] for r in records.values()],
                             [r["bytes_per_token"] if r["bytes"] else None
                              for r in records.values()], shares)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": math.nan if bpb is None else bpb}


def _check_weights(loaded, shares: list[float]) -> None:
    """A checkpoint saved before a reweighted resume (data.mix_reweight) was evaluated by the
    trainer with its own shares, not the config's newer ones: said, not refused."""
    phases = (loaded.meta.get("data_mix") or {}).get("phases") or []
    if not phases:
        return
    then = phases[-1][1]
    names = [e.name for e in loaded.cfg.data.mix]
    if list(then) == names and any(abs(float(then[n]) - s) > 1e-12
                                   for n, s in zip(names, shares)):
        log.warning("%s was trained with the shares %s; the mixture's loss uses the run "
                    "config's %s (its eval/loss at that step used the former)", loaded.step_dir,
                    _shares_text(names, [float(then[n]) for n in names]),
                    _shares_text(names, shares))


def _shares_text(names: list[str], shares: list[float]) -> str:
    return ", ".join(f"{n} {s:.4g}" for n, s in zip(names, shares))


def mix_record(loaded, split: str, stride: Optional[int], records: dict[str, dict]) -> dict:
    """The JSON record `harness eval --split` prints for a data.mix run, from each source's
    record (evaluate_split.score_shards) in data.mix's order."""
    from harness.checkpoint import io as checkpoint_io

    cfg = loaded.cfg
    shares = cfg.data.mix_shares()
    _check_weights(loaded, shares)
    summed = {key: sum(r[key] for r in records.values())
              for key in ("documents", "tokens", "bytes", "nats", "windows", "split_tokens")}
    seconds = sum(r["seconds"] for r in records.values())
    return {**checkpoint_io.describe(loaded), "split": split,
            "shards": str(Path(next(iter(records.values()))["shards"]).parent),
            "weights": {e.name: s for e, s in zip(cfg.data.mix, shares)},
            **mix_totals(records, shares), **summed, "window": cfg.model.block_size,
            "stride": stride or cfg.model.block_size, "seconds": round(seconds, 3),
            "sources": records}
