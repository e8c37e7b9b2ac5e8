"""Offline replay: run a recorded trace through the spike detector (`harness monitor replay`).

Reads the harness's own metrics.jsonl (one JSON object per line with "step" and namespaced
keys; lines without "step" or with an "event" key are skipped, non-numeric values ignored, and
the strings "nan", "inf", "-inf" that the harness writes for non-finite values read back as
the numbers they stand for, so a run that went NaN replays its events) or
a CSV with a `step` column and any of loss, grad_norm, update_norm, clip_coef, loss_scale, lr,
grad_norm_<group> (mapped to the namespaced keys; columns already namespaced pass through).
The format is sniffed from the first character, not the file name (gzip is undone first).
Each record is fed the way the trainer feeds a step: update norm, parameter norm and jump,
update ratios and the LR after the step, everything else before it (config.monitor.POST_STEP).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from harness.common.errors import HarnessError
from harness.common.jsonl import as_number
from harness.config.monitor import MonitorConfig, is_post_step
from harness.monitor.detector import OVERFLOW, SpikeDetector

CSV_NAMES = {
    "loss": "train/loss",
    "grad_norm": "optim/grad_norm_preclip",
    "grad_norm_preclip": "optim/grad_norm_preclip",
    "update_norm": "optim/update_norm",
    "clip_coef": "optim/clip_coef",
    "loss_scale": "optim/loss_scale",
    "lr": "optim/lr",
}
GROUPS = ("embeddings", "attention", "mlp", "norms", "head")
CSV_NAMES.update({f"grad_norm_{g}": f"grad_norm/{g}" for g in GROUPS})

Trace = list[tuple[int, dict[str, float]]]


def read_trace(path: str | Path) -> Trace:
    """The (step, signals) records of a metrics.jsonl or CSV file, in file order."""
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip (a compressed log, e.g. tests/monitor/*.csv.gz)
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise HarnessError(f"cannot read trace {path}: {e}") from None
    if not text.strip():
        raise HarnessError(f"trace {path} is empty")
    records = (_read_jsonl(path, text) if text.lstrip().startswith(("{", "["))
               else _read_csv(path, text))
    if not records:
        raise HarnessError(f"trace {path} has no records with a 'step'")
    return records


def _read_jsonl(path: str | Path, text: str) -> Trace:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise HarnessError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise HarnessError(f"{path}:{lineno}: expected a JSON object per line")
        if "step" not in obj or "event" in obj:  # event lines are monitor output, not metrics
            continue
        step = _step(path, lineno, obj["step"])
        nums = {}
        for k, v in obj.items():
            v = as_number(v)  # "nan", "inf": how MetricsFile writes non-finite values
            if k != "step" and isinstance(v, (int, float)) and (k == OVERFLOW
                                                                or not isinstance(v, bool)):
                nums[k] = float(v)  # optim/overflow, a bool, says a step's inf norm is fp16's
        records.append((step, nums))
    return records


def _read_csv(path: str | Path, text: str) -> Trace:
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    if "step" not in header:
        raise HarnessError(f"trace {path} is neither JSONL nor a CSV with a 'step' column")
    reader.fieldnames = header
    records = []
    for row in reader:
        lineno = reader.line_num
        if None in row or None in row.values():  # more, or fewer, cells than the header
            cells = len(header) + len(row.get(None) or []) - sum(v is None for v in row.values())
            raise HarnessError(f"{path}:{lineno}: {cells} cells, the header has {len(header)} "
                               "columns: fix the row (an empty cell is an empty field)")
        step = _step(path, lineno, row["step"])
        signals = {}
        for col, cell in row.items():
            if col == "step" or col is None or cell is None or not cell.strip():
                continue
            try:
                signals[CSV_NAMES.get(col, col)] = float(cell)
            except ValueError:
                raise HarnessError(
                    f"{path}:{lineno}: column {col!r}: {cell!r} is not a number"
                ) from None
        records.append((step, signals))
    return records


def _step(path: str | Path, lineno: int, value: Any) -> int:
    try:
        step = float(value)
    except (TypeError, ValueError):
        step = float("nan")
    if not step.is_integer():
        raise HarnessError(f"{path}:{lineno}: step {value!r} is not an integer")
    return int(step)


def replay(path: str | Path, cfg: MonitorConfig, detector: Optional[Any] = None) -> list[dict]:
    """Events that `detector` (default: SpikeDetector(cfg)) gives on the trace at `path`."""
    return replay_trace(read_trace(path), cfg, detector)


def replay_trace(records: Trace, cfg: MonitorConfig,
                 detector: Optional[Any] = None) -> list[dict]:
    """Events that `detector` (default: SpikeDetector(cfg)) gives on records of read_trace."""
    det = detector if detector is not None else SpikeDetector(cfg)
    events: list[dict] = []
    for step, signals in records:
        pre = {k: v for k, v in signals.items() if not is_post_step(k)}
        post = {k: v for k, v in signals.items() if is_post_step(k)}
        events += det.check_pre_step(step, pre)
        events += det.check_post_step(step, post)
    return events


def main(path: str | Path, cfg: MonitorConfig, warmup_from_trace: bool = False) -> int:
    """CLI body: one JSON line per event on stdout, then one line on stderr saying how many
    steps were read and how many events they gave (so "no events" is said, not silent, and
    stdout stays pure JSON lines for jq). Bad input raises HarnessError.
    warmup_from_trace: the end of the LR warm-up is read from the trace's own optim/lr where
    it has one (SpikeDetector with trend_after None), not taken from the config."""
    records = read_trace(path)
    if warmup_from_trace and any("optim/lr" in signals for _, signals in records):
        cfg.trend_after = None
    events = replay_trace(records, cfg)
    for event in events:
        print(json.dumps(event))
    print(summary_line(path, records, events), file=sys.stderr)
    return 0


def summary_line(path: str | Path, records: Trace, events: list[dict]) -> str:
    """`replayed 1,200 steps (1-1,200) of PATH: no events` or `...: 3 events (2 warning,
    1 loss_spike)`; steps counted once each (a rolled-back run logs some twice)."""
    steps = sorted({step for step, _ in records})
    text = f"replayed {len(steps):,} steps ({steps[0]:,}-{steps[-1]:,}) of {path}: "
    if not events:
        return text + "no events"
    kinds = Counter(str(e.get("event")) for e in events)
    return text + (f"{len(events):,} event{'s' * (len(events) != 1)} ("
                   + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")")
