"""Controlled instabilities on the tiny model, and the ground truth they are scored against.

One run = `make_trainer` on a small config + callbacks that (a) evaluate a fixed held-out
batch every step and (b) inject one kind of instability. The recorded trace is every step's
metrics (what the monitor sees) plus `eval/heldout_loss`.

Time alignment (why the held-out loss is computed in on_before_step): at step s the training
loss and gradient norms are measured on the weights left by step s-1; the update norm of step
s is only known after step s's update. The held-out loss is evaluated on the SAME weights as
the step's training loss, so a spike in it at step s is damage done by step s-1 at the latest,
and an update-norm warning at step s-1 is a genuine one-step lead (it is known before the
forward pass of step s).

Ground truth (`loss_spikes`): the held-out loss rises above GT_RATIO x its minimum over the
previous GT_WINDOW steps for >= GT_PERSIST consecutive steps; the onset is the first such
step. A new spike needs GT_REARM calm steps (ratio back under the threshold) first, so a
plateau of damage counts once. Why 1.1 and not a looser 1.3: the held-out batch is fixed, so
its loss only moves when the weights do; on stable runs of this model it never rises more
than ~3% over its 20-step minimum after step 40, so a 10% rise held for two steps is damage,
and 1.3 would miss moderate spikes (e.g. single-token batches: +13%).

Why the training loss is not the ground truth: a corrupted batch makes the TRAINING loss jump
at once (random tokens: 3.9 -> 8) while the held-out loss barely moves (+3% for 5 such
steps); the held-out batch separates model damage from one bad batch.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from common import CpuTimer

from harness.callbacks.loggers import Console, MetricsFile
from harness.callbacks.spike_monitor import SpikeMonitor
from harness.checkpoint.checkpointer import Checkpointer
from harness.common.callback import Callback
from harness.config import load_config
from harness.config.data import DataConfig
from harness.data.prepare import prepare_data
from harness.data.shards import TokenShards
from harness.train.run import make_trainer

GT_RATIO, GT_WINDOW, GT_PERSIST, GT_REARM = 1.1, 20, 2, 10
EVAL_SEQS = 16  # the fixed held-out batch: the first 16 validation sequences
FINAL_EVAL_SEQS = 64

# small enough that the suite's 60 runs of 300 steps take ~5 minutes on 2 cores
LR_WARMUP = 20
# the learning rate the suite was measured and tuned at (the tiny preset's until it moved to
# 2e-3): pinned, so that a preset change does not move the suite's numbers
MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.block_size=64",
         "train.global_batch_size=16", "train.micro_batch_size=16", "optim.lr=3e-3",
         f"optim.warmup_steps={LR_WARMUP}"]
# short runs: the monitor arms after 50 steps and 32 values, with 64-step windows (the
# defaults, 100 and 128, would leave little of a 300-step run to score)
MONITOR = ["monitor.warmup_steps=50", "monitor.window=64"]
QUIET = ["train.log_every=1000000", "checkpoint.every=0"]
# more validation documents than the default 1%, so the held-out batch has enough; training
# must name the settings its shards were prepared with
VAL_FRACTION = 0.05


def prepare_shards(out_dir: Path, max_bytes: int) -> Path:
    """Token shards of a slice of the built-in corpus, prepared once and reused."""
    if not (out_dir / "manifest.json").is_file():
        cfg = DataConfig(out_dir=str(out_dir), max_bytes=max_bytes, vocab_size=512,
                         val_fraction=VAL_FRACTION)
        prepare_data(cfg, progress=False)
    return out_dir


# ---- measurement callbacks ----------------------------------------------------------------
class HeldOut(Callback):
    """Held-out loss on a fixed batch, on the weights this step's training loss sees."""

    order = -10  # before any injection or monitor: it only reads the weights

    def __init__(self, shards: Path, block: int, n: int = EVAL_SEQS):
        seqs = TokenShards.open(shards).sequences("val", block)
        self.batch = torch.from_numpy(seqs.batch(range(min(n, len(seqs)))))
        self.seconds = 0.0

    def loss(self, trainer) -> float:
        t0 = time.thread_time()
        with torch.no_grad():
            b = self.batch.to(trainer.engine.device)
            out = float(trainer.engine.module(b[:, :-1], b[:, 1:]))
        self.seconds += time.thread_time() - t0
        return out

    def on_before_step(self, trainer, step, signals):
        signals["eval/heldout_loss"] = self.loss(trainer)  # rides along into the metrics


