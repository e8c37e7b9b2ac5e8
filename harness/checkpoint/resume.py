"""Which checkpoint a start resumes, known before any engine is built (from the config and
the files alone): the run directory's model shape and model.init_from depend on it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.checkpoint.sums import complete_checkpoints
from harness.config import Config


def checkpoint_root(cfg: Config) -> Path:
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir)
    return Path(cfg.train.run_dir) / "checkpoints"


def resumed_run_dir(cfg: Config) -> Optional[Path]:
    """The run directory whose checkpoint this start will resume, if any (read before the
    engine is built: its config.yaml tells the model shape the checkpoint holds)."""
    run_dir = Path(cfg.train.run_dir)
    resume = cfg.checkpoint.resume
    if resume == "auto":
        return run_dir if complete_checkpoints(checkpoint_root(cfg)) else None
    if resume == "never":
        return None
    step_dir = Path(resume).expanduser()
    if checkpoint_root(cfg).resolve() in step_dir.resolve().parents:
        return run_dir
    return step_dir.parent.parent  # RUN_DIR/checkpoints/stepN: another run's directory
