"""Online loss/gradient spike detector: warnings from precursor signals, confirmed loss spikes.

Two-phase API, because the trainer can only skip an update it has not applied yet:

    det = SpikeDetector(cfg)
    events = det.check_pre_step(step, {"train/loss": l, "optim/grad_norm_preclip": g, ...})
    if any(e["action"] == "skip" for e in events): ...don't call engine.step()...
    events += det.check_post_step(step, {"optim/update_norm": u})
    scale = det.lr_scale(step)  # < 1 while an lr_cut is active

Each signal has its own statistics, so one step may be split over both calls in any way; the
phase only decides whether an event may carry action "skip". Within one call the precursors
are read before the loss, so a warning in the same step as the loss rise counts (lead 0).

Method, per signal, on log values (spikes are multiplicative and log makes drift additive):
- stat=median_mad (default): a robust line through the last `window` values, its level and
  slope from the medians of the two half-windows, extrapolated to this step; spread = 1.4826 x
  MAD of the residuals. Medians ignore a short spike (it cannot poison the baseline) and the
  slope removes the lag and the widened spread a trend would otherwise cause (a loss still
  falling, a grad norm growing over training).
- stat=ema: Brown's double exponential smoothing (level + trend, discount ema_alpha) and an EMA
  of squared errors, with errors clipped to +- z spreads before they update anything.
- The spread is floored at `min_scale`, so near-constant signals do not alarm on tiny changes.
- z = (log x - baseline) / spread, one-sided upwards. No alarm before `warmup_steps` or before a
  signal has window/2 values. Loss-scale keys instead count halvings below their window max.
- Confirmation (signals matching `confirm_signals`, default the gradient norms): a level
  excursion warns only on its `grad_confirm`-th consecutive step at or over grad_z (default
  2: a one-step blip is what clipping absorbs; a real log has dozens), or at once when the
  value is >= `grad_at_once` x its baseline (a catastrophic gradient, which `skip` should drop
  before it is applied). An unconfirmed step is no event and opens no episode.
- NaN/inf in any watched signal is a `nonfinite` event at once (value "nan"/"inf"/"-inf").
- Trend rule (signals matching `trend_signals`): the line's rise over one window, exp(slope x
  window), at or above `trend_growth` is a warning too: a steady ramp (an LR schedule gone
  wrong, Adam's update growing step after step) moves the line with it and never scores a high
  z. Once it has warned, it warns again every `episode_gap` steps for as long as the line keeps
  rising at all, so the episode stays open until the loss spike it leads to; it re-arms when
  the line stops rising. Armed once a whole window lies after `trend_after` (default: the end
  of the LR warm-up, whose rise it would otherwise flag).

- Ceiling rule (monitor.attn_ceiling on model/attn_logit_bound, default 100):
  a value at or above its ceiling is a warning (rule "ceiling"), repeated every episode_gap
  steps while the value stays above half the ceiling; no statistics, so a growth that started
  in warm-up (before any window is full) is still caught once the monitor arms.

- Parameter jump (signal optim/param_jump, from harness.train.grad_norms): a value at or above
  `param_jump` is a `param_jump` alarm at once, in warm-up too: the weights changed between
  two steps by more than rounding, outside the optimizer (no statistics: healthy is 0).
- LR warm-up: `trend_after` (null in a replay: the first step whose optim/lr does not rise)
  ends it; loss spikes are confirmed only after it (before, the loss's steps over loss_z are
  warnings), and the trend rule arms one window after it.

Levels: every event has "level": "alarm" for loss_spike, nonfinite and param_jump (what
wandb.alert and lr_cut / rollback / stop follow), "warning" for grad_spike (precursors: what
`skip` may act on; a metric and an event line otherwise).

Events (dicts, JSON-able; every one has "event", "level", "step", "signal", "action"):
- grad_spike: the one kind of every warning, whatever its signal (the name is kept: it is
  what monitor.act_on and the monitor/grad_spike metric say); `signal` names the metric. A
  precursor crossed its threshold (rule "level", confirmed where it must be;
  one event per excursion: the signal re-arms only once z falls below threshold / 2; fields
  value, z, threshold, baseline, episode; a loss scale's z and threshold count halvings),
  or its trend did (rule "trend"; fields value, growth, threshold (x per window), episode),
  or a ceiling was reached (rule "ceiling"; fields value, ceiling, episode).
  harness.monitor.events.describe says any event in one sentence.
- loss_spike: the loss stayed >= loss_z for loss_persist consecutive observations (one hard
  batch is not a spike); re-arms like grad_spike. The first of those steps is a grad_spike
  warning with signal = the loss and field persist = loss_persist (so `skip` can drop that
  batch's update at once); it joins
  no episode, so lead_steps still measures the precursors' lead. `onset` is that first step;
  `warned_at` is the first warning of the open episode or None, `warned_by` its signals;
  lead_steps = onset - warned_at (0: same step; negative: the warning came after the loss
  had started to rise).
- Episode: warnings (and non-finite precursors) at most `episode_gap` steps apart form one
  episode; a loss_spike closes it.
- action: cfg.action when the event kind is in cfg.resolved_act_on(), else None; "skip" only
  from check_pre_step, and only for an excursion's one warning (its first step, or for a
  confirm signal its confirming step: skipping every step of a real level shift would stall
  training); "rollback" turns into "stop" after max_rollbacks
  rewinds.
- fp16 overflow: a step whose signals carry `optim/overflow` true (the trainer sets it under
  fp16 when the gradient holds inf/NaN, which DeepSpeed's loss scaler skips and answers by
  lowering the scale) has inf/NaN gradient norms by design: those are left out (no event, no
  statistics); the loss scale's halving rule is what watches overflows. Any other inf/NaN
  (the loss, a logit signal, a finite-scale gradient under bf16/fp32) stays an alarm.
"""
from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Any, Optional

