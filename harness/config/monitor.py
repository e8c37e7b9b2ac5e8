"""The `monitor` config section: what the spike detector watches and what the trainer does.

Issue 16: the defaults come ONLY from the tuning part of the calibration split
(bench/spikes/spike_split.py: the spike suite's tuning scenarios x tuning seeds, and the first half,
steps <= 9,780, of the real llm.c GPT-2 124M log; every figure is reported on the held-out
part: the suite's other runs and the log's second half, the anneal to LR 0). The log was cut
in two after its events under the earlier defaults had been seen, before any tuning on it
(spike_split's History). Reasons, per default:
- Two alarm levels, because the costs differ: precursor rules (grad norm, update norm, the
  model's logit signals, per-group update ratios, the loss's first step over) give quiet
  `warning`s (a metric and an event line: what `skip` may act on, a skipped step is cheap);
  only `alarm`s (a confirmed loss spike, a non-finite value, a parameter jump) go to
  wandb.alert and trigger lr_cut / rollback / stop. On the tuning part every warning-only
  rule had false positives on stable runs that no damage followed (grad norm at z >= 10:
  blips clipping absorbs), and real logs show the same (public llm.c run: 44 such warnings,
  18 of them in its tuning half: what `grad_confirm` below removes).
- Robust statistics (medians and MAD of the log value over 128 steps, OLMo-core's window,
  with a slope term), so one spike does not move the baseline and slow drift is followed.
- `grad_z` 10: gradient norms are heavy-tailed; at 6 sigma, blips gave 6 warnings / 1000
  stable steps on the tuning seeds, at 10 none, with no precursor lost (real ones: z 15-200).
- `grad_confirm` 2 on `confirm_signals` (the gradient norms): a gradient-norm level warning
  needs a SECOND consecutive step at z >= grad_z. Tuning evidence: the real log's tuning half
  (steps 500-9,780) had 18 one-step gradient-norm excursions over z 10 (z 10-29, x2-5.6 the
  baseline), 1.9 warnings / 1000 steps with nothing after them; at the step after, the
  largest z was 8.9, so none is confirmed (0 / 1000). On the suite's tuning part, the first
  gradient-norm excursion of every instability, up to its onset, stayed over z 10 the next
  step too (lr_spike, bad_random, scale_weights: x4-12 the baseline), so confirmation delays
  the gradient norm's own warning by one step, and costs no flag and no lead: the earliest
  flag of every tuning spike is the update norm (lr_spike, 1 step ahead; a one-step LR error
  shows there first, so the update norm is NOT confirmed: its one-step excursions were z
  96-142), its trend (lr_ramp), the loss's first step over (bad_random, in the same step as
  the gradient norm's first) or, with no precursor possible (scale_weights), the attention
  ceiling, the parameter jump and the loss in the onset step. Tuning part at the new default:
  ahead>=1 1.00, by onset 1.00, 0 false warnings on stable runs, as before. The stable tuning
  runs' largest gradient-norm z was 9.6: confirmation is also the margin z 10 alone lacked.
- `grad_at_once` 100: a gradient-norm value >= 100 x its baseline warns at once (and `skip`
  drops it before it is applied): the largest one-step blip on the tuning half was x5.6 and the
  largest gradient excursion of any tuning instability x12 (confirmed anyway), so 100 is far
  from both; a catastrophic gradient (x1000 in tests/monitor/test_monitor_actions.py) is warned in
  its own step. A ratio, not a z: at the floor spread (min_scale) z 100 is only x2.7. Not fitted:
  no tuning value lies between x12 and x1000.
- Not chosen, on the same tuning evidence: a larger `grad_z` (30 also clears the tuning half,
  but its largest blip was z 29: no margin, and the tail of z is heavy: a z cut only moves the
  blips' rate down, confirmation removes one-step blips of any size); confirmation by the
  loss moving in the same step (loss z >= 3: 3 of the 18 tuning-half blips pass, and it adds
  no flag on the suite, where a loss rising that much warns by itself); a tail-aware spread (a
  high quantile instead of the MAD: 128 values give a noisy p99) and muting the loss and
  gradient rules while the LR is near 0: the tuning half never goes below LR 0.5 x its peak
  and the suite's tuning runs end at a 10% floor, so no tuning data could set such a
  threshold (the held-out `anneal_to_0` runs, which reach LR 0, then showed 0 events in
  their last third: bench/README.md).
- The loss needs `loss_persist` 2 steps above `loss_z` 6 to be a confirmed spike (one hard
  batch is not one), and only after the LR warm-up (`trend_after`: the loss falls fastest and
  least regularly while the LR rises; a replayed log without the config infers the end of the
  warm-up from optim/lr). `min_scale` 0.01: a change under ~z x 1% never alarms.
- (Issue 16, replaced in issue 25: below) The trend rule (x4 over a window) catches a steady
  ramp that the level z absorbs: the update norm's (tuning part: it leads lr_ramp by 4-12
  steps; healthy runs rise at most x0.9 per window after warm-up). NOT the attention-logit
  bound: on the tuning part's stable runs it grows x2.2-3.3 per window by itself (0.3 at init
  to ~7 at step 300), a 1.2x margin to x4, and it added no lead there (on stable seeds 5-6 it
  then rose x8 and x25).
- The model's logit signals (issue 16), each kept or dropped on the tuning part alone:
  `train/z_loss` (level, z 10): max z 3.5 on the tuning stable runs, 0 warnings; kept, cheap,
  it is what output-logit divergence moves. `model/attn_logit_bound` (level z 10: max 6.7 on
  stable tuning runs, 0 warnings; and `attn_ceiling` 100 below). `model/logit_lse_max` is NOT
  a default signal: a max over tokens drifts in steps, its z reached 12 on a stable tuning
  run (1 false warning in 1004 steps) and it added no lead on any tuning instability.
- `attn_ceiling` 100 on model/attn_logit_bound: an absolute ceiling, because the bound's size
  is what saturates softmax and its growth begins in the LR warm-up, before any window is
  full. The largest value on the tuning part's stable runs is 23 (most runs end at 6-9): 100
  leaves a 4x margin; the tuning part's lr_ramp and scale_weights runs cross it (190-1300).
- `param_jump` 1e-4: the relative change of a layer group's parameter norm between the end of
  one step and the start of the next is 0 up to float rounding unless something outside the
  optimizer wrote the weights (silent corruption). Set from float32 rounding (healthy steps
  measure 1e-8 - 1e-7, tests/train/test_param_signals.py), not fitted: 1000x over it.
- `update_sample` 1/16: the update-norm pass reads a fixed 1/16 of the coordinates of the
  model's large tensors: its CPU time on the tiny preset falls from ~3.8 to ~1.3 ms per step
  (of ~140) at an error of <= 2% on the update norm (tests/train/test_param_signals.py), far inside
  the x4 / z 10 margins the rules use. 1 = exact. Not a tuned threshold: a cost/error choice.
- Nothing is acted on unless `action` says so: the default only logs ("alert").

Issue 25 (a warning means "look now"; bench/spikes/attn_growth.py's runs split by seed before
any tuning, seeds 1-3 tuned on, 4-6 held out; the real log split as above):
- Once per episode, `rearm_z` 3 and `rearm_steps` 10: a rule re-arms only after its signal has
  been back at its baseline for 10 steps in a row (z < 3, the band a normal noise stays in;
  the ground truth's own calm period, spike_scenarios.GT_REARM, is 10 steps). Not fitted: it
  only removes repeats (the real log's unconfirmed blips: 44 warnings re-armed at z < 5 at
  once, 40 with this rule; the trend and ceiling rules' reminders every episode_gap steps,
  4.6 warnings / 1000 on the issue's healthy high-LR runs, are gone by construction).
- `loss_at_once` 1.5 replaces the loss's first-step warning at z >= 6: one step over loss_z
  is one hard batch, no event, unless the loss is >= 1.5 x its baseline (a broken batch:
  random tokens put the suite's loss at x2). Evidence: the real log's tuning half had 5 such
  warnings, its largest one-step rise over z 6 x1.069 (the held-out half's, seen after: x1.081,
  5 warnings, now 0); x1.5 is 7x that margin in log units and under x2.
- The growth rule on the attention-logit bound (`growth_ratio` 50 over `growth_span` 20 steps,
  the reference the median of `growth_ref` 5 values) replaces the ceiling as the precursor:
  every run crosses 100 in its LR warm-up at a high LR, damaged or not, and a healthy bound
  grows x25 over a whole run, so neither a size nor a ratio to the first values separates
  them; the RATE does. Tuning seeds: the damaged runs' (LR 0.1 and 0.03 without qk-norm) largest
  20-step ratio x200-3540, the healthy qk-norm twins' x2.7 at most, the suite's stable runs
  (LR 3e-3, no qk-norm) x11.4 (seed 1; seed 5, held out, x18.4): 50 lies between (x4 over
  11.4, x4 under 200). Held-out seeds: 5 of 5 damaged runs warned ahead of their onset (leads
  11-205 steps), 1 of 7 undamaged runs warned (LR 0.03 without qk-norm, seed 4: it grew as
  fast, x144, and ended 3.7% behind its twin, under the 5% damage line). The spike suite's
  nat_attn (held out; LR 0.1, 10% floor): seed 1 damaged, warned at step 25, 172 steps ahead;
  seeds 2-3 never fell 5% behind their twin and were warned at step 25 as well. The rule
  separates runaway logits from qk-norm runs (0 of 15 warned), not which runaway will lose.
  LR 0.01 (recorded after this default was set): 1 of 2 damaged runs warned (lead 37; the
  other peaked at x32), 0 of 10 undamaged (x18-48 without qk-norm). The llama shape (LR 0.1
  and 0.03, 3 seeds, also after): 6 of 6 damaged warned ahead, 0 of 6 qk-norm twins.
- The trend rule watches `optim/lr` (x`trend_growth` 8 per window after the LR warm-up), not
  the update norm: a healthy run leaving its loss plateau raises the update norm's line x3-5
  per window (attn_growth's 24 high-LR runs: up to x3.8 per 64 steps; the issue's runs x5),
  close to or over the old x4, and the loss cannot gate it: on the tuning lr_ramp seeds 1-3
  the update norm's trend reached x4 at steps 188/198/206 while the loss's line was still
  FALLING (x0.92-0.95 per window), as on a plateau exit. The LR separates them: no schedule the
  harness runs rises after its warm-up (0 trend warnings on the 24 high-LR runs and the real
  log), and the lr_ramp LR's trend warns at steps 195/203/210, 76-88 steps before the held-out
  loss spike (x4: 85-97). x8, not x4: a one-time x2 step of the LR (lr_cut's restore at
  lr_cut_factor 0.5) reads as x4 on the half-window estimator.
- `model/attn_logit_bound` is no longer a level signal: on the tuning seeds its z >= 10 warned
  3 of 6 healthy high-LR twins and no damaged run ahead of its onset.
- `attn_ceiling` 100 stays, as one `advice` line when first reached (it is a size that holds
  for the rest of a run); `qk_norm_lr` 1e-2: start-up advice when model.qk_norm is off at a
  peak LR >= 1e-2. Every run without qk-norm at 0.03 and 0.1 grew x144 or more in 20 steps (11
  of 12 fell behind their twin); the suite's LR 3e-3 runs never did; at 1e-2 (measured after
  this default was set) 2 of 6 fell behind. Advice, so a wrong guess costs one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Optional

from harness.common.errors import HarnessError, check_number

ACTIONS = ("alert", "skip", "lr_cut", "rollback", "stop")
EVENT_KINDS = ("warning", "loss_spike", "nonfinite", "param_jump")
# what the event kind `warning` was called before issue 25 (act_on names it: refused, renamed)
OLD_KINDS = {"grad_spike": "warning"}
# event kinds that are alarms (wandb.alert; may trigger lr_cut / rollback / stop); the rest are
# warnings (metrics and event lines; `skip` may act on them)
ALARMS = ("loss_spike", "nonfinite", "param_jump")
EXPENSIVE = ("rollback", "stop")  # actions that may only follow an alarm
# signals known only after the optimizer step (harness.train.grad_norms.GradNorms.update_metrics)
# and the LR, which the trainer hands the callbacks with the step's metrics (the trend rule's
# signal: a rising LR is no reason to skip a step)
POST_STEP = ("optim/update_norm", "optim/param_norm", "optim/param_jump", "update_ratio/*",
             "optim/lr")
PARAM_JUMP = "optim/param_jump"
ATTN_BOUND = "model/attn_logit_bound"


def is_post_step(metric: str) -> bool:
    return any(fnmatchcase(metric, p) for p in POST_STEP)
STATS = ("median_mad", "ema")


@dataclass
class MonitorConfig:
    enabled: bool = True
    # precursor signals (fnmatch patterns over metric keys); add "grad_norm/*" for the
    # per-layer-group norms. Keys ending in "loss_scale" use the halving rule, not a z-score;
    # optim/param_jump the `param_jump` tolerance. The model's logit signals (train/z_loss,
    # model/logit_lse_max, model/attn_logit_bound) are read when the model logs them.
    signals: list[str] = field(
        default_factory=lambda: [
            "optim/grad_norm_preclip",
            "optim/update_norm",
            "optim/loss_scale",
            "optim/param_jump",
            "train/z_loss",
        ]
    )
    loss_signal: str = "train/loss"
    warmup_steps: int = 100  # no alarms before this step: early training swings are normal
    window: int = 128  # history per signal; alarms also need window // 2 values first
    stat: str = "median_mad"  # or "ema" (ZClip-like mean/var of the log, outliers clipped)
    ema_alpha: float = 0.98  # only for stat=ema: the discount (memory ~ 1 / (1 - alpha) steps)
    min_scale: float = 0.01  # floor on the log-space spread (~1% of the value)
    grad_z: float = 10.0  # warning threshold for precursor signals
    # the gradient norms' level warnings need confirmation: `grad_confirm` consecutive steps
    # at or over grad_z (a one-step blip is what clipping absorbs), unless the value is at
    # least `grad_at_once` x its baseline (a catastrophic gradient: warned, and skippable, at
    # once). confirm_signals=[] or grad_confirm=1: every precursor warns on its first step
    confirm_signals: list[str] = field(
        default_factory=lambda: ["optim/grad_norm_preclip", "grad_norm/*"])
    grad_confirm: int = 2
    grad_at_once: float = 100.0
    loss_z: float = 6.0  # loss threshold, one-sided (only rises matter)
    loss_persist: int = 2  # consecutive steps over loss_z before a loss_spike is confirmed
    # the loss's first step over loss_z is a warning only at >= loss_at_once x its baseline
    # (a batch that broke the model, or garbage data: `skip` may drop it at once); a smaller
    # one-step rise is one hard batch, no event
    loss_at_once: float = 1.5
    loss_scale_halvings: int = 2  # warn when the loss scale is 2^k below its window max
    # A steady ramp is absorbed by the level statistics' trend line, so it never scores a high
    # z: these signals warn (once per rise) when that line rises by `trend_growth` x over one
    # window after the LR warm-up. The LR: no schedule the harness runs rises after its
    # warm-up, so a rising LR is a schedule gone wrong. Not the update norm (issue 25: it
    # rises x3-5 per window when a healthy run leaves a loss plateau) nor the grad norm.
    trend_signals: list[str] = field(default_factory=lambda: ["optim/lr"])
    trend_growth: float = 8.0
    # every rule speaks once per episode: it may warn again only after its signal has been
    # back at its baseline (level: z < rearm_z; trend / growth: under half their threshold,
    # in log units) for rearm_steps steps in a row
    rearm_z: float = 3.0
    rearm_steps: int = 10
    # growth rule: a signal at >= growth_ratio x its own value growth_span steps before (the
    # median of growth_ref values ending there) warns; armed as soon as those values exist
    # (in the LR warm-up, where attention-logit growth starts)
    growth_signals: list[str] = field(default_factory=lambda: [ATTN_BOUND])
    growth_ratio: float = 50.0
    growth_span: int = 20
    growth_ref: int = 5
    # advice (once per run, never an alarm): model.qk_norm off at a peak LR >= qk_norm_lr
    qk_norm_lr: float = 1e-2
    # an absolute ceiling on model/attn_logit_bound (0 = off): once the bound reaches it, one
    # `advice` line (softmax saturates at such sizes, Wortsman et al. 2023), never repeated:
    # a size that holds for the rest of a run is a condition to fix, not an event to watch
    attn_ceiling: float = 100.0
    # the end of the LR warm-up, during which the update norm rises by design and the loss
    # falls fastest: the trend rule arms one window after it, loss spikes are confirmed only
    # after it. null = optim.warmup_steps in a run; in a replay, the first step whose
    # optim/lr does not rise (0 if the trace has no LR)
    trend_after: Optional[int] = None
    param_jump: float = 1e-4  # relative jump of a group's parameter norm between steps
    update_sample: float = 1 / 16  # fraction of coordinates the update-norm pass reads
    episode_gap: int = 20  # warnings further apart than this start a new episode
    action: str = "alert"  # alert | skip | lr_cut | rollback | stop
    # event kinds that trigger `action`; None picks [warning, nonfinite] for skip (act on
    # the gradient before it is applied) and the alarms [loss_spike, nonfinite, param_jump]
    # for the others. rollback and stop refuse warning (a warning is not worth a restart)
    act_on: Optional[list[str]] = None
    lr_cut_factor: float = 0.5
    lr_cut_steps: int = 200
    rollback_skip_batches: int = 200  # PaLM skipped 200-500 batches after a restart
    max_rollbacks: int = 3  # after this many rollbacks the action becomes "stop"

    def watches(self, metric: str) -> bool:
        """Whether the detector reads `metric` (a precursor, trend or ceiling signal, or the
        loss)."""
        patterns = [*self.signals, *self.trend_signals, *self.ceilings(), *self.growth_signals,
                    self.loss_signal]
        return any(fnmatchcase(metric, p) for p in patterns)

    def ceilings(self) -> dict[str, float]:
        """Metric -> absolute ceiling (the ceiling rule's signals)."""
        return {ATTN_BOUND: self.attn_ceiling} if self.attn_ceiling > 0 else {}

    def resolved_act_on(self) -> list[str]:
        if self.act_on is not None:
            return list(self.act_on)
        if self.action == "skip":
            return ["warning", "nonfinite"]
        return list(ALARMS)

    def validate(self) -> "MonitorConfig":
        _one_of("monitor.action", self.action, ACTIONS)
        _one_of("monitor.stat", self.stat, STATS)
        for kind in self.act_on or []:
            if kind in OLD_KINDS:
                raise HarnessError(f"monitor.act_on: {kind} is now called {OLD_KINDS[kind]} "
                                   f"(every precursor warning, whatever its signal): write "
                                   f"monitor.act_on=[{OLD_KINDS[kind]}]")
            _one_of("monitor.act_on", kind, EVENT_KINDS)
            if self.action in EXPENSIVE and kind not in ALARMS:
                raise HarnessError(f"monitor.act_on: {self.action} may only follow an alarm "
                                   f"({'|'.join(ALARMS)}), not {kind} (a warning): use "
                                   f"monitor.action=skip to act on warnings")
        if not self.signals or not all(isinstance(s, str) and s for s in self.signals):
            raise HarnessError("monitor.signals must be a non-empty list of metric names")
        if not all(isinstance(s, str) and s for s in self.confirm_signals):
            raise HarnessError("monitor.confirm_signals must list metric names ([] turns "
                               "the confirmation off)")
        if not all(isinstance(s, str) and s for s in self.trend_signals):
            raise HarnessError("monitor.trend_signals must list metric names ([] turns the "
                               "trend rule off)")
        if not all(isinstance(s, str) and s for s in self.growth_signals):
            raise HarnessError("monitor.growth_signals must list metric names ([] turns the "
                               "growth rule off)")
        if not self.loss_signal:
            raise HarnessError("monitor.loss_signal must name the loss metric (e.g. train/loss)")
        _at_least("monitor.window", self.window, 8, high=1_000_000)
        if self.trend_after is not None:
            _at_least("monitor.trend_after", self.trend_after, 0)
        for key in ("warmup_steps", "episode_gap", "rollback_skip_batches", "max_rollbacks"):
            _at_least(f"monitor.{key}", getattr(self, key), 0)
        for key in ("loss_persist", "lr_cut_steps", "loss_scale_halvings", "grad_confirm",
                    "rearm_steps", "growth_ref", "growth_span"):
            _at_least(f"monitor.{key}", getattr(self, key), 1)
        for key, usual in (("grad_z", 10), ("loss_z", 6), ("min_scale", 0.01), ("rearm_z", 3),
                           ("qk_norm_lr", 0.01)):
            check_number(f"monitor.{key}", getattr(self, key), 0, low_open=True,
                         fix=f"e.g. {usual}")
        check_number("monitor.param_jump", self.param_jump, 0, low_open=True, fix="e.g. 1e-4")
        check_number("monitor.grad_at_once", self.grad_at_once, 1, low_open=True,
                     fix="e.g. 100 (x the baseline)")
        check_number("monitor.loss_at_once", self.loss_at_once, 1, low_open=True,
                     fix="e.g. 1.5 (x the baseline)")
        check_number("monitor.growth_ratio", self.growth_ratio, 1, low_open=True,
                     fix="e.g. 100; monitor.growth_signals=[] turns the growth rule off")
        check_number("monitor.attn_ceiling", self.attn_ceiling, 0, fix="e.g. 100; 0 = off")
        check_number("monitor.update_sample", self.update_sample, 0, 1, low_open=True,
                     fix="e.g. 0.0625; 1 reads every coordinate")
        check_number("monitor.trend_growth", self.trend_growth, 1, low_open=True,
                     fix="e.g. 4; monitor.trend_signals=[] turns the trend rule off")
        check_number("monitor.ema_alpha", self.ema_alpha, 0, 1, low_open=True, high_open=True,
                     fix="e.g. 0.98")
        check_number("monitor.lr_cut_factor", self.lr_cut_factor, 0, 1, low_open=True,
                     fix="e.g. 0.5")
        return self


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise HarnessError(f"{key} must be one of {'|'.join(allowed)} (got {value!r})")


def _at_least(key: str, value: object, low: int, high: int = 2**31 - 1) -> None:
    check_number(key, value, low, high, integer=True)
