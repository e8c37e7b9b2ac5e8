"""Checkpoints that are never half-written, are verified before they are resumed, and resume
bit-identically.

Layout under `checkpoint.dir` (default RUN_DIR/checkpoints):
    step000120/ds/...        DeepSpeed engine state (model, optimizer, LR schedule)
    step000120/rank0.pt ...  per-rank RNG states (DeepSpeed does not save them)
    step000120/meta.json     step, data position, world size, callbacks' state, and the size
                             and checksums of every other file; written last
    step000120/universal/    world-size-independent copy, made on the first resume at
                             another data-parallel size (harness/checkpoint/reshard.py)
    corrupt-step000140/      a checkpoint that failed verification, set aside on resume
    latest                   the newest complete step directory's name, for people and tools
A save goes to .tmp-step000120/ and is renamed into place by rank 0 once every rank has
finished, its files are hashed and synced, and meta.json is on disk, so a crash at any moment
leaves either the old or the new checkpoint complete.

Checksums (CHECKSUM): SHA-256 of every 64 MiB chunk of every file, with the file's size, and
meta.json's own SHA-256 over the rest of it. Each rank hashes the files it wrote, while they are
still in its page cache, in a few threads (hashlib releases the GIL), before the rename. Chunks
rather than whole files let a resume split the work evenly over the ranks.

Resume (checkpoint.resume=auto) verifies the newest step directory; a corrupt or incomplete one
(torn meta.json, missing or truncated file, checksum mismatch, a missing per-rank RNG file) is
set aside as corrupt-stepN/ with one warning naming the steps it loses, and the next older one
is tried. No intact one: one error. An explicitly named checkpoint.resume that fails is an
error, never replaced by another. Verification is collective and bounded: rank 0 reads
meta.json and stats the files (cheap) and broadcasts the manifest; every rank hashes an equal
share of the chunks (within one chunk) and one all-reduce combines the verdicts, so every rank
reaches the same decision and none waits for another beyond one chunk's hashing. Checkpoints
written before checksums existed resume unverified (structure checked: meta.json, ds/, the
RNG files), with a log line.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from harness.checkpoint.reshard import load_resharded, needs_reshard
from harness.common.callback import Callback
from harness.common.durable import fsync_path
from harness.common.errors import HarnessError
from harness.common.lease import RUN_LEASE, held_token
from harness.config.checkpoint import CheckpointConfig
from harness.parallel.collectives import Collectives

log = logging.getLogger("harness")

from harness.checkpoint.sums import (CHECKSUM, META, SET_ASIDE, SUMS, _digest_files, _files_under,
                                     _fsync_write, _Group, _listing, _meta_digest, _older_sibling,
                                     _recording_writes, _step_of, _verify, complete_checkpoints)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this rank's GPU only: a resume may see fewer of them
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], local_rank: int) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state and local_rank < len(state["cuda"]):
        # saved before: every visible GPU's state; this rank trained on cuda:LOCAL_RANK
        torch.cuda.set_rng_state(state["cuda"][local_rank])


class Checkpointer(Callback):
    """Saves every `every` steps and when the loop ends (done, or stopped by a signal)."""

    order = 90  # after the monitor, so its state is current; before the loggers

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, extra_meta: dict[str, Any]):
        self.cfg = cfg
        self.root = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self.run_dir = Path(run_dir)
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
        rank, world = trainer.built.dist.rank, trainer.built.dist.world_size
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(trainer)
        written: list[str] = []
        with _recording_writes(trainer.engine, written):
            trainer.engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        torch.save(_rng_state(), tmp / f"rank{rank}.pt")
        # each rank checksums (and syncs) what it wrote, while it is in its page cache
        mine = {os.path.relpath(p, tmp) for p in written} | {f"rank{rank}.pt"}
        mine = sorted(rel for rel in mine if not rel.startswith(".."))
        _fsync_write(tmp / SUMS.format(rank), json.dumps(_digest_files(tmp, mine, sync=True)))
        _barrier(trainer)
        if rank == 0:
            files: dict[str, Any] = {}
            for r in range(world):
                sums = tmp / SUMS.format(r)
                if sums.is_file():  # else its files count as unclaimed, hashed below
                    files.update(json.loads(sums.read_text()))
                    sums.unlink()
            # what no rank's checkpoint engine wrote (DeepSpeed's zero_to_fp32.py, ...)
            rest = [rel for rel in _files_under(tmp) if rel not in files and rel != META
                    and not rel.startswith(SUMS.split("{")[0])]
            files.update(_digest_files(tmp, rest, sync=True))
            meta = {"step": trainer.step, "consumed_samples": trainer.consumed_samples,
                    "world_size": world,
                    **({"tensor_parallel_size": trainer.plan.tp_size}
                       if trainer.plan.tp_size > 1 else {}),
                    "callbacks": {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks},
                    **self.extra_meta, "checksum": CHECKSUM, "files": dict(sorted(files.items()))}
            meta = json.loads(json.dumps(meta))  # as it will read back (str keys, lists)
            meta["meta_sha256"] = _meta_digest(meta)
            _fsync_write(tmp / META, json.dumps(meta, indent=2))
            for dirpath, _, _ in os.walk(tmp):
                fsync_path(Path(dirpath))
            if final.exists():  # a re-save of the same step (e.g. after a rollback)
                self._delete(final)
            os.replace(tmp, final)
            fsync_path(self.root)
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
    def find_resume(self, comm: Optional[Collectives] = None) -> Optional[Path]:
        """The verified step directory to resume from, or None for a fresh start.

        Collective once the process group exists (every rank calls it; `comm` defaults to the
        process group's): every rank gets the same answer, or the same HarnessError."""
        if self.cfg.resume == "never":
            return None
        group = _Group(comm)
        if self.cfg.resume != "auto":
            return self._check_named(Path(self.cfg.resume), group)
        listing = group.broadcast_object(_listing(self.root) if group.rank == 0 else None)
        if "error" in listing:
            raise HarnessError(listing["error"])
        lost: list[tuple[Path, str]] = []
        for name in listing["names"]:
            step_dir = self.root / name
            problem, verified = _verify(step_dir, group)
            if problem is None:
                if lost:
                    self._set_aside(lost, step_dir, group)
                if not verified and group.rank == 0:
                    log.info("%s was saved without checksums (before they existed): resuming "
                             "it unverified", step_dir)
                return step_dir
            lost.append((step_dir, problem))
        if lost:
            found = ", ".join(f"{p.name} ({problem})" for p, problem in lost)
            raise HarnessError(
                f"no intact checkpoint in {self.root} to resume from: {found}. Restore an "
                f"intact copy there, or move {self.root} aside to start the run over")
        return None

    def _check_named(self, step_dir: Path, group: _Group) -> Path:
        """checkpoint.resume=PATH: the user chose it, so a bad one is an error, not a fallback."""
        problem, verified = _verify(step_dir, group)
        if problem is not None:
            older = _older_sibling(step_dir)
            fix = (f"name an older one (checkpoint.resume={older}) or" if older else
                   "restore an intact copy, or use")
            raise HarnessError(f"checkpoint.resume={step_dir} is corrupt or incomplete "
                               f"({problem}): {fix} checkpoint.resume=auto, which takes the "
                               f"newest intact checkpoint of the run")
        if not verified and group.rank == 0:
            log.info("%s was saved without checksums (before they existed): resuming it "
                     "unverified", step_dir)
        return step_dir

    def _set_aside(self, lost: list[tuple[Path, str]], resume: Path, group: _Group) -> None:
        """Every rank: rank 0 moves the corrupt step directories out of the way (kept for a
        post-mortem), so that they are never resumed again nor counted by keep_last (which
        would prune the checkpoints saved after the resume); all ranks learn whether it could."""
        failed = None
        if group.rank == 0:
            try:
                self._move_aside(lost, resume)
            except OSError as exc:
                failed = f"{type(exc).__name__}: {exc}"
        failed = group.broadcast_object(failed)
        if failed:
            raise HarnessError(f"{lost[0][0]} is corrupt or incomplete ({lost[0][1]}), and "
                               f"moving it aside failed ({failed}): move it out of {self.root} "
                               f"by hand, then start again")

    def _move_aside(self, lost: list[tuple[Path, str]], resume: Path) -> None:
        moved = []
        for step_dir, _ in lost:
            target, n = self.root / f"{SET_ASIDE}{step_dir.name}", 1
            while target.exists():
                target, n = self.root / f"{SET_ASIDE}{step_dir.name}.{n}", n + 1
            os.replace(step_dir, target)
            moved.append(target.name)
        fsync_path(self.root)
        _fsync_write(self.root / "latest", resume.name + "\n")
        first, last = _step_of(resume) + 1, max(_step_of(p) for p, _ in lost)
        steps = f"step {last} is" if first >= last else f"steps {first}-{last} are"
        found = ", ".join(f"{p.name} ({problem})" for p, problem in lost)
        log.warning("checkpoint %s %s corrupt or incomplete, set aside in %s as %s: resuming "
                    "from %s instead, so %s lost and will be redone", found,
                    "is" if len(lost) == 1 else "are", self.root, ", ".join(moved),
                    resume.name, steps)

    def clean_partial(self, rank: int) -> None:
        """Leftovers of a save that was killed; never visible as checkpoints. Removed only by
        the holder of the run directory's lease (harness/common/lease.py): with it held, no other
        writer is saving here, so every partial save is a gone writer's."""
        if rank == 0 and self.root.is_dir() and held_token(self.run_dir / RUN_LEASE) is None:
            log.warning("%s: partial saves left in place: this process does not hold the lease "
                        "of %s", self.root, self.run_dir)
            return
        if rank == 0 and self.root.is_dir():
            for partial in [*self.root.glob(".tmp-step*"), *self.root.glob(".del-step*")]:
                shutil.rmtree(partial, ignore_errors=True)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{path / META} is torn or unreadable ({type(exc).__name__}): "
                           f"resume another checkpoint (checkpoint.resume=auto takes the newest "
                           f"intact one)") from None
    if not isinstance(meta, dict):
        raise HarnessError(f"{path / META} is not a checkpoint's meta: resume another checkpoint")
    return meta


