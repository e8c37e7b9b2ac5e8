"""The training loop: micro-steps up to the accumulation boundary, one optimizer step, metrics.

Everything cross-cutting (loggers, monitor, checkpoints) is a Callback; this file only
trains and measures what only the loop can see: the loss, the PRE-clip gradient norm (also
per layer group), the clip coefficient, the learning rate, the update norm, the step time,
and what the model saw in its forwards (harness.model.gpt.BlockStack.forward_stats): mean log(Z)^2
(train/z_loss, PaLM's quantity), the largest log Z, and a bound on each layer's largest
attention logit, the mechanism signals of output-logit divergence and attention-logit growth.

Host syncs per optimizer step, each read of a tensor's value by the host listed with its cost
on a GPU in harness.train.host_syncs.HOST_SYNCS (tests/train/test_host_syncs.py counts them
per configuration and fails on one not listed). The loop's own: ONE device-to-host copy
(Collectives.reduce_scalars: loss, forward statistics, squared group norms and the stop flag
in one all-reduce; the item/tolist reads after it are of host memory), and
torch.cuda.synchronize for the step time. With the monitor watching optim/update_norm,
GradNorms.update_metrics adds one read, of its all-reduced norms. On report steps the
PeakMemory callback adds one (its all-reduce of the peaks). DeepSpeed 0.19.8 adds, in
engine.step(): ZeRO 0 bf16 an overflow check per parameter tensor, two reads per parameter
group and one more; ZeRO 1-3 one to four norm and overflow reads. (Its throughput timer, which
synchronized the device at every forward and step, is switched off in the JSON.)

With a data mixture (TrainData.source_names) the step also logs train/loss/<source>: the mean
per-token cross-entropy over the step's tokens from that source's samples, over every
micro-step and data-parallel rank, which is train/loss restricted to those rows (CE only: the
z-loss term is out of both). The model keeps each row's summed CE from its training forward
(BlockStack.keep_row_losses: the loss and its gradients unchanged, no second forward); each
micro-step adds those sums and the rows' token counts into a (sources, 2) tensor on the device
by source index (index_add_, with the row sources' small non-blocking host-to-device copy), and
the tensor rides in the step's one all-reduce. A source with no tokens in a step has no key in
that step's metrics. Token-weighted, the per-source losses average to train/loss (to fp
rounding). Under tensor parallelism every rank of a group holds the group's full loss (the
output head is replicated), so each row counts tp times in both the sums and the counts: the
means are the same. Without a mix nothing of this runs.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterable

import numpy as np
import torch

from harness.common.callback import Callback
from harness.common.errors import HarnessError
from harness.config import Config
from harness.data.sources import TrainData
from harness.model.gpt import STATS_HEAD
from harness.monitor.detector import OVERFLOW
from harness.train.engine import Built
from harness.train.grad_norms import GradNorms
from harness.train.skip_step import skip_update

N_MEANS = STATS_HEAD.index("lse_max")  # forward_stats: [ce, z_sq] are means, the rest maxima


def clip_values(params, value: float, scale: float, norm: float) -> None:
    """clip.value: clamp each gradient entry to +-value. Gradients that still carry a loss
    scale (fp16) are clamped at value x scale. Nothing is touched when `norm` (the pre-clip
    norm) is inf/NaN: those entries are what DeepSpeed's overflow check looks for, and a clamp
    would make them finite, so the scale would never drop. A bound at or over the largest
    finite value of the gradient's dtype (65504 in fp16: 1.0 x the default scale 65536) bounds
    nothing finite, and is skipped rather than converted (which raises)."""
    if not math.isfinite(norm):
        return
    bound = value * scale
    for p in params:
        g = p.grad
        if g is not None and bound < torch.finfo(g.dtype).max:
            g.clamp_(-bound, bound)


class Trainer:
    def __init__(self, cfg: Config, built: Built, data: TrainData,
                 callbacks: Iterable[Callback] = ()):
        self.cfg, self.built, self.data = cfg, built, data
        self.engine, self.plan = built.engine, built.plan
        self.callbacks = sorted(callbacks, key=lambda c: c.order)
        self.step = 0  # optimizer steps taken
        self.consumed_samples = 0  # global data position; may run ahead of step x batch
        self.stop_reason: str | None = None
        self.stop_signals = None  # harness.train.preemption.StopSignals when signals should stop us
        self.skip_update = False  # set by a callback in on_before_step
        rank = built.dist.rank
        self.norms = GradNorms(self.engine, built.comm, self.plan.dp_rank(rank),
                               self.plan.tp_rank(rank))
        # a pass over the optimizer state (6 foreach ops), made only for the monitor; its share
        # of a step falls with the tokens per rank per step (see bench/README.md)
        self.measure_update = cfg.monitor.enabled and cfg.monitor.watches("optim/update_norm")
        # a data mixture's sources (empty without one): train/loss/<source> (module doc)
        self.source_names: tuple[str, ...] = data.source_names
        if self.source_names:
            self.engine.module.keep_row_losses(True)
        # this step's per source [CE sum, tokens] of this rank's rows, on the device: filled by
        # _forward_backward, all-reduced by _reduced_scalars (None without a mix)
        self.source_sums: torch.Tensor | None = None

    @property
    def is_main(self) -> bool:
        return self.built.dist.rank == 0

    # ---- one optimizer step -------------------------------------------------------------
    def _forward_backward(self) -> torch.Tensor:
        """The micro-steps; returns the model's forward statistics (BlockStack.forward_stats)
        combined over them: means averaged, maxima maxed. With a mixture it also fills
        self.source_sums."""
        accum = self.plan.batch.grad_accum
        stats = []
        if self.source_names:
            self.source_sums = torch.zeros(len(self.source_names), 2, dtype=torch.float64,
                                           device=self.engine.device)
        for k in range(accum):
            x, y = self.data.micro_batch(self.consumed_samples, k)
            loss = self.engine(x, y)
            if self.source_names:
                self._add_rows(k, y.shape[1])
            self.engine.backward(loss)
            stats.append(self.engine.module.forward_stats())
            if k < accum - 1:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        stacked = torch.stack(stats)
        return torch.cat((stacked[:, :N_MEANS].sum(0) / accum, stacked[:, N_MEANS:].amax(0)))

    def _add_rows(self, micro_step: int, tokens: int) -> None:
        """Adds micro-step `micro_step`'s rows' summed CE and token counts to source_sums[s] of
        their source s, on the device (no host read)."""
        host = torch.from_numpy(np.ascontiguousarray(
            self.data.sources(self.consumed_samples, micro_step), dtype=np.int64))
        if self.engine.device.type == "cuda":  # from pageable memory the copy would block
            host = host.pin_memory()
        index = host.to(self.engine.device, non_blocking=True)
        rows = self.engine.module.row_losses().double()
        self.source_sums.index_add_(0, index, torch.stack((rows, torch.full_like(rows, tokens)), 1))

    def _reduced_scalars(self, stats: torch.Tensor) -> dict[str, Any]:
        """The step's one all-reduce and one device-to-host copy: the forward statistics' means
        (loss, log(Z)^2), the stop flag, per-group squared pre-clip norms, and a slot per rank
        for what is maxed over ranks (max log Z, logit bounds); with a mixture source_sums."""
        dist, device = self.built.dist, self.engine.device
        maxed = torch.zeros(dist.world_size, len(stats) - N_MEANS, device=device)
        maxed[dist.rank] = stats[N_MEANS:]
        flag = (self.stop_signals.flag(device) if self.stop_signals is not None
                else torch.zeros(1, device=device))  # the same call with or without signals
        parts = {"means": stats[:N_MEANS] / dist.world_size, "stop": flag,
                 "sq": self.norms.local_squares(), "maxed": maxed}
        per_source = self.source_sums if self.source_names else None
        if per_source is not None:
            parts["sources"] = per_source
        out = self.built.comm.reduce_scalars(parts)
        if out["stop"].item() > 0:  # every rank sees the same sum: all stop after this step
            self.stop_reason = f"signal {self.stop_signals.received or 'on another rank'}"
        means = out["means"]
        if per_source is not None:  # read with the means: no read more than without a mix
            means = torch.cat((means, out["sources"].reshape(-1)))
        means, maxed = means.tolist(), out["maxed"].amax(dim=0).tolist()
        bounds = maxed[1:]
        signals = {"train/loss": means[0], "train/z_loss": means[1],
                   "model/logit_lse_max": maxed[0], "model/attn_logit_bound": max(bounds),
                   **{f"model/attn_logit_bound/layer_{i}": b for i, b in enumerate(bounds)},
                   **self.norms.signals(out["sq"])}
        if per_source is not None:
            signals.update(self._source_losses(means[N_MEANS:]))
        if self.engine.fp16_enabled():  # the scale the step's gradients carry
            signals["optim/loss_scale"] = float(self.engine.optimizer.loss_scale)
            # an inf/NaN gradient is what DeepSpeed's loss scaler checks for: it will skip this
            # step and lower the scale; the monitor reads it as that, not as a nonfinite alarm
            signals[OVERFLOW] = not math.isfinite(signals["optim/grad_norm_preclip"])
        return signals

    def _source_losses(self, sums: list[float]) -> dict[str, float]:
        """train/loss/<source> from the all-reduced per-source [CE sum, token count] pairs,
        flattened; a source without tokens this step has no key."""
        return {f"train/loss/{name}": sums[2 * i] / sums[2 * i + 1]
                for i, name in enumerate(self.source_names) if sums[2 * i + 1] > 0}

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        lr = self.engine.get_lr()[0]
        signals = self._reduced_scalars(self._forward_backward())
        self.skip_update = False
        for cb in self.callbacks:
            cb.on_before_step(self, self.step + 1, signals)
        skipped = self.skip_update
        if skipped and not signals.get(OVERFLOW):
            skip_update(self.engine)
        else:  # an fp16 overflow goes to engine.step() even when skipped: it lowers the scale
            if self.cfg.clip.value is not None:
                clip_values(self.engine.module.parameters(), self.cfg.clip.value,
                            self._loss_scale(), signals["optim/grad_norm_preclip"])
            self._engine_step(signals)  # boundary: clip by norm, update, advance the schedule
            if not self.engine.was_step_applied():  # fp16 overflow: DeepSpeed skipped it
                skipped = True
                # ...and left its LR schedule behind; ours follows the step count, as after a
                # monitor skip, so the schedule is the same function of the step in every run
                self.engine.lr_scheduler.step()
        self.step += 1
        self.consumed_samples += self.plan.batch.global_batch
        update, more = None, {}
        if self.measure_update:  # the monitor reads them after the step: one more sync
            # update norm, parameter norm and jump, per-group update ratios (grad_norms.py)
            more = {} if skipped else self.norms.update_metrics(lr, self.cfg.monitor.update_sample)
            update = more.pop("optim/update_norm", 0.0)
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize()  # the step's time, not its launch time
        return {**self._metrics(signals, lr, update, skipped, time.perf_counter() - t0), **more}

    def _loss_scale(self) -> float:
        return float(self.engine.optimizer.loss_scale) if self.engine.fp16_enabled() else 1.0

    def _engine_step(self, signals: dict[str, Any]) -> None:
        """engine.step(); DeepSpeed's loss scaler refusing to go below its minimum (the
        gradient is inf/NaN at every scale) becomes a monitor event and one error line."""
        try:
            self.engine.step()
        except Exception as err:
            if "cannot decrease scale" not in str(err):
                raise
            scale = signals.get("optim/loss_scale", self._loss_scale())
            self.emit({"event": "loss_scale_min", "level": "alarm", "step": self.step + 1,
                       "signal": "optim/loss_scale", "value": scale, "action": "stop"})
            raise HarnessError(
                f"fp16: step {self.step + 1} overflowed at the minimum loss scale {scale:g} "
                f"(fp16.min_loss_scale): its gradient is inf/NaN at any scale, so the run "
                f"stops; resume from an earlier checkpoint with a lower optim.lr, or use "
                f"train.precision=bf16") from None

    def _metrics(self, signals: dict[str, Any], lr: float, update: float, skipped: bool,
                 dt: float) -> dict[str, Any]:
        max_norm, norm = self.cfg.clip.max_norm, signals["optim/grad_norm_preclip"]
        # DeepSpeed's rule: scale by max_norm / (norm + 1e-6) when that is below 1
        coef = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
        tokens = self.plan.tokens_per_step
        return {
            "step": self.step,
            **signals,
            "optim/clip_coef": coef,
            "optim/clipped": coef < 1.0,
            "optim/lr": lr,
            **({"optim/update_norm": update} if update is not None else {}),
            "optim/skipped": skipped,
            "train/tokens_seen": self.consumed_samples * self.plan.seq_len,
            "throughput/step_time_s": dt,
            "throughput/tokens_per_s": tokens / dt,
            "throughput/samples_per_s": self.plan.batch.global_batch / dt,
        }

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> None:
        for cb in self.callbacks:
            cb.on_train_start(self)
        while self.step < self.cfg.train.max_steps and self.stop_reason is None:
            metrics = self.train_step()
            step = self.step  # every callback sees this step, even if one rolls back
            for cb in self.callbacks:
                cb.on_step_end(self, step, metrics)
        for cb in self.callbacks:
            cb.on_train_end(self)

    def emit(self, event: dict[str, Any]) -> None:
        """Broadcast a monitor event to every callback (loggers write it)."""
        for cb in self.callbacks:
            cb.on_event(self, self.step, event)
