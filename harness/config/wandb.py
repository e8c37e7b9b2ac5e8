"""wandb.*: where Weights & Biases logs (mode, project, names, directory) and how long an online
run waits for its server. The logger itself: harness/callbacks/wandb_logger.py."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from harness.common.errors import HarnessError

MODES = ("online", "offline", "disabled")
MAX_INIT_TIMEOUT_S = 600


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled; WANDB_MODE overrides when set
    project: str = "harness"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    dir: Optional[str] = None  # where wandb/ goes; None: the run directory
    # online: seconds to wait for the server before logging offline (`wandb sync` later)
    init_timeout_s: float = 20.0

    def resolved_mode(self) -> str:
        return os.environ.get("WANDB_MODE") or self.mode

    def validate(self) -> None:
        if self.mode not in MODES:
            raise HarnessError(f"wandb.mode='{self.mode}' is not one of {', '.join(MODES)}")
        env = os.environ.get("WANDB_MODE")
        if env and env not in MODES:
            raise HarnessError(f"WANDB_MODE='{env}' (which overrides wandb.mode) is not one of "
                               f"{', '.join(MODES)}: unset it or fix it")
        if not self.project:
            raise HarnessError("wandb.project must not be empty")
        timeout = self.init_timeout_s
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not math.isfinite(timeout) or not 1 <= timeout <= MAX_INIT_TIMEOUT_S):
            raise HarnessError(f"wandb.init_timeout_s={timeout} must be a number of seconds in "
                               f"[1, {MAX_INIT_TIMEOUT_S}]: how long an online run waits for "
                               f"the W&B server before logging offline, e.g. 20")