def read_meta(path: Path) -> dict[str, Any]:
    """A step directory's meta.json (verified by find_resume), read before the trainer is
    built: what the data needs to know of the run it resumes (the mix's weights)."""
    return _read_meta(path)


def _check_loadable(trainer, path: Path, meta: dict[str, Any]) -> None:
    """Every rank, together: ds/ is there, and at the saved world size every rank's RNG file
    (without it that rank would go on with a fresh RNG and diverge silently). Each rank looks
    at its own file; one all-reduce tells all of them what any one found."""
    rank, world = trainer.built.dist.rank, trainer.built.dist.world_size
    same_world = meta["world_size"] == world
    flags = torch.zeros(world + 1, dtype=torch.int64, device=trainer.built.comm.device)
    flags[rank] = int(same_world and not (path / f"rank{rank}.pt").is_file())
    flags[world] = int(not (path / "ds").is_dir())
    found = trainer.built.comm.all_reduce(flags, "max").cpu().tolist()
    older = _older_sibling(path)
    fix = (f"resume an older checkpoint (checkpoint.resume={older})" if older
           else "restore an intact copy")
    if found[world]:
        raise HarnessError(f"{path}/ds is missing: the checkpoint cannot be loaded; {fix}")
    missing = [f"rank{r}.pt" for r in range(world) if found[r]]
    if missing:
        raise HarnessError(f"{path} lacks {', '.join(missing)} (the RNG state of those ranks) "
                           f"at the world size it was saved at: resuming would silently "
                           f"diverge from the uninterrupted run; {fix}")


