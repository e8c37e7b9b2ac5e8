"""`harness train`: config -> engine -> data -> callbacks -> fit, in a run directory.

The run directory holds config.yaml, ds_config.json, metrics.jsonl and checkpoints/. A
second `harness train` with the same run directory resumes from its newest complete
checkpoint (checkpoint.resume=auto), which is what a requeued Slurm job does. Before any
engine is built, harness/train/run_dir.py checks the paths and claims the run directory.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from harness.callbacks.evaluator import Evaluator, eval_set_size
from harness.callbacks.loggers import Console, MetricsFile
from harness.callbacks.memory import PeakMemory
from harness.callbacks.spike_monitor import SpikeMonitor
from harness.callbacks.throughput import Throughput
from harness.callbacks.wandb_logger import WandbLogger
from harness.checkpoint.checkpointer import Checkpointer, load, read_meta
from harness.common.errors import HarnessError
from harness.config import Config
from harness.data.mix_prepare import MixShards, check_mix_dir, check_mix_prepared, mix_prepared
from harness.data.out_dir import check_prepared_from
from harness.data.prepare import prepare_data
from harness.data.sampler import GlobalSampler
from harness.data.shards import MANIFEST, TokenShards
from harness.data.sources import TrainData
from harness.data.tokenizer import piece_bytes
from harness.parallel import distributed, peers
from harness.parallel.collectives import Collectives
from harness.parallel.tp_layout import check_tp_hosts
from harness.train.engine import Built, build, resolve_device
from harness.train.mix_run import (SourceTokens, mix_evaluators, mix_meta, mix_phases,
                                   mix_train_data, prepare_mix_ready)
from harness.train.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE, StopSignals
from harness.train.report import write_report
from harness.train.run_dir import (RunDirLease, confirm_run_dir, prepare_run, release_run_dir,
                                   write_run_files)
from harness.train.trainer import Trainer

log = logging.getLogger("harness")
MONITOR_STOP_EXIT_CODE = 3  # the spike monitor ended the run: a person should look


def announce(rank: int, line: str) -> None:
    """One start-up phase on rank 0's console, as the Console writes its lines: each phase
    that can take more than a moment says what it starts, then what it took."""
    if rank == 0:
        print(line, flush=True)


def build_announced(cfg: Config, dist: distributed.DistEnv) -> Built:
    """The engine, announced: the first line `harness train` prints (after the imports)."""
    start = time.perf_counter()
    announce(dist.rank, f"engine: building the {cfg.model.arch} model and the DeepSpeed engine "
                        f"(ZeRO {cfg.zero.stage}, {cfg.train.precision}, {dist.world_size} "
                        f"rank{'s' * (dist.world_size != 1)} on {resolve_device(cfg)})"
                        f"{_summed_in(cfg)}")
    built = build(cfg, dist)
    compiled = (": train.compile compiles the model during the first step"
                if cfg.train.compile else "")
    announce(dist.rank, f"engine: {built.n_params / 1e6:.2f}M parameters, ready in "
                        f"{time.perf_counter() - start:.1f} s{compiled}")
    return built


def _summed_in(cfg: Config) -> str:
    """Under bf16/fp16, where gradients are summed: train.grad_accum_dtype null resolves to the
    precision's own at ZeRO 0 (harness/config/train.py), said once, here."""
    t = cfg.train
    if t.precision == "fp32":
        return ""
    line = f"; gradients summed in {t.grad_accum_dtype}"
    if cfg.zero.stage == 0 and t.grad_accum_dtype != "fp32":
        line += " (zero.stage=1 sums them in fp32, with the same gradient memory)"
    return line


def prepare_announced(cfg: Config) -> None:
    """A single process's first run prepares the token shards itself (seconds for the
    built-in corpus, minutes to hours for a large one): said before and after."""
    start = time.perf_counter()
    if cfg.data.mix:
        announce(0, f"data: preparing {cfg.data.out_dir} for data.mix "
                    f"({', '.join(e.name for e in cfg.data.mix)}): one tokenizer, then each "
                    f"source's shards (once; `harness prepare-data` does it ahead)")
        announce(0, prepare_mix_ready(cfg.data, start))
        return
    what = ", ".join(cfg.data.sources) or "the built-in corpus (the Python standard library)"
    announce(0, f"data: preparing {cfg.data.out_dir} from {what}: a tokenizer, then token "
                f"shards (once; `harness prepare-data` does it ahead)")
    out_dir = prepare_data(cfg.data, progress=sys.stderr.isatty())
    splits = TokenShards.open(out_dir).manifest["splits"]
    announce(0, f"data: {out_dir} ready in {time.perf_counter() - start:.1f} s: "
                f"{splits['train']['tokens']:,} train + {splits['val']['tokens']:,} val tokens")


