"""`harness smoke [--dir DIR] [--device auto|cpu|cuda]`: one PASS/FAIL line per check, exit 0
when every check passes, 1 when one fails, 2 for bad input (an unusable --dir or --device).

DIR (default build/smoke) is the smoke's own: data/ (a 1 MB slice of the built-in corpus,
the tiny preset's tokenizer settings; kept and reused by the next smoke), run/ (the
uninterrupted run: metrics.jsonl, report.png, checkpoints), resumed/ (the same run resumed
from run/'s checkpoint before the last), hf/ (the export) and smoke.log (everything the
phases printed, tracebacks included). It never touches the user's data/ or runs/: a DIR that
holds anything but an earlier smoke's files is refused.

Everything runs in this process through the harness's own functions (make_trainer, export,
checkpoint io), as `harness train`, `harness export` and `harness eval` do, so the test suite
runs it cheaply and a failure's traceback is the harness's own.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from harness.checkpoint import io as checkpoint_io
from harness.checkpoint.sums import complete_checkpoints
from harness.common.errors import HarnessError
from harness.common.jsonl import as_number, read_lines
from harness.config import Config, load_config
from harness.smoke import checks, reference
from harness.smoke.checks import Check, verdict

MARKER = ".harness-smoke"  # says the directory is a smoke's, so a later smoke may clear it
OURS = {MARKER, "data", "run", "resumed", "hf", "smoke.log"}
TRACEBACKS = "traceback-*.txt"  # the CLI writes an unexpected error's traceback into --dir
MAX_BYTES = 1_000_000  # of the built-in corpus: 480k training tokens, 0.3 s to prepare


@dataclass(frozen=True)
class Sizes:
    steps: int = 30  # a few dozen: the loss falls by a fifth on the tiny preset
    every: int = 10  # checkpoints and evaluations; the resume starts at steps - every


def device_of(requested: str) -> str:
    if requested not in ("auto", "cpu", "cuda"):
        raise HarnessError(f"--device {requested}: use auto, cpu or cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise HarnessError("--device cuda, but torch sees no CUDA GPU here: use --device cpu "
                           "(or auto), or install a CUDA build of torch")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def smoke_config(root: Path, device: str, sizes: Sizes, run: str = "run",
                 extra: Sequence[str] = ()) -> Config:
    """The tiny preset as the smoke trains it: bf16 on a GPU, fp32 on a CPU (the issue's
    choice; bf16 also runs on CPUs with avx512_bf16, slowly on others)."""
    precision = "bf16" if device == "cuda" else "fp32"
    return load_config("tiny", [
        f"train.device={device}", f"train.precision={precision}", "zero.stage=1",
        "activation_checkpointing.policy=every_layer", "monitor.enabled=true",
        "model.dropout=0.0", f"train.max_steps={sizes.steps}", f"train.log_every={sizes.every}",
        f"checkpoint.every={sizes.every}", "checkpoint.keep_last=3",
        f"data.eval_every={sizes.every}", f"data.out_dir={root / 'data'}",
        f"data.max_bytes={MAX_BYTES}", "data.sources=[]", f"train.run_dir={root / run}",
        "wandb.mode=disabled", *extra])


def claim_dir(root: Path) -> None:
    """DIR new, empty, or an earlier smoke's (cleared but for its prepared data)."""
    if root.exists() and not root.is_dir():
        raise HarnessError(f"--dir {root} is a file: give a new or empty directory")
    if root.is_dir():
        names = {p.name for p in root.iterdir() if not p.match(TRACEBACKS)}
        if names and MARKER not in names:
            raise HarnessError(f"--dir {root} holds files that are not an earlier smoke's "
                               f"({', '.join(sorted(names)[:3])}): give a new or empty "
                               f"directory (the smoke clears what it finds in its own)")
        if names - OURS:
            raise HarnessError(f"--dir {root}: {', '.join(sorted(names - OURS)[:3])} is not "
                               f"the smoke's: move it away or give another directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for path in [*(root / n for n in OURS - {MARKER, "data"}), *root.glob(TRACEBACKS)]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        (root / MARKER).write_text("harness smoke's directory: cleared by the next smoke\n")
    except OSError as err:
        raise HarnessError(f"--dir {root}: cannot write there ({err.strerror or err}): give "
                           f"a writable directory") from None


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]