def load(trainer, path: Path) -> dict[str, Any]:
    """Restore engine, data position, RNG and callbacks' state from a step directory.

    Collective. The checksums were verified by Checkpointer.find_resume; here, the structure
    every rank relies on is checked (one line, on every rank, instead of DeepSpeed's bare
    assertion or a silent divergence)."""
    meta = _read_meta(path)
    world = trainer.built.dist.world_size
    saved_tp = meta.get("tensor_parallel_size", 1)
    if saved_tp != trainer.plan.tp_size:  # AutoTP shards would load into the wrong shapes
        raise HarnessError(f"{path} was saved at parallel.tensor_parallel_size={saved_tp}, this "
                           f"run uses {trainer.plan.tp_size}: resume at the saved tensor-"
                           f"parallel size (another is not supported yet)")
    _check_loadable(trainer, path, meta)
    if needs_reshard(meta["world_size"], world, trainer.cfg.zero.stage):
        # ZeRO partitioned the optimizer over the saving ranks: re-partition it through
        # DeepSpeed's universal checkpoint in path/universal/. A single process converts it
        # on the spot; several ranks refuse until `python -m harness.checkpoint.reshard PATH` has
        # made it (they would wait in a collective for the conversion, past its timeout)
        load_resharded(trainer.engine, path, tag="ds")
    else:
        trainer.engine.load_checkpoint(str(path), tag="ds", load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    trainer.step, trainer.consumed_samples = meta["step"], meta["consumed_samples"]
    rng_file = path / f"rank{trainer.built.dist.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved
        _set_rng_state(torch.load(rng_file, weights_only=False), trainer.built.dist.local_rank)
    by_name = {type(cb).__name__: cb for cb in trainer.callbacks}
    for name, state in meta.get("callbacks", {}).items():
        if name in by_name:
            by_name[name].load_state_dict(state)
    return meta


def _barrier(trainer) -> None:
    trainer.built.comm.barrier()  # at every world size: the same calls as a 64-rank run
