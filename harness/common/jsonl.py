"""The metrics.jsonl format, both ways: a value as written (NaN and inf as strings, which JSON
lacks) and the records read back (a line torn by a crash dropped, a bad line named)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from harness.common.errors import HarnessError


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "+inf": math.inf,
             "infinity": math.inf, "-infinity": -math.inf}


def as_number(value: Any) -> Any:
    """A metric as written, read back: the strings jsonable made of NaN/inf become floats
    again; anything else is returned as it is."""
    if isinstance(value, str) and value.strip().lower() in NONFINITE:
        return NONFINITE[value.strip().lower()]
    return value


def read_lines(path: Path, start: int = 0) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in file order, from byte `start` (a line boundary). A
    last line that does not parse was torn by a crash mid-write and is dropped; a bad line
    elsewhere is an error naming it."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            lines = fh.read().decode("utf-8").splitlines()
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
