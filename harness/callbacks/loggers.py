"""The metrics sinks every run has: metrics.jsonl (always) and the console (rank 0 only).

One name per metric, the same in every sink. Loggers run after the other callbacks
(order 100) so they see what monitors added to the step's metrics.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harness.callbacks.base import Callback
from harness.errors import HarnessError


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "+inf": math.inf,
             "infinity": math.inf, "-infinity": -math.inf}


def as_number(value: Any) -> Any:
    """A metric as written, read back: the strings _jsonable made of NaN/inf become floats
    again; anything else is returned as it is."""
    if isinstance(value, str) and value.strip().lower() in NONFINITE:
        return NONFINITE[value.strip().lower()]
    return value


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in file order. A last line that does not parse was torn
    by a crash mid-write and is dropped; a bad line elsewhere is an error naming it."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise HarnessError(f"{path} is not a metrics.jsonl (not UTF-8 text: a binary file?); "
                           "point at the run directory `harness train` wrote") from None
    except OSError as e:
        raise HarnessError(f"cannot read {path} ({e.strerror or e})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise HarnessError(f"{path}:{n} is not a JSON line") from None
        if not isinstance(record, dict):
            raise HarnessError(f"{path}:{n} is not a JSON object (one per line, as "
                               "`harness train` writes them)")
        records.append(record)
    return records


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
        self._fh.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

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
    """A progress bar on a terminal; one plain line every `every` steps otherwise."""

    order = 100

    def __init__(self, every: int):
        self.every = max(1, every)
        self.bar: tqdm | None = None

    def on_train_start(self, trainer):
        if trainer.is_main and sys.stdout.isatty():
            self.bar = tqdm(total=trainer.cfg.train.max_steps, initial=trainer.step,
                            unit="step", dynamic_ncols=True)

    def on_step_end(self, trainer, step, metrics):
        if not trainer.is_main:
            return
        loss, norm = metrics["train/loss"], metrics["optim/grad_norm_preclip"]
        tps = metrics["throughput/tokens_per_s"]
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} gnorm {norm:.3f} tok/s {tps:,.0f}")
            self.bar.update(1)
        elif step % self.every == 0 or step == trainer.cfg.train.max_steps:
            print(f"step {step:>6} | loss {loss:.4f} | grad_norm {norm:.4f} | "
                  f"clip {metrics['optim/clip_coef']:.3f} | lr {metrics['optim/lr']:.2e} | "
                  f"tok/s {tps:,.0f}", flush=True)

    def on_event(self, trainer, step, event):
        if trainer.is_main:
            text = f"[{event.get('event', 'event')}] step {step}: " + json.dumps(event)
            (self.bar.write if self.bar is not None else print)(text)

    def on_train_end(self, trainer):
        if self.bar is not None:
            self.bar.close()
