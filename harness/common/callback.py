"""Cross-cutting concerns hook into the loop through small callbacks (OLMo-core style).

Every hook is optional. `metrics` is the per-optimizer-step dict of namespaced scalars
(train/loss, optim/grad_norm_preclip, ...); callbacks may add keys to it, and the loggers
run last so they see everything. `state_dict()` goes into every checkpoint.
"""
from __future__ import annotations

from typing import Any


class Callback:
    # lower runs first; loggers use 100 so they see what monitors added
    order: int = 50

    def on_train_start(self, trainer: Any) -> None:
        pass

    def on_before_step(self, trainer: Any, step: int, signals: dict[str, Any]) -> None:
        """At the accumulation boundary, before the update: signals holds the step's loss and
        pre-clip gradient norms; set trainer.skip_update = True to drop this update."""

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_event(self, trainer: Any, step: int, event: dict[str, Any]) -> None:
        """A monitor event (warning, advice, loss_spike, ...), broadcast to every callback."""

    def on_train_end(self, trainer: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