@contextlib.contextmanager
def quiet(log_file: Path) -> Iterator[None]:
    """What a phase prints goes to smoke.log, so that the smoke's own output is its check
    lines: Python's stdout/stderr, the logging handlers that write to them (the trainer's
    console, DeepSpeed's logger), and file descriptors 1 and 2 (the compilers DeepSpeed's op
    checks start, C++ warnings)."""
    real = sys.stdout, sys.stderr
    for stream in real:
        stream.flush()
    with open(log_file, "a") as fh:
        moved = [(h, h.setStream(fh)) for h in _stream_handlers() if h.stream in real]
        saved = [os.dup(1), os.dup(2)]
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                yield
        finally:
            fh.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            for handler, stream in moved:
                handler.setStream(stream)
            # a handler made during the phase (a logger's first use) took the log file
            for handler in _stream_handlers():
                if handler.stream is fh:
                    handler.setStream(real[1])


class Phase:
    """Runs phases in `quiet`; an exception becomes a FAIL line naming it (traceback in the
    log) instead of ending the smoke."""

    def __init__(self, log_file: Path):
        self.log_file = log_file

    def __call__(self, name: str, fn: Callable[[], Any]) -> tuple[Any, Optional[Check]]:
        with quiet(self.log_file):
            try:
                return fn(), None
            except Exception as err:  # a failed phase is a FAIL line; the smoke goes on
                traceback.print_exc()
                text = " ".join(f"{type(err).__name__}: {err}".split())[:300]
                return None, verdict(name, False, f"{text} (traceback in {self.log_file})")


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The step records of a run's metrics.jsonl (events left out), NaN/inf as floats."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [{k: as_number(v) for k, v in r.items()} for r in read_lines(path)
            if "event" not in r and "step" in r]


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [r for r in read_lines(path) if "event" in r] if path.is_file() else []


def prepare(cfg: Config) -> Check:
    from harness.data.prepare import prepare_data
    from harness.data.shards import TokenShards

    t0 = time.perf_counter()
    out = prepare_data(cfg.data, progress=False)
    m = TokenShards.open(out).manifest
    return verdict("data", True, f"{out}: {m['splits']['train']['tokens']:,} train + "
                                 f"{m['splits']['val']['tokens']:,} val tokens of the built-in "
                                 f"corpus in {time.perf_counter() - t0:.1f} s")


def train(cfg: Config) -> tuple[int, Optional[str], float]:
    """make_trainer + fit, as `harness train`, and report.png: (last step, stop reason, s)."""
    from harness.train.report import write_report
    from harness.train.run import make_trainer
    from harness.train.run_dir import release_run_dir

    t0 = time.perf_counter()
    try:
        trainer, _ = make_trainer(cfg)
        trainer.fit()
        step, stop = trainer.step, trainer.stop_reason
        del trainer
    finally:
        release_run_dir(cfg)  # also after a failed fit: the resumed run comes next
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_report(Path(cfg.train.run_dir))
    return step, stop, time.perf_counter() - t0


def train_check(cfg: Config, result, device: str) -> Check:
    step, stop, seconds = result
    c, s = cfg.train, cfg.train.max_steps
    ok = step == s and stop is None
    return verdict("train", ok, f"{step}/{s} steps in {seconds:.1f} s on {device}, "
                                f"{c.precision}, ZeRO {cfg.zero.stage}, every-layer "
                                f"checkpointing, monitor on, eval every {cfg.data.eval_every}"
                                f"{'' if stop is None else f'; stopped early: {stop}'}")


def monitor_check(run_dir: Path) -> Check:
    seen = events(run_dir)
    alarms = [e for e in seen if e.get("level") == "alarm"]
    first = alarms[0] if alarms else {}
    return verdict("monitor", not alarms,
                   f"{len(seen)} events, {len(alarms)} alarms" +
                   (f": first {first.get('event')} on {first.get('signal')} at step "
                    f"{first.get('step')}" if alarms else ""))


def step_dir(cfg: Config, step: int) -> Optional[Path]:
    found = [p for p in complete_checkpoints(Path(cfg.train.run_dir) / "checkpoints")
             if p.name == f"step{step:08d}"]
    return found[0] if found else None


