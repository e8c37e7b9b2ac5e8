"""The bad-input battery's case format (tests/cli/test_bad_inputs.py runs every case).

Each area keeps its cases in its own module here (config.py, data.py, checkpoints.py, ...),
as `CASES: list[Case]`. A case is a `harness` command line that must end with `exit_code`,
exactly one stderr line that starts with "error:" (for exit 2) and contains every
one of `words`, no traceback anywhere, and leave every file named in `unchanged` byte for byte
as `setup` made it. `check(tmp, out, err)` asserts anything else afterwards (what a case
must have written, or must not say); `during(proc, tmp)` acts on a `process` case while it
runs (a signal, a file cut short), before the runner waits for it. `timeout` (seconds): a case
that once hung (or could) fails at once past it, rather than holding the suite for hours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


@dataclass
class Case:
    id: str
    argv: list[str]  # after "harness"; "{tmp}" is replaced by the case's own directory
    words: tuple[str, ...] = ()  # each must appear in the error line
    exit_code: int = 2
    setup: Optional[Callable[[Path], None]] = None  # makes files in the case's directory
    unchanged: tuple[str, ...] = ()  # paths relative to the case's directory
    slow: bool = False  # trains, kills, or waits: marked slow (still run in CI)
    process: bool = False  # run as its own process (signals, exit codes of the interpreter)
    env: dict[str, str] = field(default_factory=dict)
    check: Optional[Callable[[Path, str, str], None]] = None  # (tmp, stdout, stderr)
    during: Optional[Callable[[Any, Path], None]] = None  # (subprocess.Popen, tmp); process only
    timeout: Optional[float] = None  # seconds; None: the runner's 600 s for process cases
