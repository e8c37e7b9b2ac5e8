"""checkpoint.*: how often to save, how many to keep, what to resume from, and where. Saving
and loading: harness/checkpoint/."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.common.errors import HarnessError, check_line, check_number

META = "meta.json"  # the file a complete checkpoint directory holds (written last)


@dataclass
class CheckpointConfig:
    every: int = 50  # optimizer steps between saves; 0: only at the end and on signals
    keep_last: int = 3  # complete checkpoints kept, newest first (>= 1)
    resume: str = "auto"  # auto | never | PATH to a step directory
    dir: Optional[str] = None  # default RUN_DIR/checkpoints

    def validate(self) -> None:
        check_number("checkpoint.every", self.every, 0, 2**31 - 1, integer=True,
                     fix="0 saves only at the end and on signals")
        check_number("checkpoint.keep_last", self.keep_last, 1, 2**31 - 1, integer=True,
                     fix="e.g. 3")
        check_line("checkpoint.resume", self.resume, fix="use auto, never or a step directory")
        if self.dir is not None:
            check_line("checkpoint.dir", self.dir,
                       fix="use null for RUN_DIR/checkpoints, or a directory path")
        if self.resume not in ("auto", "never") and not Path(self.resume, META).is_file():
            raise HarnessError(f"checkpoint.resume={self.resume}: not a complete checkpoint "
                               f"directory (no {META}); use auto, never or a step directory")
