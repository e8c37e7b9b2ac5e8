"""`harness eval RUN_DIR_OR_CHECKPOINT --split val`: the run's own validation split, from the
token shards its training read (data.out_dir of RUN_DIR/config.yaml), scored as the trainer's
evaluation scores it.

The split is one stream of tokens, documents joined by </s> as in training. At the default
stride (block_size) it is cut into the trainer's sequences: window i holds tokens
[i x block_size, (i + 1) x block_size] and scores every token after its first from the tokens
before it in the window (context crosses document boundaries, as in training). The default
scores the whole split; `--max-tokens` takes the first N tokens scored (N = windows x
block_size for whole windows). A smaller `--stride` gives every window block_size - stride
tokens of context before the ones it scores.

`--trainer-set` scores exactly the trainer's fixed validation set instead (the sequences
harness.callbacks.evaluator.eval_set picks, data.eval_sequences of them, spread over the
split; the same at every data-parallel size), so its loss equals the trainer's eval/loss at
the checkpoint's step (tests/after/test_eval_text.py checks equality).

bits_per_byte counts each target's decoded UTF-8 bytes (</s> counts none), as eval/bpb does.

A run trained on a mixture (data.mix) has no shards at data.out_dir but one directory per
source in it: each source's split is scored as above (--trainer-set: the trainer's set of that
source), and the mixture's loss and bits_per_byte combined with the config's shares as the
trainer's eval/loss and eval/bpb are (harness/after/evaluate_mix.py).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from harness.after.evaluate_mix import mix_fingerprints, mix_record, open_mix_shards
from harness.after.evaluate_text import Scorer, Totals, check_options, windows
from harness.callbacks.evaluator import eval_set, eval_set_size, set_targets
from harness.common.errors import HarnessError

log = logging.getLogger("harness")
SPLITS = ("val", "train")


def out_dir_candidates(cfg, run_dir: Path) -> list[Path]:
    """Where data.out_dir of the run's config.yaml may be: as written; a relative one also
    from the run directory's parent (as the tokenizer is found)."""
    out_dir = Path(cfg.data.out_dir)
    return [out_dir] if out_dir.is_absolute() else [out_dir, run_dir.parent / out_dir]


def run_out_dir(cfg, run_dir: Path, present) -> Path:
    """The first of out_dir_candidates where `present(dir)` holds, else data.out_dir as
    written."""
    candidates = out_dir_candidates(cfg, run_dir)
    return next((d for d in candidates if present(d)), candidates[0])


def open_run_shards(cfg, run_dir: Path, random_access: bool = True):
    """The run's token shards (data.out_dir, found by run_out_dir). `random_access` false:
    maps left to readahead, for a scan of a whole split."""
    from harness.data.shards import MANIFEST, TokenShards

    out_dir = run_out_dir(cfg, run_dir, lambda d: (d / MANIFEST).is_file())
    if not (out_dir / MANIFEST).is_file():
        raise HarnessError(f"--split: no token shards in data.out_dir={cfg.data.out_dir} (from "
                           f"{run_dir}/config.yaml): run from the directory the run was "
                           f"trained in, prepare them again (harness prepare-data --config "
                           f"{run_dir}/config.yaml), or score text files with --data")
    return TokenShards.open(out_dir, random_access=random_access)


def score_split(model, tokens: np.ndarray, block: int, eos_id: int,
                stride: Optional[int] = None, max_tokens: Optional[int] = None,
                batch_size: int = 8, device: str = "cpu") -> tuple[Totals, int]:
    """(totals, windows) over tokens[1 : n + 1], n = min(len - 1, max_tokens)."""
    stride = block if stride is None else stride
    n = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    scorer = Scorer(model, block, stride, eos_id, batch_size, device)
    was_training = model.training
    model.eval()
    try:
        scorer.add_stream(0, tokens[:n + 1])
        scorer.flush()
    finally:
        model.train(was_training)
    totals = Totals(nats=float(scorer.doc_nats.get(0, 0.0)), tokens=n)
    totals.per_document = [totals.nats]
    return totals, sum(1 for _ in windows(n, block, stride))


