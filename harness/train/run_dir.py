"""The run directory: checked and claimed before any engine is built (tens of seconds).

The paths are checked first (a file where a directory should be, nothing writable there).
Then the run directory is claimed: `harness train` writes only into a new or empty directory,
or into this run's own (a checkpoint of this model to resume, the same config, or a start that
never logged a step), which it continues. Anything else, say another run's metrics, a checkpoint
of another model or a folder of the user's files, is refused unless the user asks to replace it
(train.overwrite=true: the previous run's files are then moved to RUN_DIR/replaced-TIME/, never
deleted). A config.yaml that `harness train` did not write (CONFIG_HEADER tells them apart) is
never replaced.

One writer at a time: rank 0 takes the run directory's lease (harness/common/lease.py) before the
claim, so nothing is moved, cleaned or written while another `harness train` works there; the
job's other ranks check that the lease is their job's before they write anything.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

from harness.checkpoint.resume import checkpoint_root, resumed_run_dir
from harness.checkpoint.sums import complete_checkpoints
from harness.common import lease
from harness.common.callback import Callback
from harness.common.errors import HarnessError
from harness.config import Config, ModelConfig, to_dict, to_yaml
from harness.data.out_dir import check_out_dir, check_prepared_from, check_toy_corpus
from harness.data.shards import MANIFEST
from harness.train.ds_config import dumps

if TYPE_CHECKING:  # the engine module imports torch: `harness submit` needs none of it
    from harness.train.engine import Built

log = logging.getLogger("harness")
OVERWRITE_KEY = "train.overwrite=true"  # the explicit switch: the old run is moved aside
RUN_CONFIG = "config.yaml"
# the first line of every config.yaml `harness train` writes: what tells it from a user's file
CONFIG_HEADER = ("# harness train: the resolved config of this run, rewritten at every start "
                 "(an output: edit your own --config instead)\n")
# what `harness train` writes into a run directory, and what may be there before its first
# start: `harness submit`'s files, Slurm's output, tracebacks kept by the CLI, set-aside runs
RUN_OUTPUTS = (RUN_CONFIG, "ds_config.json", "metrics.jsonl", "metrics.tmp", "report.png",
               "checkpoints", "wandb")
BEFORE_START = ("job_config.yaml", "train.sbatch", "traceback-*.txt", "replaced-*",
                ".harness-probe-*", ".nfs*", lease.RUN_LEASE + "*")
REPLACED = "replaced-"


def write_run_files(run_dir: Path, cfg: Config, built: Built) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_CONFIG).write_text(CONFIG_HEADER + to_yaml(cfg))
    (run_dir / "ds_config.json").write_text(dumps(built.ds_config))


# ---- paths: checked before any engine is built --------------------------------------------
def _nearest_existing(path: Path) -> Path:
    above = path
    while not above.exists() and above != above.parent:
        above = above.parent
    return above


def check_dir(key: str, value: Optional[str], example: str) -> None:
    """`key` names a directory that is there or can be made, and can be written in: checked
    by writing a probe file (permissions alone do not tell: read-only mounts, /proc, root)."""
    if value is None:
        return
    if not str(value).strip():
        raise HarnessError(f"{key}={value!r} is blank: set it to a directory, e.g. {example}")
    try:
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise HarnessError(f"{key}={value} is a file, not a directory: choose another {key}, "
                               f"e.g. {example}")
        above = _nearest_existing(path)
        if not above.is_dir():
            raise HarnessError(f"{key}={value}: {above} is a file, not a directory: choose "
                               f"another {key}, e.g. {example}")
    except ValueError as e:  # an embedded NUL byte
        raise HarnessError(f"{key}={value!r} is not a usable path ({e}): choose another "
                           f"{key}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".harness-probe-", dir=above)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise HarnessError(f"{key}={value}: cannot write in {above} ({e.strerror or e}): "
                           f"choose a writable {key}, e.g. {example}") from None


def check_paths(cfg: Config) -> None:
    """Every directory the run will write, before the engine is built."""
    check_dir("train.run_dir", cfg.train.run_dir, "runs/mine")
    check_dir("checkpoint.dir", cfg.checkpoint.dir, "RUN_DIR/checkpoints (the default: unset)")
    if cfg.wandb.resolved_mode() != "disabled":
        check_dir("wandb.dir", cfg.wandb.dir, "the run directory (the default: unset)")
    out_dir = Path(cfg.data.out_dir)
    check_out_dir(out_dir, contents=True)
    check_toy_corpus(cfg.data, out_dir)  # the large presets' data, before any engine
    if (out_dir / MANIFEST).is_file():
        # the manifest and the settings only (rank 0 compares the sources in open_shards)
        check_prepared_from(cfg.data, out_dir, read_sources=False)
    else:  # shards to prepare on first use: somewhere to write them
        check_dir("data.out_dir", cfg.data.out_dir, "data/mine")


# ---- the run directory: one writer at a time (harness/common/lease.py) -------------------------
ANOTHER_RUN = "set train.run_dir to another directory to start a separate run"
REFUSAL_GRACE_S = 5.0  # rank 0 of a refused Slurm step waits this long for the others


def _lease_args(cfg: Config) -> tuple[Path, str, Path, str]:
    run_dir = Path(cfg.train.run_dir)
    return run_dir / lease.RUN_LEASE, "train.run_dir", run_dir, ANOTHER_RUN


def hold_run_dir(cfg: Config, rank: int) -> None:
    """Rank 0 takes the lease (held until the run ends, or the process does). The other ranks
    of a Slurm job refuse now, as rank 0 will, when another job's writer holds it (rather than
    wait for rank 0 in the process group); confirm_run_dir checks them once the group exists."""
    if rank == 0:
        try:
            lease.take(*_lease_args(cfg))
        except OSError as e:  # check_paths probed it writable: a race, or a full disk
            raise HarnessError(f"train.run_dir={cfg.train.run_dir}: cannot write its lease "
                               f"{lease.RUN_LEASE} ({e.strerror or e}): choose a writable "
                               f"train.run_dir") from None
        except HarnessError:
            _let_the_other_ranks_refuse()
            raise
    elif lease.job_id():
        lease.check(*_lease_args(cfg))


def _let_the_other_ranks_refuse() -> None:
    """srun --kill-on-bad-exit answers rank 0's exit with TERM to the other tasks; one still
    importing dies of it (143, which srun reports over rank 0's 2). They refuse too (above),
    and once in train() TERM only marks a stop: give them the time to get there."""
    try:
        tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    except ValueError:
        tasks = 1
    if tasks > 1 and lease.job_id():
        time.sleep(REFUSAL_GRACE_S)


def check_run_dir_free(cfg: Config) -> None:
    """`harness submit`: refuse a run directory a live writer holds; take nothing."""
    lease.check(*_lease_args(cfg))


def release_run_dir(cfg: Config) -> None:
    lease.release(_lease_args(cfg)[0])


def confirm_run_dir(cfg: Config, built: Built) -> None:
    """Collective, every rank at every world size, before any rank writes: the lease record
    each rank sees holds rank 0's token (a shared filesystem, and no other writer)."""
    import torch  # here: `harness submit` imports this module without torch

    record, rank, world = _lease_args(cfg)[0], built.dist.rank, built.dist.world_size
    problem = lease.same_holder(built.comm, rank, record)
    flags = torch.zeros(world, dtype=torch.int64, device=built.comm.device)
    flags[rank] = int(problem is not None)
    found = built.comm.all_reduce(flags, "max").cpu().tolist()
    fix = "the run directory must be one directory every node shares, with one job writing it"
    if problem is not None:
        raise HarnessError(f"train.run_dir={cfg.train.run_dir}: {problem}: {fix}")
    ranks = [r for r, bad in enumerate(found) if bad]
    if ranks:
        raise HarnessError(f"train.run_dir={cfg.train.run_dir}: rank(s) {ranks} do not find "
                           f"rank 0's lease in {record}: {fix}")


class RunDirLease(Callback):
    """Releases rank 0's lease once the run's last checkpoint and metrics are written (in
    process too: a test or notebook goes on to other runs); atexit covers every other end."""

    order = 1000  # after the checkpointer and the loggers

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def on_train_end(self, trainer: Any) -> None:
        release_run_dir(self.cfg)


# ---- the run directory: whose is it? --------------------------------------------------------
def _before_start_names(cfg: Config) -> list[str]:
    """Name patterns of what may sit in a run directory before its first start."""
    names = list(BEFORE_START)
    first = Path(cfg.slurm.output).parts[0] if cfg.slurm.output else ""
    if first and not Path(cfg.slurm.output).is_absolute():  # Slurm's output, relative to it
        names.append(re.sub(r"%%|%\d*[A-Za-z]", "*", first))
    return names


def _saved_config(run_dir: Path) -> tuple[str, Optional[dict[str, Any]]]:
    """("absent" | "ours" | "foreign" | "broken", the parsed config.yaml if ours)."""
    path = run_dir / RUN_CONFIG
    if not path.exists():
        return "absent", None
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "broken", None
    if not isinstance(data, dict):
        return "foreign", None
    if text.startswith(CONFIG_HEADER.split(":")[0]):
        return "ours", data
    # written before CONFIG_HEADER existed: every section, and the model with every key
    model = data.get("model")
    full = {"model", "optim", "train", "data", "checkpoint", "monitor", "wandb"} <= set(data)
    if full and isinstance(model, dict) and set(vars(ModelConfig())) <= set(model):
        return "ours", data
    return "foreign", None


def _differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """`key=saved, not now` for every key whose value differs, the model's first."""
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = sorted(set(saved) | set(now), key=lambda k: (k != "model", str(k)))
        return [d for k in keys for d in _differences(saved.get(k), now.get(k), f"{prefix}{k}.")]
    return [] if saved == now else [f"{prefix[:-1]}={saved}, not {now}"]


def _has_metrics(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _not_ours(cfg: Config, state: str, checkpoints: list[Path]) -> HarnessError:
    """A config.yaml that is not valid YAML, or not the harness's: never replaced. Beside
    intact checkpoints it is most likely this run's own, damaged: the fix keeps them."""
    what = "is not valid YAML" if state == "broken" else "was not written by `harness train`"
    path = Path(cfg.train.run_dir) / RUN_CONFIG
    if checkpoints:
        return HarnessError(
            f"train.run_dir={cfg.train.run_dir} holds a {RUN_CONFIG} that {what}, beside "
            f"{len(checkpoints)} complete checkpoint(s) (newest {checkpoints[-1].name}): if it "
            f"is this run's own, damaged, move {path} away (the run writes it again) or restore "
            f"it, and the same command resumes the checkpoints; else choose another "
            f"train.run_dir")
    return HarnessError(
        f"train.run_dir={cfg.train.run_dir} holds a {RUN_CONFIG} that {what} (your own "
        f"config?): the run would replace it with its resolved config, and never replaces "
        f"a file it did not write: choose a train.run_dir of its own, e.g. "
        f"train.run_dir={os.path.join(cfg.train.run_dir, 'run')}")


def _other_model(saved: Optional[dict[str, Any]], cfg: Config) -> Optional[str]:
    """`model.KEY=saved, not now` for the first model key the saved run differs in."""
    model = (saved or {}).get("model")
    if not isinstance(model, dict):
        return None
    for key, value in to_dict(cfg)["model"].items():
        if key in model and model[key] != value:
            return f"model.{key}={model[key]}, not {value}"
    return None


def claim_run_dir(cfg: Config, rank: Optional[int]) -> bool:
    """Refuse a run directory that is not this run's (see the module docstring); on rank 0,
    move the previous run aside when the user asked to overwrite it. rank None: only check
    (`harness submit`: the job moves the files when it starts). True: this start begins anew
    over a run that is (or, off rank 0, is being) moved aside.

    train.overwrite never moves a run this start continues (its checkpoint, this model): a
    rerun after Ctrl-C, or a requeued Slurm job, with the same command must resume. It moves
    what would otherwise be refused: another config with no checkpoint to resume, a
    checkpoint of another model shape, a run under checkpoint.resume=never."""
    run_dir = Path(cfg.train.run_dir)
    if not run_dir.is_dir():
        return False  # new
    state, saved = _saved_config(run_dir)
    checkpoints = complete_checkpoints(checkpoint_root(cfg))
    if state in ("foreign", "broken"):
        raise _not_ours(cfg, state, checkpoints)
    names = sorted(p.name for p in run_dir.iterdir())
    outputs = [n for n in names if n in RUN_OUTPUTS]
    allowed = _before_start_names(cfg)
    others = [n for n in names if n not in RUN_OUTPUTS and
              not any(fnmatch.fnmatch(n, pat) for pat in allowed)]
    is_run = state == "ours" or bool(checkpoints) or "metrics.jsonl" in outputs
    if not is_run:
        # a report.png or ds_config.json with no run beside it is not known to be ours
        others += [n for n in outputs if n not in ("checkpoints", "wandb")]
        if not others:
            return False  # empty, or only what `harness submit` and Slurm put there first
        if cfg.train.overwrite:
            _move_aside(cfg, run_dir, outputs, rank)
            return True  # written beside the user's files, none of which is touched
        shown = ", ".join(others[:4]) + (f", ... ({len(others)} in all)" if len(others) > 4 else "")
        raise HarnessError(
            f"train.run_dir={cfg.train.run_dir} is not empty and holds no run: {shown}: choose "
            f"a new or empty train.run_dir, or set {OVERWRITE_KEY} to write the run beside "
            f"these files")
    resume = cfg.checkpoint.resume
    root = checkpoint_root(cfg).resolve()
    resumable = (resume == "auto" and bool(checkpoints)) or (
        resume not in ("auto", "never") and root in Path(resume).resolve().parents)
    same = saved is not None and saved == yaml.safe_load(to_yaml(cfg))
    trained = bool(checkpoints) or _has_metrics(run_dir)
    # resume=auto onto a checkpoint of another model: refused here, where overwrite can act
    # (a named checkpoint of another shape: prepare_run refuses it, naming it)
    other_model = _other_model(saved, cfg) if resume == "auto" and checkpoints else None
    if resumable and other_model is None:
        if cfg.train.overwrite and rank in (0, None):
            log.warning("train.run_dir=%s holds a run this config continues (checkpoint %s): "
                        "it resumes and nothing is moved (%s moves only a run this start "
                        "cannot continue); to start anew instead, also set "
                        "checkpoint.resume=never", cfg.train.run_dir,
                        checkpoints[-1].name if checkpoints else resume, OVERWRITE_KEY)
        return False
    if other_model is None and ((same and resume != "never") or not trained):
        return False  # this run's, or a start that never logged a step: nothing to lose
    if other_model is not None:
        why = f"its newest checkpoint, {checkpoints[-1].name}, is of {other_model}"
    elif resume == "never":
        why = ("checkpoint.resume=never, and it holds a run already (checkpoint.resume=auto "
               "continues it)")
    elif saved is None:
        why = "metrics.jsonl and no config.yaml, and no checkpoint to resume"
    else:
        diffs = _differences(saved, yaml.safe_load(to_yaml(cfg)))
        more = f" and {len(diffs) - 2} more" if len(diffs) > 2 else ""
        why = f"no checkpoint to resume, and its config differs: {'; '.join(diffs[:2])}{more}"
    if cfg.train.overwrite:
        _move_aside(cfg, run_dir, outputs, rank)
        return True
    raise HarnessError(
        f"train.run_dir={cfg.train.run_dir} holds another run ({why}): choose another "
        f"train.run_dir, or set {OVERWRITE_KEY} to move its files to "
        f"{os.path.join(cfg.train.run_dir, REPLACED + 'TIME')}/ and start anew")


def _move_aside(cfg: Config, run_dir: Path, outputs: list[str], rank: Optional[int]) -> None:
    """train.overwrite: rank 0 moves the previous run's files (and checkpoints) to replaced-TIME/
    (a rename: nothing copied, nothing deleted); the user's own files stay where they are."""
    root = checkpoint_root(cfg)
    steps = [p for p in root.glob("step*")] + [root / "latest"] if root.is_dir() else []
    outside = root.parent != run_dir or root.name != "checkpoints"
    if rank != 0 or not (outputs or (outside and any(p.exists() for p in steps))):
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir / f"{REPLACED}{stamp}", 1
    while dest.exists():
        dest, n = run_dir / f"{REPLACED}{stamp}.{n}", n + 1
    dest.mkdir()
    for name in outputs:
        os.replace(run_dir / name, dest / name)
    if outside:  # checkpoint.dir elsewhere: its step directories go beside it, same stamp
        ckpt_dest = root / dest.name
        ckpt_dest.mkdir(exist_ok=True)
        for p in steps:
            if p.exists():
                os.replace(p, ckpt_dest / p.name)
    log.warning("train.run_dir=%s: %s, the previous run's files are moved to %s",
                cfg.train.run_dir, OVERWRITE_KEY, dest)


def _check_same_model(run_dir: Path, cfg: Config, step_dir: Path) -> None:
    """checkpoint.resume names `step_dir`, a checkpoint of the run in `run_dir`: one of another
    model shape would fail deep inside DeepSpeed's loader (resume=auto: claim_run_dir)."""
    other = _other_model(_saved_config(run_dir)[1], cfg)
    if other is not None:
        key, was = other.split(", not ")[0].split("=", 1)
        raise HarnessError(f"checkpoint.resume={step_dir} is a checkpoint of a run with "
                           f"{other}: resume a checkpoint of this model, or set {key}={was}")


def prepare_run(cfg: Config) -> None:
    """Everything about the run's files that can be known without an engine: the paths, the
    run directory's owner, the model shape of the checkpoint it resumes. Cheap (stat, a
    probe file, a YAML read), so a refusal comes in a second, not after the engine build."""
    check_paths(cfg)
    # the launcher's rank (torchrun: RANK, srun: SLURM_PROCID), read as harness.parallel.distributed
    # does, without its scontrol call: only rank 0 moves files
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    rank_number = int(rank) if rank.strip().isdigit() else 0
    hold_run_dir(cfg, rank_number)  # before anything in it is moved, cleaned or written
    if claim_run_dir(cfg, rank_number):
        return  # anew: what was there is moved aside (rank 0 moves it; others may still see it)
    resumed = resumed_run_dir(cfg)
    if resumed is not None and cfg.checkpoint.resume not in ("auto", "never"):
        _check_same_model(resumed, cfg, Path(cfg.checkpoint.resume))


