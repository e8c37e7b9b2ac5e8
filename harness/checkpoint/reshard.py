"""Resume a ZeRO stage 1-3 checkpoint at another data-parallel world size.

DeepSpeed's ZeRO checkpoint (step/ds/) holds one optimizer file per data-parallel rank, each
with that rank's slice of the flattened fp32 master weights and Adam moments, and its loader
refuses a checkpoint saved by a different number of ranks. DeepSpeed's *universal* checkpoint
is the world-size-independent form of the same state: one directory per parameter with its
full fp32 master weight, exp_avg, exp_avg_sq and step, which any number of ranks can slice
(deepspeed/checkpoint/ds_to_universal.py converts, `load_universal` loads). This module

  - converts step/ds/ into step/universal/ds/ once: `python -m harness.checkpoint.reshard STEP_DIR`
    ahead of a resume on several ranks, or in-process on a resume by a single process (with
    several ranks, the others would wait in a collective for the conversion, longer than the
    process group's timeout for large models: they refuse instead, naming the command); the
    conversion is written to step/.tmp-universal-PID/ and renamed into place, so
    step/universal/ is either absent or complete, and later resumes reuse it;
  - loads it into an engine built for the new world size: DeepSpeed reads
    `load_universal_checkpoint` from its config at load time only, so it is switched on for
    this one load_checkpoint call, not written into ds_config.json;
  - repairs two gaps of DeepSpeed's ZeRO 3 universal loader: it gives every parameter group
    the same `step` tensor, which torch's Adam then increments once per group (Adam's step
    advanced by 2 per step with our 2 groups), and it copies group 0's hyperparameters into
    every group; each group gets its own step and its saved hyperparameters back.

The model states (module, LR scheduler, global step) come from the copied
mp_rank_00_model_states.pt (zero_pp_rank_0_mp_rank_00_model_states.pt at stage 3); the fp32
master weights and the Adam moments are the saved ones bit for bit, re-sliced for the new
ranks. The global batch is the caller's business (the plan re-derives accumulation).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.common.durable import fsync_path, fsync_tree
from harness.common.errors import HarnessError
from harness.parallel.collectives import Collectives

log = logging.getLogger("harness")

UNIVERSAL = "universal"  # step/universal/<tag>/: the converted, world-size-independent copy
INFO = "reshard.json"  # written into step/universal/ before the rename: what was converted
TMP_PREFIX = ".tmp-universal-"


def needs_reshard(saved_world_size: int, world_size: int, zero_stage: int) -> bool:
    """A ZeRO 1-3 checkpoint partitions the optimizer over the saving ranks; stage 0 does not."""
    return zero_stage > 0 and saved_world_size != world_size


def universal_dir(step_dir: Path) -> Path:
    return Path(step_dir) / UNIVERSAL


def is_converted(step_dir: Path, tag: str = "ds") -> bool:
    out = universal_dir(step_dir)
    return (out / INFO).is_file() and (out / tag / "zero" / "optimizer_state.pt").is_file()


def convert(step_dir: Path, tag: str = "ds", workers: int = 1) -> tuple[Path, float]:
    """step/<tag>/ -> step/universal/<tag>/, once. One process only (global rank 0).

    Returns (the directory to pass to load_checkpoint, seconds spent; 0.0 when reused).
    """
    step_dir = Path(step_dir)
    final = universal_dir(step_dir)
    if is_converted(step_dir, tag):
        return final, 0.0
    src = step_dir / tag
    if not any(src.glob("*optim_states.pt")):
        raise HarnessError(f"{src}: no ZeRO optimizer files (*optim_states.pt) to re-partition")
    for stale in step_dir.glob(TMP_PREFIX + "*"):  # a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = step_dir / f"{TMP_PREFIX}{os.getpid()}"
    t0 = time.perf_counter()
    try:
        _ds_to_universal(src, tmp / tag, workers)
        saved = torch.load(_model_states_file(src), map_location="cpu", weights_only=False)
        info = {"source": str(src), "source_dp_world_size": saved.get("dp_world_size"),
                "global_steps": saved.get("global_steps"), "ds_version": saved.get("ds_version"),
                "seconds": round(time.perf_counter() - t0, 3)}
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        fsync_tree(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_converted(step_dir, tag):  # not a concurrent twin that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_path(step_dir)
    return final, time.perf_counter() - t0


def load_resharded(engine, step_dir: Path, tag: str = "ds", load_optimizer_states: bool = True,
                   load_lr_scheduler_states: bool = True, workers: int = 1) -> dict[str, Any]:
    """engine.load_checkpoint for a ZeRO checkpoint saved at another data-parallel world size.

    Collective: every rank calls it. A conversion that exists already is reused. A missing
    one is made here only by a single process: with more ranks, the others would wait in a
    collective for it (30 s at 124M parameters, over 10 minutes at 7B) past the process
    group's timeout, so every rank refuses instead, naming `python -m harness.checkpoint.reshard`.
    Returns what was done.
    """
    if not engine.zero_optimization():
        raise HarnessError("load_resharded is for ZeRO stages 1-3; stage 0 checkpoints load "
                           "at any world size with engine.load_checkpoint")
    # the harness's collectives, on the engine's device (NCCL rejects CPU tensors), also
    # in a world of one rank
    comm = Collectives(engine.device)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    outcome: dict[str, Any] = {}
    if rank == 0:
        try:
            if is_converted(step_dir, tag) or world == 1:
                load_dir, seconds = convert(step_dir, tag, workers)  # reuses a conversion
                outcome = {"load_dir": str(load_dir), "convert_s": seconds}
            else:
                outcome = {"missing": True}
        except Exception as exc:  # noqa: BLE001 (every rank must learn of it, not hang)
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
    result = comm.broadcast_object(outcome)  # rank 0's outcome on every rank
    if "missing" in result:
        raise HarnessError(f"{step_dir} was saved by another number of data-parallel ranks and "
                           f"has no universal checkpoint yet, which {world} ranks cannot wait "
                           f"for: run `python -m harness.checkpoint.reshard {step_dir}` once, then start "
                           f"again")
    if "error" in result:
        raise HarnessError(f"{step_dir}: converting the ZeRO checkpoint for another world size "
                           f"failed on rank 0: {result['error']}")
    t0 = time.perf_counter()
    cfg = engine._config  # DeepSpeed reads this flag in load_checkpoint only
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(result["load_dir"], tag=tag,
                                              load_optimizer_states=load_optimizer_states,
                                              load_lr_scheduler_states=load_lr_scheduler_states)
    finally:
        cfg.load_universal_checkpoint = before
    if load_path is None:
        raise HarnessError(f"{result['load_dir']}/{tag}: DeepSpeed found no checkpoint to load")
    if load_optimizer_states:
        _unalias_steps(engine.optimizer.optimizer)
        if engine.zero_optimization_partition_weights():
            _restore_stage3_param_groups(engine, Path(result["load_dir"]) / tag)
    result["load_s"] = time.perf_counter() - t0
    if rank == 0:
        log.info("re-partitioned %s for %d data-parallel ranks (convert %.1f s%s, load %.1f s)",
                 step_dir, engine.dp_world_size, result["convert_s"],
                 "" if result["convert_s"] else ": reused", result["load_s"])
    return result


# ---- internals ---------------------------------------------------------------------------

def _ds_to_universal(src: Path, dst: Path, workers: int) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(src), output_folder=str(dst),
                              num_extract_workers=workers, num_merge_workers=workers,
                              keep_temp_folder=False, strict=True,
                              # our engines save no universal_checkpoint_info: the default one
                              # (no tensor/pipeline parallel patterns) is the right one
                              inject_missing_state=True)
    chatter = io.StringIO()  # its prints and tqdm bars; kept for the log
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    finally:
        log.debug("ds_to_universal %s:\n%s", src, chatter.getvalue())
    # it also writes dst/../latest_universal; that is inside our temp dir, harmless


def _model_states_file(src: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (src / name).is_file():
            return src / name
    found = sorted(src.glob("*model_states.pt"))
    if not found:
        raise HarnessError(f"{src}: no *model_states.pt")
    return found[0]


def _unalias_steps(optimizer) -> None:
    """ZeRO 3's universal loader gives every group the SAME step tensor; torch's Adam increments
    it in place once per group, so with 2 groups Adam's step advanced by 2 per step."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _restore_stage3_param_groups(engine, tag_dir: Path) -> None:
    """Stage 3's universal loader copies group 0's hyperparameters into every group."""
    saved = torch.load(tag_dir / "zero" / "optimizer_state.pt", map_location="cpu",
                       weights_only=False)["param_groups"]
    groups = engine.optimizer.optimizer.param_groups
    if len(saved) != len(groups):
        raise HarnessError(f"{tag_dir}: {len(saved)} optimizer parameter groups saved, the "
                           f"engine has {len(groups)}: cannot restore their hyperparameters")
    for group, saved_group in zip(groups, saved):
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value




def _check_intact(step_dir: Path) -> None:
    """Ahead of time, the checkpoint's checksums (at resume, Checkpointer.find_resume checks
    them before anything is converted): a damaged one is not converted."""
    from harness.checkpoint.sums import _Group, _verify  # it imports this module

    problem, _ = _verify(Path(step_dir), _Group())
    if problem is not None:
        raise HarnessError(f"{step_dir} is corrupt or incomplete ({problem}): convert an "
                           f"intact checkpoint instead")


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.checkpoint.reshard STEP_DIR...`: convert ahead of time (say, before a job
    on another number of GPUs starts), so that no rank waits for it at resume."""
    parser = argparse.ArgumentParser(prog="python -m harness.checkpoint.reshard",
                                     description=main.__doc__)
    parser.add_argument("step_dirs", nargs="+", type=Path)
    parser.add_argument("--tag", default="ds")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes for ds_to_universal's extract and merge passes")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # conversion is file work; no device needed
    for step_dir in args.step_dirs:
        try:
            _check_intact(step_dir)
            out, seconds = convert(step_dir, args.tag, args.workers)
        except HarnessError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        print(f"{out}: {'reused' if not seconds else f'converted in {seconds:.1f} s'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