from harness.config.monitor import ALARMS, PARAM_JUMP, MonitorConfig
from harness.monitor.stats import EMA, Halvings, MedianMAD, Signal

WARM_FLAT = 10  # steps without a new LR maximum that end an inferred warm-up
OVERFLOW = "optim/overflow"  # true on an fp16 step the loss scaler will skip
GRAD_NORMS = ("optim/grad_norm_preclip", "grad_norm/*")  # inf/NaN by design on such a step


class SpikeDetector:
    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg.validate()
        self._act_on = set(cfg.resolved_act_on())
        self._kinds: dict[str, Optional[str]] = {}  # metric key -> "loss" | "precursor" | None
        self.signals: dict[str, Signal] = {}
        self.episode: Optional[dict[str, Any]] = None
        self.n_episodes = 0
        self.rollbacks = 0
        self.lr_cut_until = -1
        # the end of the LR warm-up: configured, or inferred from optim/lr (None: not yet)
        self.warm_end: Optional[int] = cfg.trend_after
        self.last_lr: Optional[tuple[float, int]] = None  # the LR's maximum so far, its step

    # ---- public API -------------------------------------------------------------------
    def check_pre_step(self, step: int, signals: dict[str, float]) -> list[dict[str, Any]]:
        """Signals known before the optimizer step (loss, grad norms, loss scale)."""
        return self._update(step, signals, can_skip=True)

    def check_post_step(self, step: int, signals: dict[str, float]) -> list[dict[str, Any]]:
        """Signals known only after the optimizer step (update norm)."""
        return self._update(step, signals, can_skip=False)

    def lr_scale(self, step: int) -> float:
        return self.cfg.lr_cut_factor if step < self.lr_cut_until else 1.0

    def state_dict(self) -> dict[str, Any]:
        sigs = {k: {"stat": s.stat.state_dict(), "run": s.run, "onset": s.onset, "hot": s.hot,
                    "trend_at": s.trend_at, "ceil_at": s.ceil_at}
                for k, s in self.signals.items()}
        ep = self.episode
        episode = None if ep is None else dict(ep, signals=list(ep["signals"]))
        return {"version": 3, "stat": self.cfg.stat, "signals": sigs, "episode": episode,
                "n_episodes": self.n_episodes, "rollbacks": self.rollbacks,
                "lr_cut_until": self.lr_cut_until, "warm_end": self.warm_end,
                "last_lr": None if self.last_lr is None else list(self.last_lr)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); statistics of another `stat` kind are dropped (relearned)."""
        self.signals = {}
        same_stat = state.get("stat") == self.cfg.stat
        for name, s in state["signals"].items() if same_stat else ():
            sig = self._new_signal(name)
            sig.stat.load_state_dict(s["stat"])
            sig.run, sig.onset, sig.hot = int(s["run"]), int(s["onset"]), bool(s["hot"])
            sig.trend_at = int(s.get("trend_at", -1))  # absent before the trend rule
            sig.ceil_at = int(s.get("ceil_at", -1))  # absent before the ceiling rule
            self.signals[name] = sig
        ep = state["episode"]
        self.episode = None if ep is None else dict(ep, signals=list(ep["signals"]))
        self.n_episodes = int(state["n_episodes"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_cut_until = int(state["lr_cut_until"])
        if self.cfg.trend_after is None:  # absent before version 3: inferred again
            self.warm_end = state.get("warm_end")
            top = state.get("last_lr")
            self.last_lr = None if top is None else (float(top[0]), int(top[1]))

    def rewind(self, state: dict[str, Any]) -> None:
        """After a rollback: statistics from the checkpoint, but this rollback is counted."""
        done = self.rollbacks + 1
        self.load_state_dict(state)
        self.rollbacks = done

    # ---- internals ----------------------------------------------------------------------
    def _kind(self, name: str) -> Optional[str]:
        if name not in self._kinds:
            if name == self.cfg.loss_signal:
                self._kinds[name] = "loss"
            elif name == PARAM_JUMP and any(fnmatchcase(name, p) for p in self.cfg.signals):
                self._kinds[name] = "jump"
            elif any(fnmatchcase(name, p) for p in [*self.cfg.signals, *self.cfg.ceilings()]):
                self._kinds[name] = "precursor"
            else:
                self._kinds[name] = None
        return self._kinds[name]

    def _new_signal(self, name: str) -> Signal:
        cfg = self.cfg
        if name.endswith("loss_scale"):
            return Signal(Halvings(cfg.window), float(cfg.loss_scale_halvings))
        threshold = cfg.loss_z if name == cfg.loss_signal else cfg.grad_z
        trend = any(fnmatchcase(name, p) for p in cfg.trend_signals)
        confirmed = name != cfg.loss_signal and any(fnmatchcase(name, p)
                                                    for p in cfg.confirm_signals)
        confirm = (cfg.grad_confirm, math.log(cfg.grad_at_once)) if confirmed else (1, math.inf)
        if cfg.stat == "ema":
            stat = EMA(cfg.ema_alpha, cfg.min_scale, cfg.window)
        else:
            stat = MedianMAD(cfg.window, cfg.min_scale)
        sig = Signal(stat, threshold, trend, *confirm)
        sig.ceiling = cfg.ceilings().get(name)
        return sig

    def _warm_up(self, step: int, signals: dict[str, float]) -> bool:
        """Whether `step` is still in the LR warm-up. Unless configured, its end is the step
        the LR last reached a new maximum, once none has come for WARM_FLAT steps (logged LRs
        are rounded: two equal values in a row happen inside a warm-up)."""
        lr = signals.get("optim/lr")
        if self.warm_end is None and lr is not None and math.isfinite(lr):
            top = self.last_lr
            if top is None or lr > top[0]:
                self.last_lr = top = (float(lr), step)
            elif step - top[1] >= WARM_FLAT:
                self.warm_end = top[1]
        if self.warm_end is None:  # no LR seen yet: nothing to wait for
            return self.last_lr is not None
        return step < self.warm_end

    def _update(self, step: int, signals: dict[str, float], can_skip: bool) -> list[dict]:
        self._warming = self._warm_up(step, signals)
        overflow = bool(signals.get(OVERFLOW))
        watched = [(k, v) for k, v in signals.items()
                   if v is not None and self._kind(k) is not None
                   and not (overflow and _overflowed(k, v))]
        watched.sort(key=lambda kv: (self._kind(kv[0]) == "loss", kv[0]))  # loss last
        events: list[dict[str, Any]] = []
        for name, value in watched:
            ev = self._observe(step, name, float(value))
            if ev is not None:
                ev["level"] = "alarm" if ev["event"] in ALARMS else "warning"
                ev["action"] = self._action(ev["event"], step, can_skip)
                events.append(ev)
        return events

    def _observe(self, step: int, name: str, x: float) -> Optional[dict[str, Any]]:
        is_loss = self._kind(name) == "loss"
        if not math.isfinite(x):
            ev = {"event": "nonfinite", "step": step, "signal": name, "value": str(x)}
            if not is_loss:
                ev["episode"] = self._touch_episode(step, name)
            return ev
        if self._kind(name) == "jump":
            return self._jump(step, name, x)
        if x <= 0:  # log space needs positive values; a zero norm says nothing about spikes
            return None
        sig = self.signals.get(name)
        if sig is None:
            sig = self.signals[name] = self._new_signal(name)
        lx = math.log(x)
        armed = step >= self.cfg.warmup_steps and sig.stat.count() >= self.cfg.window // 2
        z, center = sig.stat.score(lx) if armed else (0.0, lx)
        # only once the whole window lies after trend_after (the LR warm-up's rise)
        trending = (armed and sig.trend and not self._warming
                    and step >= (self.warm_end or 0) + self.cfg.window)
        growth = sig.stat.growth() if trending else None
        sig.stat.push(lx, sig.threshold if armed else None)
        ev = self._level(step, name, x, sig, z, center, is_loss)
        if ev is None and growth is not None:
            ev = self._trend(step, name, x, sig, growth)
        if sig.ceiling is not None and step >= self.cfg.warmup_steps:
            ev = self._ceiling(step, name, x, sig) or ev  # always updates its own state
        return ev

    def _level(self, step: int, name: str, x: float, sig: Signal, z: float, center: float,
               is_loss: bool) -> Optional[dict[str, Any]]:
        if z < sig.threshold / 2:
            sig.hot = False
        if z < sig.threshold:
            sig.run = 0
            return None
        sig.run += 1
        if sig.run == 1:
            sig.onset = step
        if not is_loss and sig.run < sig.confirm and math.log(x) - center < sig.at_once:
            return None  # not confirmed yet: no event, and it opens no episode
        episode = None if is_loss else self._touch_episode(step, name)
        if is_loss and sig.run not in (1, self.cfg.loss_persist):
            return None  # the loss fires on its first step over and the persist-th
        if sig.hot:  # a precursor fires once per excursion (re-armed below threshold / 2)
            return None
        base = {"step": step, "signal": name, "value": x, "z": round(z, 3),
                "threshold": sig.threshold, "baseline": float(f"{math.exp(center):.6g}")}
        if is_loss and sig.run < self.cfg.loss_persist:  # its first step over: a warning
            # `persist`: the steps over that confirm a loss_spike (this is the first of them)
            return dict(base, event="grad_spike", rule="level", episode=None,
                        persist=self.cfg.loss_persist)
        if is_loss and self._warming:  # not confirmed in the LR warm-up: warnings only
            return None
        sig.hot = True
        if is_loss:
            return self._confirm(base, sig)
        return dict(base, event="grad_spike", rule="level", episode=episode)

    def _jump(self, step: int, name: str, x: float) -> Optional[dict[str, Any]]:
        sig = self.signals.get(name)
        if sig is None:
            sig = self.signals[name] = Signal(MedianMAD(2, 0.0), self.cfg.param_jump)
        if x < sig.threshold:
            sig.hot = False
            return None
        if sig.hot:  # one alarm per excursion
            return None
        sig.hot = True
        return {"event": "param_jump", "step": step, "signal": name, "value": x,
                "threshold": sig.threshold, "episode": self._touch_episode(step, name)}

    def _trend(self, step: int, name: str, x: float, sig: Signal,
               growth: float) -> Optional[dict[str, Any]]:
        limit = math.log(self.cfg.trend_growth)
        if growth <= 0:  # the line has stopped rising: re-arm
            sig.trend_at = -1
        rising = sig.trend_at >= 0  # still rising since the last warning: remind, don't wait
        if (not rising and growth < limit) or (
                rising and step - sig.trend_at < self.cfg.episode_gap):
            return None
        sig.trend_at = step
        return {"event": "grad_spike", "rule": "trend", "step": step, "signal": name,
                "value": x, "growth": round(math.exp(growth), 3),
                "threshold": self.cfg.trend_growth, "episode": self._touch_episode(step, name)}

    def _ceiling(self, step: int, name: str, x: float,
                 sig: Signal) -> Optional[dict[str, Any]]:
        """An absolute limit: warns on reaching it, reminds every episode_gap steps while the
        value stays over half of it (hysteresis, so hovering at the limit is one episode)."""
        if x < sig.ceiling / 2:
            sig.ceil_at = -1
        if x < sig.ceiling and sig.ceil_at < 0:
            return None
        if sig.ceil_at >= 0 and step - sig.ceil_at < self.cfg.episode_gap:
            return None
        sig.ceil_at = step
        return {"event": "grad_spike", "rule": "ceiling", "step": step, "signal": name,
                "value": x, "ceiling": sig.ceiling, "episode": self._touch_episode(step, name)}

    def _open_episode(self, step: int) -> Optional[dict[str, Any]]:
        ep = self.episode
        if ep is not None and 0 <= step - ep["last"] <= self.cfg.episode_gap:
            return ep
        return None

    def _touch_episode(self, step: int, name: str) -> int:
        ep = self._open_episode(step)
        if ep is None:
            self.n_episodes += 1
            ep = self.episode = {"id": self.n_episodes, "start": step, "last": step,
                                 "signals": []}
        ep["last"] = step
        if name not in ep["signals"]:
            ep["signals"].append(name)
        return ep["id"]

    def _confirm(self, base: dict[str, Any], sig: Signal) -> dict[str, Any]:
        ep = self._open_episode(base["step"])
        self.episode = None  # this spike consumes the episode: the next warning starts anew
        warned = None if ep is None else ep["start"]
        lead = None if warned is None else sig.onset - warned
        return dict(base, event="loss_spike", onset=sig.onset, warned_at=warned,
                    lead_steps=lead, episode=None if ep is None else ep["id"],
                    warned_by=[] if ep is None else list(ep["signals"]))

    def _action(self, kind: str, step: int, can_skip: bool) -> Optional[str]:
        action = self.cfg.action
        if kind not in self._act_on or (action == "skip" and not can_skip):
            return None
        if action == "rollback" and self.rollbacks >= self.cfg.max_rollbacks:
            return "stop"
        if action == "lr_cut":
            self.lr_cut_until = step + self.cfg.lr_cut_steps
        return action


def _overflowed(name: str, value: float) -> bool:
    """A gradient norm made inf/NaN by an fp16 overflow (the loss scaler's business)."""
    return not math.isfinite(float(value)) and any(fnmatchcase(name, p) for p in GRAD_NORMS)