def resume_check(root: Path, device: str, sizes: Sizes, extra: Sequence[str],
                 phase: Phase) -> Check:
    whole_cfg = smoke_config(root, device, sizes, extra=extra)
    start = sizes.steps - sizes.every
    start_dir, end_dir = step_dir(whole_cfg, start), step_dir(whole_cfg, sizes.steps)
    if start_dir is None or end_dir is None:
        return verdict("resume", False, f"{whole_cfg.train.run_dir} lacks the checkpoints of "
                                        f"steps {start} and {sizes.steps} to compare")
    cfg = smoke_config(root, device, sizes, "resumed",
                       [*extra, f"checkpoint.resume={start_dir}"])
    _, failed = phase("resume", lambda: train(cfg))
    if failed:
        return failed
    again_dir = step_dir(cfg, sizes.steps)
    if again_dir is None:
        return verdict("resume", False, f"{cfg.train.run_dir}: no checkpoint at step "
                                        f"{sizes.steps}")
    weights, failed = phase("resume", lambda: checks.update_error(
        *(checkpoint_io.state_dict(d) for d in (start_dir, end_dir, again_dir))))
    if failed:
        return failed
    return checks.resumed(metrics(root / "run"), metrics(root / "resumed"), weights, start,
                          device)


def run_smoke(root: Path, device: str = "auto", sizes: Sizes = Sizes(),
              extra: Sequence[str] = (), emit: Callable[[str], None] = print) -> list[Check]:
    """Every check in order, each line emitted as it is known. `extra`: config overrides the
    tests use to shrink the model (the checks' bounds are argued for the tiny preset)."""
    root = Path(root)
    device = device_of(device)
    claim_dir(root)
    phase = Phase(root / "smoke.log")
    cfg = smoke_config(root, device, sizes, extra=extra)
    out: list[Check] = []

    def add(check: Check) -> None:
        out.append(check)
        emit(check.line())

    data, failed = phase("data", lambda: prepare(cfg))
    add(failed or data)
    result, failed = phase("train", lambda: train(cfg)) if data else (None, None)
    trained = result is not None
    if data:
        add(failed or train_check(cfg, result, device))
    run_dir = root / "run"
    if trained:
        add(monitor_check(run_dir))
        add(checks.loss_falls(metrics(run_dir)))
        first = next((r for r in metrics(run_dir) if r["step"] == 1), {}).get(
            "optim/grad_norm_preclip")
        ref, failed = phase("norm", lambda: reference.step1_norm(cfg, device))
        add(failed or checks.step1_norm(first, ref, cfg.train.precision))
        add(resume_check(root, device, sizes, extra, phase))
        add(checks.finite({"uninterrupted": metrics(run_dir),
                           "resumed": metrics(root / "resumed")}))
        from harness.smoke.hf_reload import export_and_reload

        exported, failed = phase("export", lambda: export_and_reload(run_dir, root / "hf"))
        add(failed or exported)
    for name in ("data", "train", "monitor", "loss", "norm", "resume", "finite", "export"):
        if not any(c.name == name for c in out):
            add(Check(name, "SKIP", "not run: an earlier phase failed"))
    return out


def main(directory: str, device: str, sizes: Sizes = Sizes(), extra: Sequence[str] = ()) -> int:
    t0 = time.perf_counter()
    root = Path(directory)
    threads = torch.get_num_threads()
    if device_of(device) == "cpu":
        # the tiny model's ops are too small for a second thread to pay (measured here: 0.27 s
        # a step with one, 0.17 with two on an idle 2-core machine), and on a runner that
        # another process shares, a 2-thread team waits for its descheduled thread at every
        # op (measured: 4.1 s a step, the train phase 124 s instead of 10)
        torch.set_num_threads(1)
    try:
        found = run_smoke(root, device, sizes, extra)
    finally:
        torch.set_num_threads(threads)
    failed = [c.name for c in found if not c.ok]
    where = f"{root} (log: {root / 'smoke.log'})"
    if failed:
        print(f"smoke: FAILED {', '.join(dict.fromkeys(failed))} in "
              f"{time.perf_counter() - t0:.0f} s; {where}")
        return 1
    print(f"smoke: all {len(found)} checks passed in {time.perf_counter() - t0:.0f} s; {where}")
    return 0