def open_shards(cfg: Config, built: Built) -> TokenShards | MixShards:
    """The token shards of data.out_dir, validated against the model.

    Preparing them is one process's work of minutes to hours. Done here by rank 0 while the
    other ranks wait in a collective, it would outlast the process group's timeout
    (DeepSpeed's default: 10 minutes, DEEPSPEED_TIMEOUT): with more than one rank the shards
    must exist already (`harness submit`'s batch script prepares them before its job step).
    A single process has nobody waiting for it and prepares them on first use. A mix
    (data.mix): every source's directory, each checked as one corpus's (mix_prepare.py).
    """
    out_dir = Path(cfg.data.out_dir)
    mix = bool(cfg.data.mix)
    # rank 0's view for everyone, so that all ranks refuse, or go on, together: are there
    # shards, and are they the ones the config describes (sources, tokenizer, settings)?
    view: Any = None
    if built.dist.rank == 0:
        try:
            if mix:
                check_mix_dir(out_dir)  # not one corpus's shards
            view = mix_prepared(cfg.data) if mix else (out_dir / MANIFEST).is_file()
            if view:
                check_mix_prepared(cfg.data) if mix else check_prepared_from(cfg.data, out_dir)
        except HarnessError as err:
            view = str(err)
    view = built.comm.broadcast_object(view)
    if isinstance(view, str):
        raise HarnessError(view)
    present = view
    if not present:
        if built.dist.world_size > 1:
            raise HarnessError(
                f"data.out_dir={out_dir} holds no token shards, and {built.dist.world_size} "
                f"ranks cannot wait for one to prepare them: run `harness prepare-data` with "
                f"the same --config and overrides first (or train on one process once)")
        prepare_announced(cfg)
    shards = MixShards(cfg.data) if mix else TokenShards.open(out_dir)
    if shards.vocab_size > cfg.model.vocab_size:
        raise HarnessError(f"{out_dir}/manifest.json: the tokenizer has {shards.vocab_size} "
                           f"pieces but model.vocab_size={cfg.model.vocab_size}: set "
                           f"model.vocab_size >= {shards.vocab_size}")
    return shards


def build_data(cfg: Config, built: Built, shards: TokenShards | MixShards,
               phases: list | None = None) -> TrainData:
    """The training stream; a mix's `phases`: [(start position, shares)] (mix_phases)."""
    seqs = shards.sequences("train", cfg.model.block_size)
    if len(seqs) < built.plan.batch.global_batch:
        raise HarnessError(f"{cfg.data.out_dir}: {len(seqs)} training sequences of "
                           f"{cfg.model.block_size} tokens, fewer than one global batch "
                           f"({built.plan.batch.global_batch}): add data or shrink the batch")
    # data-parallel ranks split the data; the ranks of a tensor-parallel group read the same
    if isinstance(shards, MixShards):
        return mix_train_data(cfg, built, shards, seqs, phases)
    sampler = GlobalSampler(len(seqs), cfg.train.seed, built.plan.batch.micro_batch,
                            built.plan.dp_rank(built.dist.rank), built.plan.batch.dp_size)
    return TrainData(seqs, sampler, built.engine.device)


def _check_fingerprint(meta: dict, shards: TokenShards, path: Path) -> None:
    saved = meta.get("data_fingerprint")
    if saved is not None and saved != shards.fingerprint:
        raise HarnessError(f"{shards.directory}: data fingerprint {shards.fingerprint[:12]} "
                           f"differs from the one checkpoint {path} was trained on "
                           f"({saved[:12]}): point data.out_dir at the original shards or "
                           f"start a new train.run_dir")


def make_trainer(cfg: Config) -> tuple[Trainer, Checkpointer]:
    try:
        return _make_trainer(cfg)
    except BaseException:  # a start that failed leaves the run directory to the next writer
        release_run_dir(cfg)
        raise


def _make_trainer(cfg: Config) -> tuple[Trainer, Checkpointer]:
    run_dir = Path(cfg.train.run_dir)
    dist = distributed.detect()
    prepare_run(cfg)  # rank 0 holds the run directory's lease from here on
                      # (harness/common/lease.py)
    built = build_announced(cfg, dist)
    confirm_run_dir(cfg, built)  # every rank: the lease is this job's, before any write
    # the launcher's real rank numbering, which the config cannot see: refused before data
    check_tp_hosts(built.hosts, built.plan)
    shards = open_shards(cfg, built)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir, {"data_fingerprint": shards.fingerprint})
    checkpointer.clean_partial(built.dist.rank)
    resume = checkpointer.find_resume(built.comm)
    phases = None
    if isinstance(shards, MixShards):
        phases = mix_phases(cfg, shards, read_meta(resume) if resume else None, resume)
        checkpointer.extra_meta["data_mix"] = mix_meta(shards, phases)
    metrics_file = MetricsFile(run_dir)
    callbacks = [checkpointer, Throughput(), PeakMemory(), metrics_file,
                 Console(cfg.train.log_every), WandbLogger(cfg.wandb), RunDirLease(cfg)]
    if cfg.monitor.enabled:
        callbacks.append(SpikeMonitor(cfg.monitor, checkpointer))
    if isinstance(shards, MixShards):
        callbacks.append(SourceTokens())
    if cfg.data.eval_every and isinstance(shards, MixShards):
        callbacks += mix_evaluators(cfg, built, shards)
    elif cfg.data.eval_every:
        callbacks.append(Evaluator(shards.sequences("val", cfg.model.block_size),
                                   cfg.data.eval_every, eval_set_size(cfg),
                                   built.plan.batch.micro_batch,
                                   built.plan.dp_rank(built.dist.rank),
                                   built.plan.batch.dp_size, piece_bytes(shards.tokenizer_path)))
    trainer = Trainer(cfg, built, build_data(cfg, built, shards, phases), callbacks)
    if resume is not None:
        meta = load(trainer, resume)
        _check_fingerprint(meta, shards, resume)
        checkpointer.last_saved_step = trainer.step
        log.info("resumed from %s at step %d", resume, trainer.step)
    if built.dist.rank == 0:
        write_run_files(run_dir, cfg, built)
        metrics_file.truncate_after(trainer.step)  # steps past the checkpoint are redone
    return trainer, checkpointer


