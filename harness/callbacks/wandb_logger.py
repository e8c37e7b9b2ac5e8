"""Weights & Biases: the same namespaced metrics as metrics.jsonl, from rank 0 only.

Every chart is plotted against `train/step` (our optimizer step), never W&B's own `_step`:
W&B silently drops rows whose `_step` is lower than the last one it saw, which is exactly
what a rollback or a resume from an older checkpoint produces. So we never pass step= to
log(); `train/step` is a metric like any other and `define_metric("*", step_metric=...)`
makes it every chart's x axis.

The run id goes into the checkpoint (state_dict), so a resumed or requeued job continues the
same W&B run (resume="allow") instead of starting a new one.

The API key is read by wandb itself from WANDB_API_KEY or ~/.netrc; nothing here reads,
logs or stores it, and the run config holds only the harness and DeepSpeed configs.

Online with no route to the server (the usual case on a cluster's compute nodes), wandb.init
waits `init_timeout` (wandb's default: 90 s) and fails. Here it waits `wandb.init_timeout_s`
(default 20 s), then logs offline into the same directory, with one warning that names the
offline run directory and `wandb sync DIR` to upload it later; training goes on. A refused
login (a wrong key) is not a network problem: it stays an error.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

from harness.callbacks.base import Callback
from harness.errors import HarnessError

log = logging.getLogger("harness")

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


def _loggable(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value  # W&B charts ints, not bools


def _alert_level(event: dict[str, Any]) -> str:
    """ERROR when the monitor acted on the event (skip, rollback, stop), WARN otherwise."""
    return "ERROR" if event.get("action") else "WARN"


def _first_line(err: Exception, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def new_run_id() -> str:
    # W&B ids: up to 64 characters of [a-z0-9]; 12 hex digits never collide in practice
    return secrets.token_hex(6)


class WandbLogger(Callback):
    order = 100

    def __init__(self, cfg: WandbConfig):
        cfg.validate()
        self.cfg = cfg
        self.run_id: Optional[str] = None
        self.run: Any = None  # the wandb Run on rank 0 while training, else None

    def on_train_start(self, trainer):
        mode = self.cfg.resolved_mode()
        if not trainer.is_main or mode == "disabled":
            return
        import wandb  # only rank 0 with W&B on pays for the import

        from harness.config import to_dict  # here: harness.config imports WandbConfig from us

        # WANDB_RUN_ID lets a job without a checkpoint yet (a requeue) keep its run
        self.run_id = self.run_id or os.environ.get("WANDB_RUN_ID") or new_run_id()
        where = self.cfg.dir or trainer.cfg.train.run_dir
        os.makedirs(where, exist_ok=True)
        kwargs = dict(
            project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group,
            name=self.cfg.name, tags=list(self.cfg.tags), dir=where, id=self.run_id,
            resume="allow",
            config={"harness": to_dict(trainer.cfg), "deepspeed": trainer.built.ds_config})
        try:
            settings = (wandb.Settings(init_timeout=float(self.cfg.init_timeout_s))
                        if mode == "online" and not os.environ.get("WANDB_INIT_TIMEOUT") else None)
            self.run = wandb.init(mode=mode, settings=settings, **kwargs)
        except wandb.errors.Error as err:
            if mode != "online" or isinstance(err, (wandb.errors.AuthenticationError,
                                                    wandb.errors.UsageError)):
                raise HarnessError(f"wandb.init failed ({_first_line(err)}): check "
                                   f"`wandb login` (or WANDB_API_KEY) and the network, or set "
                                   f"wandb.mode=offline and `wandb sync` later") from None
            mode = "offline"
            self.run = self._offline(wandb, err, kwargs)
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")
        log.info("W&B run %s (%s) in %s", self.run_id, mode, where)

    def _offline(self, wandb, err: Exception, kwargs: dict[str, Any]) -> Any:
        """The online start failed for want of the server: the same run, logged offline."""
        wandb.teardown()  # the failed start holds the run id in wandb's service otherwise
        try:
            run = wandb.init(mode="offline", **kwargs)
        except wandb.errors.Error as again:
            raise HarnessError(f"wandb.init failed online ({_first_line(err)}) and offline "
                               f"({_first_line(again)}): set wandb.mode=disabled to train "
                               f"without W&B") from None
        sync_dir = getattr(run.settings, "sync_dir", None) or kwargs["dir"]
        log.warning("W&B server not reachable within wandb.init_timeout_s=%gs (%s): logging "
                    "offline to %s; upload it later with `wandb sync %s`",
                    self.cfg.init_timeout_s, _first_line(err, 160), sync_dir, sync_dir)
        return run

    def on_step_end(self, trainer, step, metrics):
        if self.run is not None:
            row = {k: _loggable(v) for k, v in metrics.items() if k != "step"}
            self.run.log({"train/step": step, **row})

    def on_event(self, trainer, step, event):
        if self.run is None:
            return
        kind = str(event.get("event", "event"))
        row = {f"monitor/{kind}": 1}
        # numbers become chartable metrics; names (signal, action) stay in the alert text
        for key, value in event.items():
            if isinstance(value, (bool, int, float)) and key != "step":
                row[f"monitor/{kind}/{key}"] = _loggable(value)
        self.run.log({"train/step": step, **row})
        if event.get("level") == "warning" and not event.get("action"):
            return  # a precursor: a chartable metric, no alert (alerts are for alarms)
        # W&B holds back repeats of one title for wait_duration (default 1 min): no alert storm
        self.run.alert(title=f"harness: {kind}", text=f"step {step}: {json.dumps(event)}",
                       level=_alert_level(event))

    def on_train_end(self, trainer):
        if self.run is not None:
            if trainer.stop_reason is not None:
                self.run.summary["train/stop_reason"] = trainer.stop_reason
            self.run.finish()
            self.run = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or self.run_id