class Recorder(Callback):
    """Every step's numeric metrics, in order (a rollback repeats step numbers)."""

    order = 99

    def __init__(self):
        self.trace: list[dict[str, float]] = []

    def on_step_end(self, trainer, step, metrics):
        self.trace.append({k: float(v) for k, v in metrics.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})


# ---- injections ---------------------------------------------------------------------------
def _optimizer(trainer):
    return getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)


class LRFactor(Callback):
    """Multiplies the learning rate of step s by factor(s). Applied in on_step_end of the step
    before, right after the schedule set it, so the step's own metrics (optim/lr, update
    norm) see the real value; the schedule overwrites it again at the next step."""

    order = 0

    def __init__(self, factor: Callable[[int], float], once: bool = False):
        self.factor, self.once, self.fired = factor, once, set()

    def on_step_end(self, trainer, step, metrics):
        f = self.factor(step + 1)
        if f != 1.0 and not (self.once and step + 1 in self.fired):
            self.fired.add(step + 1)
            for group in _optimizer(trainer).param_groups:
                group["lr"] *= f


class ScaleBlock(Callback):
    """Multiplies every weight matrix of one transformer block at the end of step k - 1: the
    damage appears in step k's loss, gradients and held-out loss at once (no precursor)."""

    order = 0

    def __init__(self, step: int, block: int, factor: float):
        self.step, self.block, self.factor, self.done = step, block, factor, False

    def on_step_end(self, trainer, step, metrics):
        if step + 1 == self.step and not self.done:
            self.done = True
            with torch.no_grad():
                for p in trainer.engine.module.blocks[self.block].parameters():
                    if p.dim() == 2:
                        p.mul_(self.factor)


class NoiseLayer(Callback):
    """Silent corruption (issue 16): Gaussian noise of `rel` x each weight matrix's own RMS
    added to one block's MLP at the end of step k - 1, outside the optimizer. The training
    loss and the gradient norm move little; the parameter norm jumps in one step."""

    order = 0

    def __init__(self, step: int, block: int, rel: float, seed: int):
        self.step, self.block, self.rel, self.seed, self.done = step, block, rel, seed, False

    def on_step_end(self, trainer, step, metrics):
        if step + 1 == self.step and not self.done:
            self.done = True
            gen = torch.Generator().manual_seed(self.seed)
            with torch.no_grad():
                for p in trainer.engine.module.blocks[self.block].mlp.parameters():
                    if p.dim() == 2:
                        noise = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
                        p.add_(noise * self.rel * p.pow(2).mean().sqrt())