def train(cfg: Config) -> int:
    """Returns the process exit code: 0 when done, REQUEUE_EXIT_CODE when stopped early by
    USR1/TERM, INTERRUPT_EXIT_CODE after a Ctrl-C (checkpoint saved either way)."""
    # installed before the engine is built (tens of seconds on a busy node): a USR1 meanwhile
    # stops the run after its first step instead of killing the task. Kept until the report is
    # written, so that a second Ctrl-C still aborts at once while the run winds down
    signals = StopSignals().install()
    try:
        trainer = _fit(cfg, signals)
    except Exception as err:
        lost = peers.explain(err)  # a rank went away: which, where, in one line
        if lost is None:
            raise
        raise lost from None
    finally:
        signals.uninstall()
    return 0 if trainer is None else _exit_code(cfg, trainer, signals)


def _fit(cfg: Config, signals: StopSignals) -> Optional[Trainer]:
    """Build, train, report; None when the run directory's run is complete already."""
    trainer, _ = make_trainer(cfg)
    if trainer.step >= cfg.train.max_steps:
        log.info("%s is complete at step %d: nothing to do (a new train.run_dir starts a "
                 "new run)", cfg.train.run_dir, trainer.step)
        return None
    trainer.stop_signals = signals
    trainer.fit()
    if trainer.is_main:
        try:
            log.info("report: %s", write_report(Path(cfg.train.run_dir)))
        except HarnessError as err:  # the run is done and saved: its exit code stands
            log.warning("no report.png: %s", err)
    return trainer


def _exit_code(cfg: Config, trainer: Trainer, signals: StopSignals) -> int:
    if trainer.stop_reason and trainer.stop_reason.startswith("monitor"):
        log.error("%s: stopped at step %d; see %s/metrics.jsonl for the events",
                  trainer.stop_reason, trainer.step, cfg.train.run_dir)
        return MONITOR_STOP_EXIT_CODE
    if trainer.step < cfg.train.max_steps and trainer.stop_reason and signals.interrupted:
        log.info("interrupted at step %d (Ctrl-C): checkpoint saved; the same command "
                 "resumes it. Exit code %d", trainer.step, INTERRUPT_EXIT_CODE)
        return INTERRUPT_EXIT_CODE
    if trainer.step < cfg.train.max_steps and trainer.stop_reason:
        log.info("stopped at step %d (%s): checkpoint saved; exit code %d: %s", trainer.step,
                 trainer.stop_reason, REQUEUE_EXIT_CODE, what_happens_next(signals))
        return REQUEUE_EXIT_CODE
    return 0


def what_happens_next(signals: StopSignals) -> str:
    """After a stop by signal: who resumes the run, as the batch script (slurm/) decides."""
    if not os.environ.get("SLURM_JOB_ID"):
        return "the same command resumes it"
    if signals.terminated:  # scancel, a time limit without --signal, scontrol requeue, ...
        return ("SIGTERM is Slurm ending the job, so the batch script does not requeue it; "
                "Slurm does where it ends a job to requeue it (scontrol requeue, a requeueing "
                "preemption, a node failure), else `harness submit` again resumes it")
    if signals.received:  # USR1: --signal=B:USR1@grace before the time limit, or a preemption
        return "the batch script requeues the job, which resumes from this checkpoint"
    return "a signal on another rank; the batch script decides about the requeue"


def train_process(cfg: Config) -> int:
    """A whole training process (what `harness train` runs): train, then leave together."""
    code = train(cfg)
    leave_together()
    return code


def leave_together() -> None:
    """The end of a training process, once its checkpoint is saved."""
    # srun --kill-on-bad-exit answers the first rank to exit 42 with TERM to the others:
    # ignored from here on (SIG_IGN, since interpreter shutdown resets Python handlers), it
    # cannot turn their own 42 into 143
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if torch.distributed.is_initialized():
        Collectives.for_process_group().barrier()  # rank 0 writes the report last
        # left to interpreter exit, gloo's threads can be destroyed unjoined ("terminate
        # called without an active exception", SIGABRT after a finished run)
        torch.distributed.destroy_process_group()
