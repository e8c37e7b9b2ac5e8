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
- Once per episode (issue 25: a warning means "look now"): every rule of a signal speaks once,
  then stays silent until the signal has been back at its baseline for `rearm_steps` steps in
  a row (level rules: z < `rearm_z`, or under half the threshold if that is lower; trend and
  growth rules: under half their threshold in log units). A value that hovers at a threshold,
  a ramp that keeps rising, a bound that stays high: one warning each.
- Trend rule (signals matching `trend_signals`): the line's rise over one window, exp(slope x
  window), at or above `trend_growth` is a warning too: a steady ramp (an LR schedule gone
  wrong, Adam's update growing step after step) moves the line with it and never scores a high
  z. Armed once a whole window lies after `trend_after` (default: the end of the LR warm-up,
  whose rise it would otherwise flag).
- Growth rule (signals matching `growth_signals`, default model/attn_logit_bound): the value
  at >= `growth_ratio` x its own value `growth_span` steps before (the median of `growth_ref`
  values ending there): a growth RATE, so a bound that grows as much over a whole healthy run
  stays quiet. No window and no warmup_steps: it arms as soon as those values exist, in the LR
  warm-up, where attention-logit growth starts.
- Ceiling (monitor.attn_ceiling on model/attn_logit_bound, default 100): the bound at or over
  it is a condition of the rest of the run, not an event: one `advice` (rule "ceiling") when
  first seen, at any step, never repeated, no episode, no action.

- Parameter jump (signal optim/param_jump, from harness.train.grad_norms): a value at or above
  `param_jump` is a `param_jump` alarm at once, in warm-up too: the weights changed between
  two steps by more than rounding, outside the optimizer (no statistics: healthy is 0).
- LR warm-up: `trend_after` (null in a replay: the first step whose optim/lr does not rise)
  ends it; loss spikes are confirmed only after it, and the trend rule arms one window after.

Levels: every event has "level": "alarm" for loss_spike, nonfinite and param_jump (what
wandb.alert and lr_cut / rollback / stop follow), "warning" for `warning` (precursors: what
`skip` may act on; a metric and an event line otherwise), "advice" for `advice`.

Events (dicts, JSON-able; every one has "event", "level", "step", "signal", "action"):
- warning: the one kind of every precursor warning, whatever its signal (issue 25 renamed it
  from grad_spike; monitor.act_on refuses the old name with the new one); `signal` names the
  metric. A precursor crossed its threshold (rule "level", confirmed where it must be; fields
  value, z, threshold, baseline, episode; a loss scale's z and threshold count halvings),
  or its trend did (rule "trend"; fields value, growth, threshold (x per window), episode),
  or its growth rate did (rule "growth"; fields value, growth, threshold, span, reference,
  episode). harness.monitor.events.describe says any event in one sentence.
- advice: a condition that holds for the rest of the run (rule "ceiling": fields value,
  ceiling; rule "qk_norm": no qk-norm at a peak LR >= monitor.qk_norm_lr, said at start-up by
  harness.callbacks.spike_monitor, fields value (the LR), lr). Never acted on.
- loss_spike: the loss stayed >= loss_z for loss_persist consecutive observations (one hard
  batch is not a spike), after the LR warm-up; once per episode like the warnings. The first
  of those steps is no event unless the loss is >= `loss_at_once` x its baseline (a broken
  batch, not a hard one): then it is a `warning` with signal = the loss and field persist =
  loss_persist (so `skip` can drop that batch's update at once); it joins no episode, so
  lead_steps still measures the precursors' lead. `onset` is the first step over;
  `warned_at` is the first warning of the open episode or None, `warned_by` its signals;
  lead_steps = onset - warned_at (0: same step; negative: the warning came after the loss
  had started to rise).
- Episode: warnings (and non-finite precursors) at most `episode_gap` steps apart form one
  episode; it also stays open, in silence, while a signal that warned in it is not back at its
  baseline (a ramp still rising, a bound still growing); a loss_spike closes it.
- action: cfg.action when the event kind is in cfg.resolved_act_on(), else None; "skip" only
  from check_pre_step, and only for an excursion's one warning (its first step, or for a
  confirm signal its confirming step: skipping every step of a real level shift would stall
  training); "rollback" turns into "stop" after max_rollbacks rewinds.
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
from harness.monitor.rules import grows, qk_norm_advice, trend
from harness.monitor.stats import EMA, Halvings, MedianMAD, Signal

__all__ = ["SpikeDetector", "qk_norm_advice"]

WARM_FLAT = 10  # steps without a new LR maximum that end an inferred warm-up
OVERFLOW = "optim/overflow"  # true on an fp16 step the loss scaler will skip
GRAD_NORMS = ("optim/grad_norm_preclip", "grad_norm/*")  # inf/NaN by design on such a step
LEVELS = {**{k: "alarm" for k in ALARMS}, "advice": "advice"}  # any other kind: "warning"


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
        sigs = {k: {"stat": s.stat.state_dict(), **s.state()} for k, s in self.signals.items()}
        ep = self.episode
        episode = None if ep is None else dict(ep, signals=list(ep["signals"]))
        return {"version": 4, "stat": self.cfg.stat, "signals": sigs, "episode": episode,
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
            sig.load(s)
            if int(s.get("ceil_at", -1)) >= 0:  # version 3: the ceiling had warned
                sig.advised = True
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
            cfg = self.cfg
            if name == cfg.loss_signal:
                self._kinds[name] = "loss"
            elif name == PARAM_JUMP and any(fnmatchcase(name, p) for p in cfg.signals):
                self._kinds[name] = "jump"
            elif any(fnmatchcase(name, p) for p in [*cfg.signals, *cfg.ceilings(),
                                                     *cfg.trend_signals, *cfg.growth_signals]):
                self._kinds[name] = "precursor"
            else:
                self._kinds[name] = None
        return self._kinds[name]

    def _new_signal(self, name: str) -> Signal:
        cfg = self.cfg
        if name.endswith("loss_scale"):
            return Signal(Halvings(cfg.window), float(cfg.loss_scale_halvings))
        is_loss = name == cfg.loss_signal
        # a signal only the trend, growth or ceiling rules watch has no level rule (z < inf)
        level = is_loss or any(fnmatchcase(name, p) for p in cfg.signals)
        threshold = (cfg.loss_z if is_loss else cfg.grad_z) if level else math.inf
        trend = any(fnmatchcase(name, p) for p in cfg.trend_signals)
        confirmed = not is_loss and any(fnmatchcase(name, p) for p in cfg.confirm_signals)
        confirm = (cfg.grad_confirm, math.log(cfg.grad_at_once)) if confirmed else (1, math.inf)
        if is_loss:  # one step over: a warning only at loss_at_once x the baseline
            confirm = (1, math.log(cfg.loss_at_once))
        if cfg.stat == "ema":
            stat = EMA(cfg.ema_alpha, cfg.min_scale, cfg.window)
        else:
            stat = MedianMAD(cfg.window, cfg.min_scale)
        sig = Signal(stat, threshold, trend, *confirm)
        sig.ceiling = cfg.ceilings().get(name)
        sig.grows = any(fnmatchcase(name, p) for p in cfg.growth_signals)
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
            for ev in self._observe(step, name, float(value)):
                ev["level"] = LEVELS.get(ev["event"], "warning")
                ev["action"] = self._action(ev["event"], step, can_skip)
                events.append(ev)
        return events

    def _observe(self, step: int, name: str, x: float) -> list[dict[str, Any]]:
        is_loss = self._kind(name) == "loss"
        if not math.isfinite(x):
            ev = {"event": "nonfinite", "step": step, "signal": name, "value": str(x)}
            if not is_loss:
                ev["episode"] = self._touch_episode(step, name)
            return [ev]
        if self._kind(name) == "jump":
            return _some(self._jump(step, name, x))
        if x <= 0:  # log space needs positive values; a zero norm says nothing about spikes
            return []
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
        events = _some(self._level(step, name, x, sig, z, center, is_loss))
        for rule in (trend(self.cfg, sig, growth) if growth is not None else None,
                     grows(self.cfg, sig, x) if sig.grows else None):
            if rule is not None:  # a rule's warning joins this step's episode
                events.append({"event": "warning", **rule, "step": step, "signal": name,
                               "value": x, "episode": self._touch_episode(step, name)})
        # a signal that warned and is not back at its baseline keeps its episode open in
        # silence, so a loss spike it leads to still names it (warned_at, lead_steps)
        if not is_loss and ((sig.hot and sig.calm == 0)
                            or (sig.trend_hot and sig.trend_calm == 0 and growth is not None)
                            or (sig.grow_hot and sig.grow_calm == 0)):
            ep = self._open_episode(step)
            if ep is not None:
                ep["last"] = step
        if sig.ceiling is not None and x >= sig.ceiling and not sig.advised:
            sig.advised = True  # a condition of the rest of the run: said once, no episode
            events.append({"event": "advice", "rule": "ceiling", "step": step, "signal": name,
                           "value": x, "ceiling": sig.ceiling})
        return events

    def _rearm(self, sig: Signal, z: float) -> None:
        """Back at its baseline (z < rearm_z, or half the threshold if lower: a loss scale's
        halvings) for rearm_steps steps in a row: the level rule may warn again."""
        sig.calm = sig.calm + 1 if z < min(sig.rearm, self.cfg.rearm_z) else 0
        if sig.calm >= self.cfg.rearm_steps:
            sig.hot = sig.warned = False

    def _level(self, step: int, name: str, x: float, sig: Signal, z: float, center: float,
               is_loss: bool) -> Optional[dict[str, Any]]:
        self._rearm(sig, z)
        if z < sig.threshold:
            sig.run = 0
            return None
        sig.run += 1
        if sig.run == 1:
            sig.onset = step
        at_once = math.log(x) - center >= sig.at_once
        if not is_loss and sig.run < sig.confirm and not at_once:
            return None  # not confirmed yet: no event, and it opens no episode
        base = {"step": step, "signal": name, "value": x, "z": round(z, 3),
                "threshold": sig.threshold, "baseline": float(f"{math.exp(center):.6g}")}
        if is_loss and sig.run < self.cfg.loss_persist:
            if sig.run > 1 or not at_once or sig.warned or sig.hot:
                return None  # one hard batch (under loss_at_once x the baseline): no event
            sig.warned = True  # a loss jump this large: warned (and skippable) at once
            # `persist`: the steps over that confirm a loss_spike (this is the first of them)
            return dict(base, event="warning", rule="level", episode=None,
                        persist=self.cfg.loss_persist)
        if sig.hot or (is_loss and sig.run != self.cfg.loss_persist):
            return None  # once per episode (re-armed at the baseline)
        if is_loss and self._warming:  # not confirmed in the LR warm-up
            return None
        sig.hot = True
        if is_loss:
            return self._confirm(base, sig)
        # only a warning opens an episode (a signal still hot only keeps one open: _observe)
        return dict(base, event="warning", rule="level", episode=self._touch_episode(step, name))

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


def _some(event: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    return [] if event is None else [event]


def _overflowed(name: str, value: float) -> bool:
    """A gradient norm made inf/NaN by an fp16 overflow (the loss scaler's business)."""
    return not math.isfinite(float(value)) and any(fnmatchcase(name, p) for p in GRAD_NORMS)
