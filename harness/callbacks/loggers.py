"""The metrics sinks every run has: metrics.jsonl (always) and the console (rank 0 only).

One name per metric, the same in every sink. Loggers run after the other callbacks
(order 100) so they see what monitors added to the step's metrics.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harness.common.callback import Callback
from harness.common.jsonl import jsonable, read_lines
from harness.monitor.events import describe


def _step_of(record: dict[str, Any]) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else 0


class MetricsFile(Callback):
    """One JSON line per optimizer step (and per event) in RUN_DIR/metrics.jsonl."""

    order = 100

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = None

    def truncate_after(self, step: int) -> None:
        """After a resume at `step`, drop the lines of steps that will be trained again."""
        if not self.path.exists():
            return
        keep = [r for r in read_lines(self.path) if _step_of(r) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(self.path)

    def _write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            self._fh = self.path.open("a", buffering=1)
        self._fh.write(json.dumps({k: jsonable(v) for k, v in record.items()}) + "\n")

    def on_step_end(self, trainer, step, metrics):
        if trainer.is_main:
            self._write(metrics)

    def on_event(self, trainer, step, event):
        if trainer.is_main:
            self._write({"step": step, **event})

    def on_train_end(self, trainer):
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class Console(Callback):
    """Where the run stands, on rank 0: a progress bar on a terminal, else one plain line every
    `every` steps (and at the last): step / max_steps, percent, elapsed and ETA (from this
    process's pace), tokens seen, loss, gradient norm, how many of the steps since the last
    line were clipped, LR, tokens/s, and the eval loss and bits per byte when measured.
    Monitor events print as one sentence each (harness.monitor.events.describe). The first
    lines say where the run writes, the last ones what it left and the commands that use it.

    Clipping reads `clipped 3/10 steps`, a count over every step since the previous line:
    the clip coefficient of the one step printed (1.000 when it was NOT clipped) read as
    "100% clipped", and said nothing about the steps in between."""

    order = 101  # after the other loggers: W&B has started its run when the first lines print

    def __init__(self, every: int):
        self.every = max(1, every)
        self.bar: tqdm | None = None
        self._start: tuple[float, int] | None = None  # (time, step) when this process began
        self._eval: dict[str, Any] = {}
        self._clipped = [0, 0]  # (clipped, steps) since the previous line

    def on_train_start(self, trainer):
        if not trainer.is_main:
            return
        self._start = (time.perf_counter(), trainer.step)
        for line in start_lines(trainer):
            print(line, flush=True)
        if sys.stdout.isatty():
            self.bar = tqdm(total=trainer.cfg.train.max_steps, initial=trainer.step,
                            unit="step", dynamic_ncols=True)

    def on_step_end(self, trainer, step, metrics):
        if not trainer.is_main:
            return
        if "eval/loss" in metrics:  # the latest evaluation, shown with its step until the next
            self._eval = {"loss": metrics["eval/loss"], "bpb": metrics.get("eval/bpb"),
                          "step": step}
        loss, norm = metrics["train/loss"], metrics["optim/grad_norm_preclip"]
        self._clipped[0] += bool(metrics["optim/clipped"])
        self._clipped[1] += 1
        tps = metrics["throughput/tokens_per_s"]
        evals = ""
        if self._eval:
            bpb = self._eval["bpb"]
            evals = (f" | eval loss {self._eval['loss']:.4f}"
                     + (f" bpb {bpb:.4f}" if bpb is not None else "")
                     + (f" (step {self._eval['step']})" if self._eval["step"] != step else ""))
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} gnorm {norm:.3f} tok/s {tps:,.0f}"
                                     + evals.replace(" | ", " "))
            self.bar.update(1)
        elif step % self.every == 0 or step == trainer.cfg.train.max_steps:
            clipped, steps = self._clipped
            self._clipped = [0, 0]
            print(f"{self._progress(trainer, step, metrics)} | loss {loss:.4f} | grad_norm "
                  f"{norm:.4f} | clipped {clipped}/{steps} steps | lr "
                  f"{metrics['optim/lr']:.2e} | tok/s {tps:,.0f}{evals}", flush=True)

    def _progress(self, trainer, step: int, metrics) -> str:
        total = trainer.cfg.train.max_steps
        t0, step0 = self._start or (time.perf_counter(), 0)
        elapsed = time.perf_counter() - t0
        done = step - step0
        eta = elapsed / done * (total - step) if done > 0 else math.nan
        tokens = metrics.get("train/tokens_seen", 0)
        return (f"step {step:>6}/{total} ({100 * step / total:5.1f}%) | {_clock(elapsed)} elapsed, "
                f"ETA {_clock(eta)} | {_count(tokens)} tokens")

    def on_event(self, trainer, step, event):
        if trainer.is_main:
            text = describe({"step": step, **event})
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)

    def on_train_end(self, trainer):
        if self.bar is not None:
            self.bar.close()
        if trainer.is_main:
            for line in end_lines(trainer):
                print(line, flush=True)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}"


def start_lines(trainer) -> list[str]:
    """Where the run writes: its directory, and W&B (a URL, an offline directory, or off)."""
    run_dir = Path(trainer.cfg.train.run_dir).resolve()
    lines = [f"run: {run_dir} (config.yaml, metrics.jsonl, checkpoints/), step "
             f"{trainer.step} of {trainer.cfg.train.max_steps}"]
    wandb = next((cb for cb in trainer.callbacks if type(cb).__name__ == "WandbLogger"), None)
    run = getattr(wandb, "run", None)
    if run is None:
        lines.append("W&B: off (wandb.mode=disabled)")
    elif getattr(run.settings, "mode", "") != "offline" and getattr(run, "url", None):
        lines.append(f"W&B: {run.url}")
    else:
        sync_dir = getattr(run.settings, "sync_dir", None) or "the run's wandb/ directory"
        lines.append(f"W&B: offline in {sync_dir} (upload: wandb sync {sync_dir})")
    return lines


def end_lines(trainer) -> list[str]:
    """What the run left, and the commands that use it. Not report.png: it is written after
    these lines, and `harness train` names it once written (harness.train.run)."""
    run_dir = Path(trainer.cfg.train.run_dir)
    ckpt = next((cb for cb in trainer.callbacks if type(cb).__name__ == "Checkpointer"), None)
    saved = (ckpt.root / f"step{ckpt.last_saved_step:08d}"
             if ckpt is not None and ckpt.last_saved_step is not None else None)
    done = trainer.step >= trainer.cfg.train.max_steps
    lines = [f"checkpoint: {saved}" if saved else "checkpoint: none saved",
             "resume: run the same `harness train` command again" + (
                 " with a larger train.max_steps to go on" if done else "")]
    if saved:
        lines += [f"eval: harness eval {run_dir} --split val",
                  f"sample: harness sample {run_dir} --prompt TEXT",
                  f"export: harness export {run_dir} --to hf OUT_DIR"]
    return lines
