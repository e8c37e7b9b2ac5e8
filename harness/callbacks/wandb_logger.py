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

W&B never costs training: once the run has started, any exception from W&B (its service gone,
a full disk, the network) is one warning, W&B is off for the rest of the run and
metrics.jsonl goes on. One loss is foreseeable: Slurm's SIGTERM (scancel, a time limit without
a warning signal, `scontrol requeue`) reaches every process of the job step, W&B's service
(`wandb-core`, a Go program that cannot ignore it) included, which dies with the rows it had
not yet written (it writes in batches). So when this rank has seen SIGTERM, the logger waits
until the final checkpoint is saved, starts a new service for the same run id (a new
offline-run directory beside the old) and logs again, from metrics.jsonl, every row the dead
service's file lacks: the steps up to the final save reach W&B too (`wandb sync` both
directories).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Optional

from harness.callbacks.wandb_file import history_rows
from harness.common.callback import Callback
from harness.common.errors import HarnessError
from harness.common.jsonl import as_number, read_lines
from harness.config import to_dict
from harness.config.wandb import WandbConfig

log = logging.getLogger("harness")

def _loggable(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value  # W&B charts ints, not bools


def _alert_level(event: dict[str, Any]) -> str:
    """ERROR when the monitor acted on the event (skip, rollback, stop), WARN otherwise."""
    return "ERROR" if event.get("action") else "WARN"


def _first_line(err: Exception, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def event_row(step: int, event: dict[str, Any]) -> dict[str, Any]:
    """The W&B row of a monitor event: numbers become chartable metrics, names (signal,
    action) stay in the alert text."""
    kind = str(event.get("event", "event"))
    row = {"train/step": step, f"monitor/{kind}": 1}
    for key, value in event.items():
        value = as_number(value)  # a metrics.jsonl line holds NaN and inf as strings
        if isinstance(value, (bool, int, float)) and key not in ("step", "train/step"):
            row[f"monitor/{kind}/{key}"] = _loggable(value)
    return row


def step_row(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The W&B row of one optimizer step's metrics (a metrics.jsonl line)."""
    return {"train/step": step,
            **{k: _loggable(as_number(v)) for k, v in metrics.items() if k != "step"}}


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a logged row: its step, and the event it reports if it is one."""
    kinds = sorted(k for k in row if k.startswith("monitor/") and k.count("/") == 1)
    return (row.get("train/step"), *kinds)


def new_run_id() -> str:
    # W&B ids: up to 64 characters of [a-z0-9]; 12 hex digits never collide in practice
    return secrets.token_hex(6)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _teardown_quietly() -> None:
    """End wandb's connection to its service; a service already gone raises here too."""
    import wandb

    try:
        wandb.teardown()
    # the service is gone: nothing left to end; teardown even calls sys.exit() with a killed
    # service's exit code (128), which must not end training
    except (Exception, SystemExit):
        pass


class WandbLogger(Callback):
    order = 100

    def __init__(self, cfg: WandbConfig):
        cfg.validate()
        self.cfg = cfg
        self.run_id: Optional[str] = None
        self.run: Any = None  # the wandb Run on rank 0 while training, else None
        self._init: Optional[tuple[str, dict[str, Any]]] = None  # (mode, wandb.init kwargs)
        self._restarted = False  # a new service after SIGTERM: at most once per process
        self._metrics_from = 0  # metrics.jsonl's size when this process began to log

    def on_train_start(self, trainer):
        mode = self.cfg.resolved_mode()
        if not trainer.is_main or mode == "disabled":
            return
        import wandb  # only rank 0 with W&B on pays for the import

        # wandb's own log records go to its debug.log in the run's wandb directory, not to our
        # console: a dead service would otherwise print tracebacks beside our one warning
        logging.getLogger("wandb").propagate = False
        # a W&B service this process inherited (WANDB_SERVICE: the parent's, e.g. the shell's
        # or the submitting process's) is not this run's: it may hold this run id already,
        # lives and dies with another process, and a restart after SIGTERM would reconnect to
        # it; this process starts its own (wandb keeps a service it started in this process)
        os.environ.pop("WANDB_SERVICE", None)

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
            self.run = wandb.init(mode=mode, settings=self._settings(wandb, mode), **kwargs)
        except wandb.errors.Error as err:
            if mode != "online" or isinstance(err, (wandb.errors.AuthenticationError,
                                                    wandb.errors.UsageError)):
                raise HarnessError(f"wandb.init failed ({_first_line(err)}): check "
                                   f"`wandb login` (or WANDB_API_KEY) and the network, or set "
                                   f"wandb.mode=offline and `wandb sync` later") from None
            mode = "offline"
            self.run = self._offline(wandb, err, kwargs)
        self._init = (mode, kwargs)
        self._metrics_from = _size(self._metrics_path(trainer))  # where this process's lines start
        self._call("define_metric", self._define_metrics)
        url = getattr(self.run, "url", None) if mode == "online" else None
        log.info("W&B run %s (%s) in %s%s", self.run_id, mode, where, f": {url}" if url else "")

    def _settings(self, wandb, mode: str) -> Any:
        """Online: wait wandb.init_timeout_s for the server, and no more. wandb's logged-in
        message looks the user name up with its own retries first (about 10 s with no route
        to the server, whatever init_timeout says), so it is skipped (silent); the run's URL
        is in our own line instead."""
        if mode != "online":
            return None
        timeout = ({} if os.environ.get("WANDB_INIT_TIMEOUT")
                   else {"init_timeout": float(self.cfg.init_timeout_s)})
        return wandb.Settings(silent=True, **timeout)

    def _define_metrics(self) -> None:
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        """One W&B call. A failure is one warning, and W&B off for the rest of the run: a
        logger must never cost training its steps or its final checkpoint."""
        try:
            return fn(*args, **kwargs)
        # wandb raises anything from its socket, and sys.exit() from a teardown: all of it W&B's
        except (Exception, SystemExit) as err:
            log.warning("W&B failed in %s (%s: %s): W&B is off for the rest of this run; "
                        "metrics.jsonl keeps every step", what, type(err).__name__,
                        _first_line(err, 200))
            self.run = None
            _teardown_quietly()
            return None

    def _live_run(self, trainer, ending: bool = False) -> Any:
        """The run to log to. Once this rank has seen SIGTERM, the service is dying with it
        (see the module docstring): nothing is logged until the loop has ended and the
        checkpoint is saved (the Checkpointer's on_train_end runs first: SIGKILL follows
        SIGTERM after Slurm's KillWait, and the checkpoint matters more); then a new service
        logs again, from metrics.jsonl, what the old one lost."""
        signals = getattr(trainer, "stop_signals", None)
        if self.run is None or self._restarted or signals is None or not signals.terminated:
            return self.run
        if not ending:
            return None  # its rows wait in metrics.jsonl
        self._restarted = True
        self._call("restart after SIGTERM", self._restart, trainer)
        return self.run

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

    def _restart(self, trainer) -> None:
        import wandb

        old_file = Path(self.run.settings.sync_file)
        _teardown_quietly()  # the old connection is dead, or ends here
        self.run = None
        mode, kwargs = self._init
        self.run = wandb.init(mode=mode, **kwargs)
        self._define_metrics()
        kept = {_row_key(row) for row in history_rows(old_file)}
        lost = [row for row in self._rows_so_far(trainer) if _row_key(row) not in kept]
        for row in lost:
            self.run.log(row)
        log.warning("SIGTERM reached W&B's service too: a new one continues run %s in %s "
                    "(%d rows its predecessor had not written logged again from "
                    "metrics.jsonl); `wandb sync` both %s and %s", self.run_id,
                    self.run.settings.sync_dir, len(lost), old_file.parent,
                    self.run.settings.sync_dir)

    @staticmethod
    def _metrics_path(trainer) -> Path:
        return Path(trainer.cfg.train.run_dir) / "metrics.jsonl"

    def _rows_so_far(self, trainer) -> list[dict[str, Any]]:
        """What this process logged: its lines of metrics.jsonl (each written before the
        loggers run) as W&B rows. Earlier jobs' lines went to their own services."""
        lines = read_lines(self._metrics_path(trainer), start=self._metrics_from)
        return [event_row(line["step"], line) if "event" in line else step_row(line["step"], line)
                for line in lines if isinstance(line.get("step"), int)]

    def _log(self, trainer, row: dict[str, Any]) -> Any:
        """Log one row; returns the live run."""
        run = self._live_run(trainer)
        if run is not None:
            self._call("log", run.log, row)
        return self.run

    def on_step_end(self, trainer, step, metrics):
        self._log(trainer, step_row(step, metrics))

    def on_event(self, trainer, step, event):
        run = self._log(trainer, event_row(step, event))
        if run is None or event.get("level") in ("warning", "advice") and not event.get("action"):
            return  # a precursor or advice: a chartable metric, no alert (alerts are for alarms)
        # W&B holds back repeats of one title for wait_duration (default 1 min): no alert storm
        kind = str(event.get("event", "event"))
        self._call("alert", run.alert, title=f"harness: {kind}",
                   text=f"step {step}: {json.dumps(event)}", level=_alert_level(event))

    def on_train_end(self, trainer):
        run = self._live_run(trainer, ending=True)
        if run is not None:
            if trainer.stop_reason is not None:
                self._call("summary", run.summary.__setitem__, "train/stop_reason",
                           trainer.stop_reason)
            if self.run is not None:
                self._call("finish", run.finish)
            self.run = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or self.run_id
