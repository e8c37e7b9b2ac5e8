"""Reads what a W&B offline run wrote, so tests can check it without the network: the whole
run (history, config, summary, alerts) on top of harness.callbacks.wandb_file's record reader.

wandb's finish() can return before its service has flushed the file (measured: 98,304 of
104,417 bytes, the rest a moment later), so read_run waits for the closing `exit` record.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.callbacks.wandb_file import chunks
from harness.callbacks.wandb_file import items as _items  # noqa: F401
from harness.callbacks.wandb_file import records


def _finished(path: Path, timeout: float) -> tuple[list, bool]:
    deadline = time.monotonic() + timeout
    while True:
        recs, dangling = records(Path(path).read_bytes())
        done = bool(recs) and recs[-1].WhichOneof("record_type") == "exit" and not dangling
        if done or time.monotonic() > deadline:
            return recs, done
        time.sleep(0.05)


@dataclass
class OfflineRun:
    run_id: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    alerts: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False  # the run's exit record was found

    def rows(self, key: str) -> list[dict[str, Any]]:
        """History rows holding `key`, without W&B's own `_`-prefixed columns."""
        return [{k: v for k, v in row.items() if not k.startswith("_")}
                for row in self.history if key in row]


def read_run(path: Path, timeout: float = 30.0) -> OfflineRun:
    """Parses the run file once it ends in an `exit` record (or timeout s have passed)."""
    recs, complete = _finished(path, timeout)
    run = OfflineRun(complete=complete)
    for rec in recs:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.run_id = rec.run.run_id
            run.config.update(_items(rec.run.config.update))
        elif kind == "config":
            run.config.update(_items(rec.config.update))
        elif kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
        elif kind == "alert":
            run.alerts.append((rec.alert.title, rec.alert.text))
    run.config = {k: v for k, v in run.config.items() if not k.startswith("_")}  # not _wandb
    return run


def run_files(root: Path, run_id: str = "*") -> list[Path]:
    """Every offline run file under root (e.g. RUN_DIR/wandb), oldest first."""
    return sorted(Path(root).rglob(f"offline-run-*/run-{run_id}.wandb"))
