"""Checkpoints that are never half-written and resume bit-identically.

Layout under `checkpoint.dir` (default RUN_DIR/checkpoints):
    step000120/ds/...        DeepSpeed engine state (model, optimizer, LR schedule)
    step000120/rank0.pt ...  per-rank RNG states (DeepSpeed does not save them)
    step000120/meta.json     step, data position, world size, callbacks' state; written last
    step000120/universal/    world-size-independent copy, made on the first resume at
                             another data-parallel size (harness/reshard.py)
    latest                   the newest complete step directory's name, for people and tools
A save goes to .tmp-step000120/ and is renamed into place by rank 0 once every rank has
finished and meta.json is on disk, so a crash at any moment leaves either the old or the
new checkpoint complete. Resume takes the newest directory that has meta.json.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from harness.callbacks.base import Callback
from harness.errors import HarnessError
from harness.reshard import load_resharded, needs_reshard

META = "meta.json"


@dataclass
class CheckpointConfig:
    every: int = 50  # optimizer steps between saves; 0: only at the end and on signals
    keep_last: int = 3
    resume: str = "auto"  # auto | never | PATH to a step directory
    dir: Optional[str] = None  # default RUN_DIR/checkpoints

    def validate(self) -> None:
        if self.every < 0:
            raise HarnessError("checkpoint.every must be >= 0 (0: save only at the end)")
        if self.keep_last < 1:
            raise HarnessError("checkpoint.keep_last must be >= 1")
        if self.resume not in ("auto", "never") and not Path(self.resume, META).is_file():
            raise HarnessError(f"checkpoint.resume={self.resume}: not a complete checkpoint "
                               f"directory (no {META}); use auto, never or a step directory")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Step directories with meta.json, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step*") if (p / META).is_file())


class Checkpointer(Callback):
    """Saves every `every` steps and when the loop ends (done, or stopped by a signal)."""

    order = 90  # after the monitor, so its state is current; before the loggers

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, extra_meta: dict[str, Any]):
        self.cfg = cfg
        self.root = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self.extra_meta = extra_meta  # e.g. the data fingerprint, checked on resume
        self.last_saved_step: Optional[int] = None

    # ---- saving ---------------------------------------------------------------------------
    def on_step_end(self, trainer, step, metrics):
        # trainer.step, not `step`: a monitor rollback may just have moved it back
        if self.cfg.every and trainer.step % self.cfg.every == 0 \
                and self.last_saved_step != trainer.step:
            self.save(trainer)

    def on_train_end(self, trainer):
        if self.last_saved_step != trainer.step:
            self.save(trainer)

    def save(self, trainer) -> Path:
        name = f"step{trainer.step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        rank = trainer.built.dist.rank
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(trainer)
        trainer.engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        torch.save(_rng_state(), tmp / f"rank{rank}.pt")
        _barrier(trainer)
        if rank == 0:
            meta = {"step": trainer.step, "consumed_samples": trainer.consumed_samples,
                    "world_size": trainer.built.dist.world_size,
                    "callbacks": {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks},
                    **self.extra_meta}
            _fsync_write(tmp / META, json.dumps(meta, indent=2))
            if final.exists():  # a re-save of the same step (e.g. after a rollback)
                self._delete(final)
            os.replace(tmp, final)
            _fsync_write(self.root / "latest", name + "\n")
            self._prune()
        _barrier(trainer)
        self.last_saved_step = trainer.step
        return final

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[:-self.cfg.keep_last]:
            self._delete(old)

    def discard_after(self, step: int, rank: int) -> None:
        """After a rollback: checkpoints of the abandoned trajectory must never be resumed."""
        if rank == 0:
            for ckpt in complete_checkpoints(self.root):
                if int(ckpt.name.removeprefix("step")) > step:
                    self._delete(ckpt)

    def _delete(self, path: Path) -> None:
        # rename first: a kill inside rmtree must not leave meta.json beside missing files
        doomed = self.root / f".del-{path.name}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    # ---- resuming -------------------------------------------------------------------------
    def find_resume(self) -> Optional[Path]:
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume != "auto":
            return Path(self.cfg.resume)
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def clean_partial(self, rank: int) -> None:
        """Leftovers of a save that was killed; never visible as checkpoints."""
        if rank == 0 and self.root.is_dir():
            for partial in [*self.root.glob(".tmp-step*"), *self.root.glob(".del-step*")]:
                shutil.rmtree(partial, ignore_errors=True)


def load(trainer, path: Path) -> dict[str, Any]:
    """Restore engine, data position, RNG and callbacks' state from a step directory."""
    meta = json.loads((path / META).read_text())
    world = trainer.built.dist.world_size
    if needs_reshard(meta["world_size"], world, trainer.cfg.zero.stage):
        # ZeRO partitioned the optimizer over the saving ranks: re-partition it through
        # DeepSpeed's universal checkpoint in path/universal/. A single process converts it
        # on the spot; several ranks refuse until `python -m harness.reshard PATH` has made
        # it (they would wait in a collective for the conversion, past its timeout)
        load_resharded(trainer.engine, path, tag="ds")
    else:
        trainer.engine.load_checkpoint(str(path), tag="ds", load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    trainer.step, trainer.consumed_samples = meta["step"], meta["consumed_samples"]
    rng_file = path / f"rank{trainer.built.dist.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved
        _set_rng_state(torch.load(rng_file, weights_only=False))
    by_name = {type(cb).__name__: cb for cb in trainer.callbacks}
    for name, state in meta.get("callbacks", {}).items():
        if name in by_name:
            by_name[name].load_state_dict(state)
    return meta


def _barrier(trainer) -> None:
    trainer.built.comm.barrier()  # at every world size: the same calls as a 64-rank run