class BadData:
    """Wraps TrainData: the batches at data positions [first, last) are replaced by random
    tokens or one repeated token. Tied to the data position (not the step), so a rollback
    that skips past them never sees them again (the PaLM case: bad batch x model state)."""

    def __init__(self, data, first: int, last: int, kind: str, vocab: int, seed: int):
        self.data, self.first, self.last, self.kind, self.vocab = data, first, last, kind, vocab
        self.gen = torch.Generator().manual_seed(seed)

    def micro_batch(self, consumed: int, micro_step: int):
        x, y = self.data.micro_batch(consumed, micro_step)
        if not self.first <= consumed < self.last:
            return x, y
        if self.kind == "random":
            full = torch.randint(0, self.vocab, (x.shape[0], x.shape[1] + 1), generator=self.gen)
        elif self.kind == "span":  # OLMo 2's repeated n-grams: a real 8-token span, tiled
            span = torch.cat([x, y[:, -1:]], dim=1)[:, :8].cpu()
            full = span.repeat(1, x.shape[1] // 8 + 1)[:, :x.shape[1] + 1]
        else:  # one token, the same all batch long: the model learns to predict only it
            full = torch.full((x.shape[0], x.shape[1] + 1), 17, dtype=torch.long)
        full = full.to(x.device)
        return full[:, :-1], full[:, 1:]


# ---- scenarios ----------------------------------------------------------------------------
# installer(trainer, k, seed) -> extra callbacks; it may also wrap trainer.data
Installer = Callable[[Any, int, int], list[Callback]]


def _lr(factor: Callable[[int, int], float], once: bool = False) -> Installer:
    return lambda trainer, k, seed: [LRFactor(lambda s: factor(s, k), once)]


def _bad(kind: str, n: int) -> Installer:
    def install(trainer, k, seed):
        gb = trainer.plan.batch.global_batch
        trainer.data = BadData(trainer.data, (k - 1) * gb, (k - 1 + n) * gb, kind,
                               trainer.cfg.model.vocab_size, seed)
        return []
    return install


# name -> (what it does, whether a precursor can exist, installer). Strengths are chosen so
# that the held-out loss rises by more than GT_RATIO on this model (single-token batches are
# marginal: +13% on seed 1, less on others); weaker versions (5 bad batches, LR x10) barely
# move it. scale_weights changes the weights between two steps, so every signal moves in the
# same step: it is scored separately (by onset, never ahead).
SCENARIOS: dict[str, tuple[str, bool, Installer]] = {
    "stable": ("no injection", True, lambda trainer, k, seed: []),
    "lr_spike": ("LR x50 for the one step k (a glitch: not repeated after a rollback)", True,
                 _lr(lambda s, k: 50.0 if s == k else 1.0, once=True)),
    "lr_crash": ("LR x300 for the one step k: the model never recovers", True,
                 _lr(lambda s, k: 300.0 if s == k else 1.0, once=True)),
    "lr_ramp": ("LR x1.05^(s-k+1) from step k on (compounding growth)", True,
                _lr(lambda s, k: 1.05 ** (s - k + 1) if s >= k else 1.0)),
    "high_lr": ("LR x20 from step k on, with no warm-up to it", True,
                _lr(lambda s, k: 20.0 if s >= k else 1.0)),
    "bad_random": ("random-token batches for 20 steps from k", True, _bad("random", 20)),
    "bad_repeat": ("single-token batches for 20 steps from k", True, _bad("repeat", 20)),
    "scale_weights": ("block 0 weight matrices x10 at the end of step k-1", False,
                      lambda trainer, k, seed: [ScaleBlock(k, 0, 10.0)]),
    "silent_corrupt": ("noise (4 x RMS) on block 1's MLP weights after step k-1", False,
                       lambda trainer, k, seed: [NoiseLayer(k, 1, 4.0, seed)]),
    "repeat_spans": ("batches of one real 8-token span repeated, 20 steps from k", True,
                     _bad("span", 20)),
    "nat_attn": ("natural: LR 0.1 (33x), no qk-norm: attention-logit growth; twin: qk-norm",
                 True, lambda trainer, k, seed: []),
    "anneal_to_0": ("stable, no injection; cosine to LR 0 at the last step (not to 10%)", True,
                    lambda trainer, k, seed: []),
}
# scenarios made by their config alone (no twin): name -> overrides. anneal_to_0: the end of
# a schedule (issue 16: "robust to the end of a schedule, LR near 0"); every other run's
# cosine ends at the harness's default floor, optim.min_lr_ratio 0.1. Its LR falls under 25%
# of the peak for the last third of the run (steps > 207 of 300), where the loss's and the
# gradient norm's spread shrink and the update norm falls with the LR.
CONFIG: dict[str, list[str]] = {"anneal_to_0": ["optim.min_lr_ratio=0"]}

# Natural instabilities (issue 16): nothing is injected; the run's own config makes it unstable
# and a TWIN (same seed, data and LR, the one fix applied) says what the run would have been.
# name -> (the run's overrides, the twin's extra overrides). Wortsman et al. 2023: without
# qk-layernorm, attention logits grow at high LR and the loss falls behind; with it, not.
# The LR is 0.1: on this model at 3e-2 the bound grows only to ~600 and the loss gap is small.
NATURAL: dict[str, tuple[list[str], list[str]]] = {
    "nat_attn": (["optim.lr=0.1", "model.qk_norm=false"], ["model.qk_norm=true"]),
}
# Ground truth of a natural run, fixed before any tuning: the onset is the first step at which
# the held-out loss (trailing NAT_SMOOTH-step mean) exceeds its twin's by >= NAT_GAP and stays
# so for NAT_HOLD steps (or to the end of the run). Why the twin's held-out loss and not the
# attention bound's ratio to the twin's: the bound is the signal being scored (circular), and
# the loss gap is the damage a user pays; why 5%: the fixed batch's step-to-step noise is ~3%
# (a 10-step mean cuts it to ~1%), and 5% held for 20 steps is a gap no seed noise keeps open.
NAT_GAP, NAT_SMOOTH, NAT_HOLD = 0.05, 10, 20


class _EventLog:
    """Wraps trainer.emit to keep a copy of every monitor event of the run."""

    def __init__(self, trainer):
        self.events: list[dict[str, Any]] = []
        self.emit = trainer.emit
        trainer.emit = self

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(dict(event))
        self.emit(event)


def run_scenario(name: str, seed: int, steps: int, inject_at: int, shards: Path,
                 workdir: Path, extra: list[str] = (), tag: str = "alert") -> dict[str, Any]:
    """Train one run with `name`'s injection at step `inject_at` and return its trace, the
    live monitor events and timings. `extra` overrides come last (e.g. the monitor action);
    tag "twin" trains a natural scenario's twin."""
    run_dir = workdir / f"{name}-s{seed}-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    natural, twin = NATURAL.get(name, (CONFIG.get(name, []), []))
    cfg = load_config("tiny", [*MODEL, *MONITOR, *QUIET, f"train.max_steps={steps}",
                               f"train.seed={seed}", f"train.run_dir={run_dir}",
                               f"data.out_dir={shards}", f"data.val_fraction={VAL_FRACTION}",
                               *natural, *(twin if tag == "twin" else []), *extra])
    logging.getLogger("harness").setLevel(logging.WARNING)
    trainer, _ = make_trainer(cfg)
    if cfg.monitor.action != "rollback":  # no final checkpoint, metrics file, console: the
        trainer.callbacks = [c for c in trainer.callbacks  # is in memory (~1 s a run)
                             if not isinstance(c, (Checkpointer, MetricsFile, Console))]
    held, rec = HeldOut(shards, cfg.model.block_size), Recorder()
    monitors = [c for c in trainer.callbacks if isinstance(c, SpikeMonitor)]
    # the monitor's cost: its callback and the update-norm pass the trainer makes for it
    timer = CpuTimer((monitors[0], "on_before_step"), (monitors[0], "on_step_end"),
                     (trainer.norms, "update_metrics")) if monitors else None
    injected = SCENARIOS[name][2](trainer, inject_at, seed)
    trainer.callbacks = sorted([*trainer.callbacks, held, rec, *injected], key=lambda c: c.order)
    log = _EventLog(trainer)
    t0, c0 = time.perf_counter(), time.thread_time()
    trainer.fit()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    final = HeldOut(shards, cfg.model.block_size, FINAL_EVAL_SEQS).loss(trainer)
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are large next to the trace
    return {"scenario": name, "seed": seed, "inject_at": inject_at, "tag": tag,
            "trace": rec.trace, "events": log.events, "final_eval": final, "wall_s": wall,
            "cpu_s": cpu, "eval_cpu_s": held.seconds,
            "monitor_cpu_s": timer.seconds if timer else 0.0, "steps_run": len(rec.trace),
            "stop_reason": trainer.stop_reason}


# ---- ground truth -------------------------------------------------------------------------
def loss_spikes(trace: list[dict[str, float]]) -> list[int]:
    """Onset steps of held-out loss spikes (see the module docstring for the rule)."""
    onsets, run, calm, armed = [], 0, GT_REARM, True
    steps = [(int(r["step"]), r.get("eval/heldout_loss", math.nan)) for r in trace]
    for i, (step, e) in enumerate(steps):
        past = [v for _, v in steps[max(0, i - GT_WINDOW):i] if math.isfinite(v)]
        ratio = math.inf if not math.isfinite(e) else (e / min(past) if past else 1.0)
        if ratio > GT_RATIO:
            run, calm = run + 1, 0
            if run == GT_PERSIST and armed:
                onsets.append(steps[i - GT_PERSIST + 1][0])
                armed = False
        else:
            run, calm = 0, calm + 1
            armed = armed or calm >= GT_REARM
    return onsets


def twin_gap_onsets(trace: list[dict[str, float]], twin: list[dict[str, float]]) -> list[int]:
    """The onset of a natural run's damage against its twin (NATURAL's rule), or []."""
    def smooth(tr):
        vals = [r.get("eval/heldout_loss", math.nan) for r in tr]
        return {int(r["step"]): sum(vals[max(0, i - NAT_SMOOTH + 1):i + 1])
                / len(vals[max(0, i - NAT_SMOOTH + 1):i + 1]) for i, r in enumerate(tr)}
    run, ref = smooth(trace), smooth(twin)
    steps = sorted(s for s in run if s in ref)
    over = [not run[s] <= ref[s] * (1 + NAT_GAP) for s in steps]  # NaN counts as over
    for i, s in enumerate(steps):
        if all(over[i:i + NAT_HOLD]):
            return [s]
    return []