def score_trainer_set(model, tokens: np.ndarray, block: int, eos_id: int, size: int,
                      batch_size: int = 8, device: str = "cpu") -> tuple[Totals, np.ndarray]:
    """(totals, the set's sequence indices): the trainer's validation set (eval_set), each
    sequence one window of block_size targets, as the trainer scores it."""
    chosen = eval_set(max(0, (len(tokens) - 1) // block), size)
    scorer = Scorer(model, block, block, eos_id, batch_size, device)
    was_training = model.training
    model.eval()
    try:
        for i in chosen.tolist():
            scorer.add_stream(0, tokens[i * block:(i + 1) * block + 1])
        scorer.flush()
    finally:
        model.train(was_training)
    totals = Totals(nats=float(scorer.doc_nats.get(0, 0.0)), tokens=len(chosen) * block)
    totals.per_document = [totals.nats]
    return totals, chosen


def _targets(tokens: np.ndarray, block: int, chosen: Optional[np.ndarray], n: int) -> np.ndarray:
    """The target token ids scored: of the chosen sequences, or tokens[1 : n + 1]."""
    if chosen is None:
        return np.asarray(tokens[1:n + 1], dtype=np.int64)
    return set_targets(tokens, block, chosen)


def check_split_options(split: str, max_tokens: Optional[int], stride: Optional[int],
                        batch_size: int, trainer_set: bool) -> None:
    check_options(max_tokens, stride, batch_size)
    if trainer_set and (max_tokens is not None or stride is not None):
        raise HarnessError("--trainer-set scores the trainer's own windows: leave out "
                           "--max-tokens and --stride")
    if split not in SPLITS:
        raise HarnessError(f"--split {split}: choose val (the run's validation split) or train")
    if trainer_set and split != "val":
        raise HarnessError("--trainer-set is the trainer's validation set: use --split val")


def evaluate_split(source: str, split: str, max_tokens: Optional[int] = None,
                   stride: Optional[int] = None, batch_size: int = 8,
                   device: str = "cpu", trainer_set: bool = False) -> dict:
    """The JSON record `harness eval --split` prints; a mixture's (data.mix): evaluate_mix."""
    from harness.checkpoint import io as checkpoint_io

    check_split_options(split, max_tokens, stride, batch_size, trainer_set)
    loaded = checkpoint_io.load(source)
    if loaded.cfg.data.mix:  # each source's split, then the mixture's totals
        parts = open_mix_shards(loaded.cfg, out_dir_candidates(loaded.cfg, loaded.run_dir),
                                loaded.run_dir, random_access=trainer_set)
        trained_on = mix_fingerprints(loaded.meta)
        return mix_record(loaded, split, stride, {
            name: score_shards(loaded, shards, split, max_tokens, stride, batch_size, device,
                               trainer_set, trained_on.get(name))
            for name, shards in parts.items()})
    shards = open_run_shards(loaded.cfg, loaded.run_dir, random_access=trainer_set)
    record = score_shards(loaded, shards, split, max_tokens, stride, batch_size, device,
                          trainer_set, loaded.meta.get("data_fingerprint"))
    return {**checkpoint_io.describe(loaded), "split": split, **record}


def score_shards(loaded, shards, split: str, max_tokens: Optional[int], stride: Optional[int],
                 batch_size: int, device: str, trainer_set: bool,
                 trained_on: Optional[str]) -> dict:
    """One prepared directory's record (shards, totals, windows, speed): its `split` scored
    by loaded.model; `trained_on`: the data fingerprint the checkpoint recorded for it."""
    from harness.data.tokenizer import piece_bytes

    block = loaded.cfg.model.block_size
    tokens = getattr(shards, split)
    if len(tokens) < 2:
        raise HarnessError(f"{shards.directory}: the {split} split holds {len(tokens)} tokens, "
                           f"none to score: score text files with --data")
    if shards.vocab_size > loaded.cfg.model.vocab_size:
        raise HarnessError(f"{shards.directory}: its tokenizer has {shards.vocab_size} pieces, "
                           f"more than the model's {loaded.cfg.model.vocab_size}: not this "
                           f"run's shards; score text files with --data")
    if trained_on is not None and trained_on != shards.fingerprint:
        log.warning("%s: data fingerprint %s, not the %s this checkpoint was trained on: the "
                    "shards were prepared again since (another split?)", shards.directory,
                    shards.fingerprint[:12], str(trained_on)[:12])
    t0 = time.perf_counter()
    model, chosen = loaded.model.to(device), None
    if trainer_set:
        totals, chosen = score_trainer_set(model, tokens, block, shards.eos_id,
                                           eval_set_size(loaded.cfg), batch_size, device)
        n_windows = len(chosen)
    else:
        totals, n_windows = score_split(model, tokens, block, shards.eos_id, stride,
                                        max_tokens, batch_size, device)
    seconds = time.perf_counter() - t0
    table = piece_bytes(shards.tokenizer_path)
    totals.bytes = int(table[_targets(tokens, block, chosen, totals.tokens)].sum())
    offsets = shards.offsets(split)
    if chosen is None:
        totals.documents = int(np.searchsorted(offsets[:-1], totals.tokens, side="right"))
    else:  # the documents the set's targets lie in
        at = (chosen[:, None] * block + np.arange(1, block + 1)).ravel()
        totals.documents = len(np.unique(np.searchsorted(offsets[:-1], at, side="right")))
    return {"shards": str(shards.directory), **totals.summary(), "windows": n_windows,
            "window": block, "stride": stride or block, "split_tokens": int(len(tokens)),
            "seconds": round(seconds, 3), "tokens_per_s": round(totals.tokens / seconds, 1)}
