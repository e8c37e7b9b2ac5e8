"""Spike suite: how early and how reliably SpikeDetector and published rules flag loss spikes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/spikes/spike_suite.py [--quick] [--out FILE.json]
        [--seeds 5] [--stable-seeds 12] [--steps 300] [--jobs 1]
    .venv/bin/python bench/spikes/spike_suite.py --rescore runs/spike_suite/results.json [--out F]
        [--record SCENARIO ...]

1. Train the tiny model once per (scenario, seed) with the monitor in alert mode
   (bench/spikes/spike_scenarios.py: controlled instabilities, a held-out batch evaluated every
   step, and the ground-truth rule for loss spikes on it).
2. Replay the SAME recorded traces through SpikeDetector and every baseline of
   baselines (each sees identical per-step signals, fed as the trainer does).
3. Per detector: recall of spikes flagged >= 1 step before the onset (spikes with a possible
   precursor) and no later than it, the lead distribution, and false alarms per 1000 steps on
   the stable runs; then the same with every detector's threshold swept to its best recall
   within a false-alarm budget (a detector that fires often looks early by chance): 1 per 1000
   stable steps (the target), and SpikeDetector's own rate at its defaults if that is higher.
4. Rollback: a run that never recovers unprotected, rerun with monitor.action=rollback, and
   its final held-out loss compared with the clean run's. 5. The monitor's CPU overhead.

--rescore FILE --record SCENARIO (repeatable) trains only that scenario's runs (and twins), at
FILE's settings and on the same shards (--workdir), puts them in place of FILE's runs of it,
and scores everything as --rescore does (the live-vs-replay check covers the new runs): how a
scenario added later joins a recorded suite without retraining the rest.

--rescore FILE skips step 1: it reads the traces (and twins, ground truth, rollback and
overhead figures) a previous run wrote with --out and redoes steps 2-3 with the CURRENT
detector code and defaults (seconds, not the ~13 minutes of training). The traces hold every
signal the default monitor reads (TRACE_KEYS); the live-vs-replay check is skipped (the live
events were recorded under that run's defaults), and rollback and overhead are the file's.

Calibration (issue 16): bench/spikes/spike_split.py splits scenarios AND seeds into a tuning part
and a held-out part, fixed before any tuning. The monitor's defaults come from the tuning part
only. The main tables are measured on the HELD-OUT part; the matched-false-alarm settings of
every detector are chosen on the tuning part and then scored on the held-out part; the real
stable log is replayed through every detector, its tuning and held-out halves apart
(spike_split.REAL_TUNE_LAST) and the whole log labelled as half tuned on. "ours" counts every
event (warnings too: what `skip` may act on), "ours-alarm" only alarms (what wandb.alert,
lr_cut, rollback and stop follow), "ours-loss" only confirmed loss spikes and non-finite values.

Natural instabilities (spike_scenarios.NATURAL: nothing injected, e.g. LR 0.1 without
qk-norm) run with a TWIN (the same run with the fix, qk-norm); their ground truth is the gap to
the twin (spike_scenarios.twin_gap_onsets), any flag from the monitor's warm-up on counts (the
issue asks for >= 50 steps of lead), and a table gives each one's lead and the attention
bound's own lead. Twins are not stable runs: their warnings are shown, not counted as FA.
Alert-mode runs drop the final checkpoint, metrics.jsonl and console (the trace is in memory).

A detector's alarms are ALL its events (warnings, loss spikes, non-finite values): each could
trigger an action, so each counts as a flag and, on a stable run, as a false alarm. A spike
counts as flagged by the first alarm in [onset - LOOKBACK, onset + LATE], or for SpikeDetector
by the warning that opened an episode still open in that span (its rules warn once per
episode, issue 25: what its loss_spike calls warned_at); lead = onset - that step. Only steps
from the monitor's warm-up on are scored, for every detector alike (natural runs: from step 1,
where the growth rule arms).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: one thread per process
os.environ.setdefault("DS_ACCELERATOR", "cpu")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the suite's modules, then bench/common.py

import numpy as np  # noqa: E402
import spike_scenarios as sc  # noqa: E402
import spike_split as split  # noqa: E402
from baselines import BASELINES  # noqa: E402
from common import print_table, save_json  # noqa: E402

from harness.config.monitor import ALARMS, is_post_step  # noqa: E402
from harness.monitor import MonitorConfig, SpikeDetector  # noqa: E402
from harness.monitor.replay import read_trace  # noqa: E402

LOOKBACK, LATE = 20, 10  # LOOKBACK = the detector's default episode_gap
FA_BUDGET = 1.0  # false alarms per 1000 stable steps allowed at the matched setting
STABLE = split.STABLE_SCENARIOS  # runs whose every step counts in the false-alarm denominator
LOW_LR = 0.25  # the end of a schedule: steps whose LR is under this fraction of the run's peak
REAL_LOG = HERE.parents[1] / "tests" / "monitor" / "llmc_gpt2_124M_stable.csv.gz"
REAL_FROM = split.REAL_FROM  # the convention: alarms per 1000 steps after step 500


# ---- detectors: name -> (knob, default, sweep grid, factory(knob, monitor kwargs)) ---------
def _ours(scale: float, mon: dict, loss_only: bool = False):
    """SpikeDetector with both thresholds scaled from the defaults (z_scale=1)."""
    d = MonitorConfig()
    det = SpikeDetector(MonitorConfig(**mon, grad_z=d.grad_z * scale, loss_z=d.loss_z * scale))
    if loss_only:  # the same detector, its confirmed loss spikes only: what precursors add
        det.keep = ("loss_spike", "nonfinite")
    return det


def _ours_alarm(scale: float, mon: dict):
    det = _ours(scale, mon)
    det.keep = ALARMS  # what wandb.alert and the expensive actions follow
    return det


DETECTORS = {
    "ours": ("z_scale=", 1.0, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0],
             lambda v, mon: _ours(v, mon)),
    "ours-alarm": ("z_scale=", 1.0, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0],
                   lambda v, mon: _ours_alarm(v, mon)),
    "ours-loss": ("z_scale=", 1.0, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0],
                  lambda v, mon: _ours(v, mon, loss_only=True)),
    "fixed": ("norm>", 1.0, [1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64],
              lambda v, mon: BASELINES["fixed"](threshold=v)),
    "zclip": ("z>", 2.5, [2.5, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50],
              lambda v, mon: BASELINES["zclip"](z=v)),
    "olmo": ("sigma>", 6.0, [3, 4, 5, 6, 8, 10, 15, 20, 30, 50],
             lambda v, mon: BASELINES["olmo"](sigma=v)),
    "megatron": ("max_x", 10.0, [0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2, 3, 5, 10],
                 lambda v, mon: BASELINES["megatron"](factor=v)),
    "lightning": ("rtol=", 2.0, [0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0],
                  lambda v, mon: BASELINES["lightning"](rtol=v)),
}


class Flags(list):
    """A detector's alarm steps, and for SpikeDetector (every event kept) its episodes as
    (start, last) pairs: a rule warns once per episode (issue 25) and the episode stays open
    while its signal is up, so a spike inside it counts as flagged by the warning that opened
    it, as the detector's own loss_spike says (warned_at). False alarms count steps only."""

    episodes: list = []


def alarm_steps(det, trace: list[dict]) -> Flags:
    """Replay a trace the way the trainer feeds a step; the held-out loss stays hidden."""
    keep = getattr(det, "keep", None)
    steps, episodes = [], {}
    for row in trace:
        step = int(row["step"])
        signals = {k: v for k, v in row.items() if k != "step" and not k.startswith("eval/")}
        pre = {k: v for k, v in signals.items() if not is_post_step(k)}
        post = {k: v for k, v in signals.items() if is_post_step(k)}
        for ev in det.check_pre_step(step, pre) + det.check_post_step(step, post):
            if ev.get("level") != "advice" and (keep is None or ev["event"] in keep):
                steps.append(step)  # advice (a condition of the run, said once) is no flag
        ep = getattr(det, "episode", None)
        if keep is None and ep is not None:
            episodes[ep["id"]] = (ep["start"], ep["last"])
    out = Flags(sorted(set(steps)))
    out.episodes = sorted(episodes.values())
    return out


def _armed(al: Flags, arm: int) -> Flags:
    out = Flags(a for a in al if a >= arm)
    out.episodes = al.episodes  # an episode's warning counts from the step its rule armed
    return out


# ---- scoring ------------------------------------------------------------------------------
def first_flag(alarms: list[int], onset: int, lookback: int = LOOKBACK) -> int | None:
    hits = [a for a in alarms if onset - lookback <= a <= onset + LATE]
    # an episode still open within the lookback: flagged by the warning that opened it
    hits += [a for a, last in getattr(alarms, "episodes", [])
             if a <= onset + LATE and last >= onset - lookback]
    return onset - min(hits) if hits else None


def lookback(run: dict) -> int:
    """A natural instability builds up over the whole run (the issue asks for >= 50 steps of
    lead): any flag since the monitor armed counts; an injected one: LOOKBACK steps."""
    return 10**9 if run["scenario"] in sc.NATURAL else LOOKBACK


def score(runs: list[dict], alarms: list[list[int]], arm: int) -> dict:
    """Recall, leads and false alarms of one detector setting over all runs; `alarms` holds
    each run's alarm steps from `arm` on (the same scored span for every detector)."""
    leads = {"pre": [], "none": []}  # spikes with / without a possible precursor
    false, stable_steps = 0, 0
    for run, al in zip(runs, alarms):
        kind = "pre" if sc.SCENARIOS[run["scenario"]][1] else "none"
        leads[kind] += [first_flag(al, o, lookback(run)) for o in run["gt"]]
        if run["scenario"] in STABLE:
            stable_steps += sum(1 for r in run["trace"] if r["step"] >= arm)
            false += sum(1 for a in al  # alarms near a real spike in a stable run are true
                         if not any(o - LOOKBACK <= a <= o + LATE for o in run["gt_all"]))
    return _summary(leads, false, stable_steps)


def _rate(xs: list, ok) -> float:
    return sum(1 for x in xs if x is not None and ok(x)) / len(xs) if xs else math.nan


def _summary(leads: dict, false: int, stable_steps: int) -> dict:
    found = [x for x in leads["pre"] + leads["none"] if x is not None]
    pct = (lambda q: float(np.percentile(found, q))) if found else (lambda q: math.nan)
    return {"n_pre": len(leads["pre"]), "n_none": len(leads["none"]),
            "recall_ahead": _rate(leads["pre"], lambda x: x >= 1),
            "recall_onset": _rate(leads["pre"], lambda x: x >= 0),
            "recall_onset_none": _rate(leads["none"], lambda x: x >= 0),
            "recall_any": _rate(leads["pre"] + leads["none"], lambda x: True),
            "lead_median": pct(50), "lead_p10": pct(10), "lead_p90": pct(90),
            "false_alarms": false, "stable_steps": stable_steps,
            "fa_per_1000": 1000.0 * false / stable_steps if stable_steps else math.nan,
            "leads": leads}


def replay_all(runs: list[dict], mon: dict, arm: int) -> dict:
    """Every detector's alarm steps on every run, at its default and over its sweep grid."""
    return {name: {v: [_armed(alarm_steps(make(v, mon), r["trace"]), arm)
                       for r in runs] for v in sorted(set(grid) | {default})}
            for name, (_, default, grid, make) in DETECTORS.items()}


def evaluate(runs: list[dict], alarms: dict, arm: int, keep=lambda r: True) -> dict:
    """Every detector's scores over the runs `keep` selects (replay_all's `alarms`)."""
    idx = [i for i, r in enumerate(runs) if keep(r)]
    sub = [runs[i] for i in idx]
    out = {}
    for name, (knob, default, _, _) in DETECTORS.items():
        rows = {v: score(sub, [al[i] for i in idx], arm) for v, al in alarms[name].items()}
        out[name] = {"knob": knob, "default": default, "sweep": rows,
                     "alarms": [alarms[name][default][i] for i in idx]}
    return out


def matched(sweep: dict, budget: float) -> tuple[float, dict]:
    """The setting with the best recall (ahead, then at onset, then fewest alarms) among those
    within the false-alarm budget; the strictest setting if none is."""
    ok = [(v, s) for v, s in sweep.items() if s["fa_per_1000"] <= budget]
    if not ok:
        return max(sweep.items(), key=lambda vs: -vs[1]["fa_per_1000"])
    return max(ok, key=lambda vs: (_n(vs[1]["recall_ahead"]), _n(vs[1]["recall_onset"]),
                                   _n(vs[1]["recall_onset_none"]), -vs[1]["fa_per_1000"]))


def _n(x: float) -> float:
    return -1.0 if math.isnan(x) else x


# ---- running ------------------------------------------------------------------------------
def plan_runs(args) -> list[tuple]:
    """(scenario, seed, inject_at) for every alert-mode run; injection steps differ per seed
    so no detector meets the instability at the same point of its windows every time."""
    todo = []
    for name in args.scenarios:
        if name in STABLE:  # stable runs: the false-alarm denominator, stable_seeds of each
            todo += [(name, s, 0) for s in range(1, args.stable_seeds + 1)]
        else:
            todo += [(name, s, args.inject + 7 * (s - 1)) for s in range(1, args.seeds + 1)]
    return todo


def run_all(args, shards: Path, workdir: Path) -> tuple[list[dict], dict | None]:
    """Every planned run (and its twin), and the rollback run unless only some scenarios are
    recorded (--record: the stored file's rollback stands); returns (runs, rollback run)."""
    jobs = [(n, s, args.steps, k, shards, workdir, args.monitor) for n, s, k in plan_runs(args)]
    rb = args.rollback
    if not args.record:
        jobs.append((rb, 1, args.steps, args.inject, shards, workdir,
                     [*args.monitor, "monitor.action=rollback", "checkpoint.every=10",
                      "monitor.rollback_skip_batches=20"], "rollback"))
    twins = [(n, s, args.steps, 0, shards, workdir, args.monitor, "twin")
             for n, s, _ in plan_runs(args) if n in sc.NATURAL]
    jobs += twins
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_run_job, jobs))
    else:
        results = [_run_job(j) for j in jobs]
    n = len(jobs) - len(twins)
    args.twins = {(r["scenario"], r["seed"]): r for r in results[n:]}
    for r in results[:n]:
        twin = args.twins.get((r["scenario"], r["seed"]))
        r["gt_all"] = (sc.twin_gap_onsets(r["trace"], twin["trace"]) if twin
                       else sc.loss_spikes(r["trace"]))
        r["gt"] = [o for o in r["gt_all"] if o >= args.arm]  # a detector can flag these
    if args.record:
        return results[:n], None
    return results[:n - 1], results[n - 1]


def _run_job(job: tuple) -> dict:
    name, seed, steps, k, shards, workdir, extra, *tag = job
    t0 = time.perf_counter()
    r = sc.run_scenario(name, seed, steps, k, shards, workdir, extra, *(tag or ["alert"]))
    print(f"  ran {name:<13} seed {seed} {r['tag']:<8} {r['steps_run']} steps  "
          f"{time.perf_counter() - t0:5.1f}s  held-out spikes at "
          f"{sc.loss_spikes(r['trace']) or '-'}", flush=True)
    return r


# ---- reporting ----------------------------------------------------------------------------
def _f(x: float, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _row(name: str, knob: str, v: float, s: dict) -> list:
    return [name, f"{knob}{v:g}", _f(s["recall_ahead"]), _f(s["recall_onset"]),
            _f(s["recall_onset_none"]), _f(s["recall_any"]), _f(s["lead_median"], 1),
            _f(s["lead_p10"], 1), _f(s["lead_p90"], 1), _f(s["fa_per_1000"], 1)]


HEAD = ["detector", "setting", "ahead>=1", "by_onset", "by_onset*", "flagged",
        "lead_med", "p10", "p90", "FA/1k"]


def print_detection(res: dict, pick_from: dict, budgets: list[float], part: str) -> dict:
    """The published settings, then each detector's best setting within each budget, chosen
    on `pick_from` (the tuning part) and scored on `res` (the part the tables report)."""
    rows, picks = [], {}
    for name, d in res.items():
        rows.append(_row(name, d["knob"], d["default"], d["sweep"][d["default"]]))
    s0 = next(iter(res["ours"]["sweep"].values()))
    print_table(HEAD, rows, f"\ndetection at the published settings, {part} ({s0['n_pre']} "
                f"spikes with a possible precursor, {s0['n_none']} without (*); FA over "
                f"{s0['stable_steps']} stable steps)")
    for budget in budgets:
        rows, picks[budget] = [], {}
        for name, d in res.items():
            v, _ = matched(pick_from[name]["sweep"], budget)
            picks[budget][name] = v
            rows.append(_row(name, d["knob"], v, d["sweep"][v]))
        print_table(HEAD, rows, f"\nat a matched false-alarm rate: each detector's best "
                    f"setting with <= {budget:.2f} false alarms / 1000 stable steps on the "
                    f"tuning part, scored on the {part}")
    return picks


def tuned(run: dict) -> bool:
    return split.part(run["scenario"], run["seed"]) == "tune"


REAL_SPANS = ("held_out", "tune", "whole")  # the whole log: half of it tuned on


def real_span(step: int, span: str) -> bool:
    """Whether `step` of the real log counts in `span`: its held-out half, its tuning half
    (both from REAL_FROM on) or the whole log from REAL_FROM (not a held-out figure)."""
    if step < REAL_FROM:
        return False
    return span == "whole" or split.real_part(REAL_LOG.name.split(".")[0], step) == span


def real_log_rates(mon: dict, picks: dict) -> dict:
    """Alarms per 1000 steps on the real stable log (REAL_SPANS), every detector at its
    published setting and at each matched setting. The suite's monitor overrides (warm-up,
    window) are for 300-step runs: the real log gets the defaults."""
    if not REAL_LOG.is_file():
        return {}
    trace = [dict(signals, step=step) for step, signals in read_trace(REAL_LOG)]
    n = {sp: sum(1 for r in trace if real_span(r["step"], sp)) for sp in REAL_SPANS}
    out = {}
    for name, (knob, default, _, make) in DETECTORS.items():
        settings = {"published": default, **{f"matched<={b:g}": p[name] for b, p in picks.items()}}
        out[name] = {}
        for label, v in settings.items():
            al = alarm_steps(make(v, {}), trace)
            for sp in REAL_SPANS:
                out[name][f"{label}:{sp}"] = 1000 * sum(1 for a in al if real_span(a, sp)) / n[sp]
    rows = [[name, *(_f(v, 2) for v in r.values())] for name, r in out.items()]
    print_table(["detector", *next(iter(out.values()))], rows,
                f"\nreal stable log {REAL_LOG.name}: alarms / 1000 steps from step {REAL_FROM}; "
                f"held_out = steps > {split.REAL_TUNE_LAST[REAL_LOG.name.split('.')[0]]} "
                f"({n['held_out']} steps), tune = the half tuned on ({n['tune']}), whole = "
                f"both ({n['whole']}, NOT a held-out figure); every alarm is a false one")
    return out


def print_held_out(runs: list[dict], res: dict, arm: int) -> dict:
    """Ours at its defaults (events and alarms only) on the tuning part, the held-out part
    and the part no tuning ever saw (spike_split.clean_held_out)."""
    out = {}
    parts = (("tuning", tuned), ("held-out", lambda r: not tuned(r)),
             ("clean held-out", lambda r: split.clean_held_out(r["scenario"], r["seed"])))
    for det in ("ours", "ours-alarm"):
        alarms = res[det]["alarms"]
        for name, keep in parts:
            idx = [i for i, r in enumerate(runs) if keep(r)]
            if any(runs[i]["scenario"] in STABLE for i in idx):
                out[f"{det} {name}"] = score([runs[i] for i in idx], [alarms[i] for i in idx],
                                             arm)
    rows = [[n.split()[0], " ".join(n.split()[1:]).replace(" ", "_"), s["n_pre"], s["n_none"],
             _f(s["recall_ahead"]), _f(s["recall_onset"]), _f(s["recall_onset_none"]),
             _f(s["lead_median"], 1), s["false_alarms"], s["stable_steps"],
             _f(s["fa_per_1000"], 1)] for n, s in out.items()]
    print_table(["detector", "part", "spikes", "spikes*", "ahead>=1", "by_onset", "by_onset*",
                 "lead_med", "FA", "stable_steps", "FA/1k"], rows,
                "\nours at its defaults, by calibration part (bench/spikes/spike_split.py)")
    return out


def low_lr(run: dict) -> set[int]:
    """The steps of a run whose LR is under LOW_LR x its peak after the warm-up: the end of
    its schedule (anneal_to_0: the last third, LR falling to 0; stable: LR between its 10%
    floor and 25%)."""
    lrs = [(int(r["step"]), r.get("optim/lr", math.nan)) for r in run["trace"]]
    peak = max((v for _, v in lrs if math.isfinite(v)), default=math.nan)
    top = next((s for s, v in lrs if v == peak), 0)
    return {s for s, v in lrs if s > top and v < LOW_LR * peak}


def false_in(run: dict, al: list[int], arm: int, steps: set[int] | None = None) -> tuple[int, int]:
    """(false alarms, steps) of a stable run from `arm` on, within `steps` if given; an alarm
    near a real spike of the run is a true one (as in `score`)."""
    inside = (lambda x: x >= arm) if steps is None else (lambda x: x >= arm and x in steps)
    n = sum(1 for r in run["trace"] if inside(int(r["step"])))
    fa = sum(1 for a in al if inside(a)
             and not any(o - LOOKBACK <= a <= o + LATE for o in run["gt_all"]))
    return fa, n


def print_end_of_schedule(runs: list[dict], alarms: dict, picks: dict, arm: int) -> dict:
    """False alarms / 1000 steps on the held-out stable runs, those of anneal_to_0 (cosine
    to LR 0) and those of stable (cosine to its 10% floor) apart, over every scored step and
    over the end of the schedule (low_lr); every detector at its published setting and at
    its matched setting (FA_BUDGET, chosen on the tuning part)."""
    groups = {n: [i for i, r in enumerate(runs) if r["scenario"] == n and not tuned(r)]
              for n in STABLE}
    if not groups["anneal_to_0"]:
        return {}
    groups = {n: idx for n, idx in groups.items() if idx}  # --quick: no held-out stable run
    cols, out, rows = {}, {}, []
    for name, idx in groups.items():
        for span in ("all", "low_lr"):
            cols[f"{name}:{span}"] = (idx, span)
    settings = {"published": {n: d[1] for n, d in DETECTORS.items()}}
    if FA_BUDGET in picks:
        settings[f"matched<={FA_BUDGET:g}"] = picks[FA_BUDGET]
    n_steps = {}
    for label, values in settings.items():
        for name, (knob, *_rest) in DETECTORS.items():
            v, rec = values[name], {}
            for col, (idx, span) in cols.items():
                fa, n = 0, 0
                for i in idx:
                    f, k = false_in(runs[i], alarms[name][v][i], arm,
                                    low_lr(runs[i]) if span == "low_lr" else None)
                    fa, n = fa + f, n + k
                rec[col] = {"false_alarms": fa, "steps": n,
                            "fa_per_1000": 1000.0 * fa / n if n else math.nan}
                n_steps[col] = n
            out[f"{name} {knob}{v:g} ({label})"] = rec
            rows.append([name, f"{knob}{v:g}", label,
                         *(f"{r['false_alarms']}:{_f(r['fa_per_1000'], 1)}" for r in rec.values())])
    seeds = {n: sorted(runs[i]["seed"] for i in idx) for n, idx in groups.items()}
    print_table(["detector", "setting", "picked", *cols], rows,
                f"\nend of schedule, held-out stable runs: false alarms:per 1000 steps from step "
                f"{arm} (all) and where LR < {LOW_LR:g} x its peak (low_lr); anneal_to_0 = cosine "
                f"to LR 0, stable = to its 10% floor; seeds " + ", ".join(
                    f"{n} {v}" for n, v in seeds.items()) + "; steps: " + ", ".join(
                    f"{c} {n}" for c, n in n_steps.items()))
    mon_ev = [f"s{runs[i]['seed']}@{a}" for i in groups["anneal_to_0"]
              for a in alarms["ours"][DETECTORS["ours"][1]][i]]
    print(f"\nours' events on anneal_to_0 (seed@step): {', '.join(mon_ev) or 'none'}")
    return out


def print_per_scenario(runs: list[dict], alarms: dict) -> None:
    """Lead per spike (one entry per seed and spike; '.' = not flagged in the window)."""
    rows = []
    for name in dict.fromkeys(r["scenario"] for r in runs):
        idx = [i for i, r in enumerate(runs) if r["scenario"] == name]
        cells = [",".join(_lead(first_flag(alarms[d][i], o, lookback(runs[i])))
                          for i in idx for o in runs[i]["gt"])
                 or "-" for d in alarms]
        rows.append([name, sum(len(runs[i]["gt"]) for i in idx), *cells])
    print_table(["scenario", "spikes", *alarms], rows,
                "\nlead in steps per spike, published settings (. = not flagged, - = no spike)")


def _lead(x: int | None) -> str:
    return "." if x is None else str(x)


def print_per_kind(runs: list[dict], alarms: dict, names: tuple[str, ...]) -> None:
    """Per scenario, every seed (both parts; the part is in the seed column of the per-spike
    table): spikes flagged by onset, and the lead's median / p10 / p90, at published settings."""
    rows = []
    for kind in dict.fromkeys(r["scenario"] for r in runs if r["scenario"] not in STABLE):
        idx = [i for i, r in enumerate(runs) if r["scenario"] == kind]
        n = sum(len(runs[i]["gt"]) for i in idx)
        cells = []
        for d in names:
            al = alarms[d][DETECTORS[d][1]]
            leads = [first_flag(al[i], o, lookback(runs[i])) for i in idx for o in runs[i]["gt"]]
            got = [x for x in leads if x is not None and x >= 0]
            pct = (lambda q: _f(float(np.percentile(got, q)), 0)) if got else (lambda q: "-")
            cells.append(f"{len(got)}/{n}:{pct(50)}/{pct(10)}/{pct(90)}")
        rows.append([kind, split.part(kind, 99) if kind in split.HELD_SCENARIOS else "tune+held",
                     *cells])
    print_table(["scenario", "part", *names], rows, "\nper kind: spikes flagged by onset / all, "
                "lead median/p10/p90 of those (published settings, every seed)")


def print_natural(runs: list[dict], twins: dict, mon: dict) -> dict:
    """Per natural run: its onset against the twin, the first warning of ours at its defaults
    and the first from the attention-logit bound, their lead, the bound's peak in run and
    twin, and the twin's own warnings (a high-LR run that stays healthy: false ones)."""
    rows, out = [], []
    for r in runs:
        twin = twins.get((r["scenario"], r["seed"]))
        if twin is None:
            continue
        # from step 1: the growth rule arms in the LR warm-up (the issue: a lead measured from
        # a monitor armed as early as its statistics allow)
        warn = lambda e: e.get("level") != "advice"  # noqa: E731
        ev = [e for e in replay_events(_ours(1.0, mon), r["trace"]) if warn(e)]
        attn = [e["step"] for e in ev if e["signal"].startswith("model/attn_logit_bound")]
        first = ev[0]["step"] if ev else None
        onset = r["gt_all"][0] if r["gt_all"] else None
        tw = [e for e in replay_events(_ours(1.0, mon), twin["trace"]) if warn(e)]
        rec = {"scenario": r["scenario"], "seed": r["seed"], "onset": onset,
               "first_warning": first, "first_attn_warning": attn[0] if attn else None,
               "lead_any": None if onset is None or first is None else onset - first,
               "lead_attn": None if onset is None or not attn else onset - attn[0],
               "bound_peak": _peak(r["trace"]), "twin_bound_peak": _peak(twin["trace"]),
               "final_eval": r["final_eval"], "twin_final_eval": twin["final_eval"],
               "twin_warnings": len(tw)}
        out.append(rec)
        rows.append([rec["scenario"], rec["seed"], _lead(onset), _lead(first),
                     _lead(rec["first_attn_warning"]), _lead(rec["lead_any"]),
                     _lead(rec["lead_attn"]), f"{rec['bound_peak']:.0f}",
                     f"{rec['twin_bound_peak']:.0f}", _f(rec["final_eval"], 3),
                     _f(rec["twin_final_eval"], 3), len(tw)])
    if rows:
        print_table(["scenario", "seed", "onset", "1st_warn", "1st_attn", "lead", "lead_attn",
                     "bound_max", "twin_max", "final", "twin_final", "twin_warns"], rows,
                    f"\nnatural instabilities vs their twins (onset: held-out loss {sc.NAT_SMOOTH}"
                    f"-step mean > {1 + sc.NAT_GAP:g} x the twin's for {sc.NAT_HOLD} steps; "
                    f"ours at its defaults, warnings from step 1)")
    return out


def _peak(trace: list[dict]) -> float:
    return max(x.get("model/attn_logit_bound", 0.0) for x in trace)


def replay_events(det, trace: list[dict]) -> list[dict]:
    """Every event of `det` on a trace, fed as alarm_steps feeds it."""
    out = []
    for row in trace:
        step = int(row["step"])
        signals = {k: v for k, v in row.items() if k != "step" and not k.startswith("eval/")}
        out += det.check_pre_step(step, {k: v for k, v in signals.items() if not is_post_step(k)})
        out += det.check_post_step(step, {k: v for k, v in signals.items() if is_post_step(k)})
    return out


def print_rollback(clean: dict, broken: dict, saved: dict) -> dict:
    def rel(r):
        return r["final_eval"] / clean["final_eval"] - 1.0
    rb = [e for e in saved["events"] if e.get("event") == "rollback"]
    rows = [["clean", _f(clean["final_eval"], 4), "-", "-", "-"],
            ["unprotected", _f(broken["final_eval"], 4), f"{rel(broken):+.1%}", "-", "-"],
            ["rollback", _f(saved["final_eval"], 4), f"{rel(saved):+.1%}", len(rb),
             "stopped" if saved["stop_reason"] else "completed"]]
    print_table(["run", "final_loss", "vs_clean", "rollbacks", "end"], rows,
                f"\nrollback: {broken['scenario']} ({sc.SCENARIOS[broken['scenario']][0]}), "
                f"seed {broken['seed']}, k={broken['inject_at']}; clean = the stable run of "
                f"that seed, final_loss = held-out loss on {sc.FINAL_EVAL_SEQS} sequences")
    print()
    for e in rb:
        print(f"rolled back from step {e['from_step']} to {e['to_step']}, "
              f"skipped {e['skipped_samples']} samples")
    return {"clean": clean["final_eval"], "unprotected": broken["final_eval"],
            "rollback": saved["final_eval"], "rollback_vs_clean": rel(saved),
            "unprotected_vs_clean": rel(broken), "rollbacks": rb,
            "stop_reason": saved["stop_reason"]}


def print_overhead(runs: list[dict], mon: dict) -> dict:
    """In-loop monitor CPU time per step (the callback and the update-norm pass) over the
    step's CPU time (held-out eval excluded), and the detector alone replaying a trace."""
    mon_s = sum(r["monitor_cpu_s"] for r in runs)
    step_s = sum(r["cpu_s"] - r["eval_cpu_s"] for r in runs)
    steps = sum(r["steps_run"] for r in runs)
    trace = max(runs, key=lambda r: r["steps_run"])["trace"]
    t0 = time.thread_time()
    alarm_steps(_ours(1.0, mon), trace)
    alone = (time.thread_time() - t0) / len(trace)
    out = {"monitor_ms_per_step": 1e3 * mon_s / steps, "step_ms": 1e3 * step_s / steps,
           "ratio": mon_s / step_s, "detector_alone_ms_per_step": 1e3 * alone}
    print(f"\nmonitor overhead: {out['monitor_ms_per_step']:.3f} ms of CPU per step in the loop"
          f" / {out['step_ms']:.1f} ms per step = {out['ratio']:.2%} (detector alone, replayed:"
          f" {out['detector_alone_ms_per_step']:.3f} ms/step)")
    return out


# ---- main ---------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 scenarios x 1 seed, 60 steps")
    ap.add_argument("--out", help="write every number to this JSON file")
    ap.add_argument("--seeds", type=int, default=6, help="seeds per instability scenario")
    ap.add_argument("--stable-seeds", type=int, default=12, help="stable runs (FA denominator)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--workdir", default="runs/spike_suite")
    ap.add_argument("--rescore", metavar="FILE",
                    help="no training: replay the traces a previous --out wrote")
    ap.add_argument("--record", metavar="SCENARIO", action="append", default=[],
                    help="with --rescore: train only this scenario (repeatable; its twins "
                         "too) at FILE's settings, replace FILE's runs of it, score them all")
    args = ap.parse_args(argv)
    if args.record and not args.rescore:
        ap.error("--record needs --rescore FILE (the runs it is merged into)")
    unknown = [n for n in args.record if n not in sc.SCENARIOS]
    if unknown:
        ap.error(f"--record: unknown scenario(s) {unknown}; known: {list(sc.SCENARIOS)}")
    # the monitor must arm early in short runs: 50-step warm-up, 64-step windows (quick: 30
    # and 32, after the one-step transient this model shows when its LR peaks at step ~28)
    warm, window = (30, 32) if args.quick else (50, 64)
    if args.quick:
        args.seeds, args.stable_seeds, args.steps = 1, 1, 60
    if args.rescore:
        args.stored = load_results(args.rescore)
        conf = args.stored["config"]
        args.quick, args.seeds, args.stable_seeds, args.steps = (
            conf["quick"], conf["seeds"], conf["stable_seeds"], conf["steps"])
        warm, window = (30, 32) if args.quick else (50, 64)
    args.scenarios = ["stable", "lr_crash"] if args.quick else list(sc.SCENARIOS)
    if args.record:  # the stored runs of every other scenario are kept as they are
        args.scenarios = list(dict.fromkeys(args.record))
    args.rollback, args.arm = "lr_crash", warm
    args.inject = 45 if args.quick else args.steps // 2
    # trend_after: the LR warm-up of spike_scenarios.MODEL, as load_config resolves it live
    args.mon = {"warmup_steps": warm, "window": window, "trend_after": sc.LR_WARMUP}
    args.monitor = [f"monitor.warmup_steps={warm}", f"monitor.window={window}"]
    return args


def print_header(args) -> None:
    if args.record:
        print(f"recording {len(plan_runs(args))} runs ({', '.join(args.record)}) into the runs "
              f"of {args.rescore}")
    print(f"spike suite: {len(plan_runs(args)) + 1} runs of {args.steps} steps, monitor "
          f"warm-up {args.arm} and window {args.mon['window']}, k = step {args.inject} + 7 x "
          f"(seed - 1)")
    for name in args.scenarios:
        text, pre, _ = sc.SCENARIOS[name]
        print(f"  {name:<13} {text}{'' if pre else '  (* no precursor possible)'}")
    print("  (fp16 loss-scale collapse: not run; DeepSpeed refuses fp16 on the CPU accelerator)")
    print(f"ground truth: held-out loss > {sc.GT_RATIO} x its min over the previous "
          f"{sc.GT_WINDOW} steps for >= {sc.GT_PERSIST} steps (onset = the first); a spike is "
          f"flagged by a detector's first alarm in [onset - {LOOKBACK}, onset + {LATE}]; natural "
          f"runs (nat_*): held-out loss ({sc.NAT_SMOOTH}-step mean) > {1 + sc.NAT_GAP:g} x its "
          f"twin's for {sc.NAT_HOLD} steps, flagged by any alarm from step {args.arm} to onset "
          f"+ {LATE}", flush=True)


def load_results(path: str | Path) -> dict:
    """A previous --out file with its traces back as one dict per step (TRACE_KEYS)."""
    import json

    data = json.loads(Path(path).read_text())
    keys = data["trace_keys"]
    for r in data["runs"] + data.get("twins", []):
        r["trace"] = [{k: v for k, v in zip(keys, row) if v is not None} for row in r["trace"]]
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    print_header(args)
    if args.rescore:
        stored = args.stored
        if stored["config"]["monitor"] != args.mon:
            raise SystemExit(f"{args.rescore}: recorded with monitor {stored['config']['monitor']}"
                             f", this suite replays with {args.mon}")
        runs, saved = stored["runs"], None
        args.twins = {(r["scenario"], r["seed"]): r for r in stored.get("twins", [])}
        live_ok = f"not checked (rescored from {args.rescore})"
        if args.record:
            runs, live_ok = record_into(args, runs)
    else:
        workdir = Path(args.workdir)
        shards = sc.prepare_shards(workdir / "shards", 300_000 if args.quick else 1_000_000)
        runs, saved = run_all(args, shards, workdir)
        live_ok = _check_live(runs, args.mon)
    alarms = replay_all(runs, args.mon, args.arm)
    held = [r for r in runs if not tuned(r)]
    # --quick has no held-out stable run: its tables then cover every run (said in the title)
    scored = any(r["scenario"] in STABLE for r in held) and any(r["gt"] for r in held)
    part = "held-out part" if scored else "all runs (no held-out stable run)"
    res = evaluate(runs, alarms, args.arm, (lambda r: not tuned(r)) if scored else (lambda r: True))
    res_tune = evaluate(runs, alarms, args.arm, tuned)
    early = sum(len(r["gt_all"]) - len(r["gt"]) for r in runs)
    print(f"\n{sum(len(r['gt']) for r in runs)} held-out loss spikes scored; {early} more "
          f"before step {args.arm} (no detector armed) not scored; live monitor events == "
          f"replayed: {live_ok}")
    print_per_scenario(runs, {n: a[DETECTORS[n][1]] for n, a in alarms.items()})
    print_per_kind(runs, alarms, ("ours", "ours-alarm", "olmo", "zclip"))
    ours_fa = res_tune["ours"]["sweep"][1.0]["fa_per_1000"]
    # the target budget, and ours' own rate at its defaults (tuning part) when that is higher
    budgets = sorted({FA_BUDGET, max(FA_BUDGET, round(ours_fa, 2))})
    picks = print_detection(res, res_tune, budgets, part)
    end_of_schedule = print_end_of_schedule(runs, alarms, picks, args.arm)
    held_out = print_held_out(runs, evaluate(runs, alarms, args.arm), args.arm)
    real = real_log_rates(args.mon, picks)
    clean = next(r for r in runs if r["scenario"] == "stable" and r["seed"] == 1)
    broken = next(r for r in runs if r["scenario"] == args.rollback and r["seed"] == 1)
    natural = print_natural(runs, args.twins, args.mon)
    if saved is None:  # rescored: no run was trained, the file's figures stand
        rollback, overhead = stored["rollback"], stored["overhead"]
        print(f"\nrollback and overhead: not rerun (see {args.rescore})")
    else:
        rollback = print_rollback(clean, broken, saved)
        overhead = print_overhead(runs, args.mon)
    wall = time.perf_counter() - t0
    print(f"\nspike suite done in {wall:.0f} s")
    save_json(args.out, dict(_payload(args, runs, res, picks, rollback, overhead, wall, held_out),
                             real_log=real, scored_part=part, natural=natural,
                             end_of_schedule=end_of_schedule, recorded_now=args.record,
                             twins=[_run_json(r) for r in args.twins.values()],
                             # rescored: the runs' live "events" are the recording's
                             rescored_from=args.rescore))
    return 0


def record_into(args, stored: list[dict]) -> tuple[list[dict], str]:
    """Train args.record's scenarios (args.scenarios) at the stored file's settings, on the
    same shards (--workdir), and put them in place of the stored runs (and twins) of those
    scenarios; the rest stay as recorded. Runs are kept in SCENARIOS order."""
    workdir = Path(args.workdir)
    shards = sc.prepare_shards(workdir / "shards", 300_000 if args.quick else 1_000_000)
    kept_twins = {k: r for k, r in args.twins.items() if k[0] not in args.record}
    new, _ = run_all(args, shards, workdir)  # sets args.twins to the new twins
    args.twins = {**kept_twins, **args.twins}
    order = list(sc.SCENARIOS)
    runs = sorted([r for r in stored if r["scenario"] not in args.record] + new,
                  key=lambda r: (order.index(r["scenario"]), r["seed"]))
    ok = _check_live(new, args.mon)
    return runs, f"{ok} on the {len(new)} runs recorded now ({', '.join(args.record)}); others " \
                 f"not checked (rescored from {args.rescore})"


def _check_live(runs: list[dict], mon: dict) -> bool:
    """The in-loop SpikeDetector and the offline replay must see the same events."""
    return all(sorted({e["step"] for e in r["events"] if e.get("level") != "advice"})
               == alarm_steps(_ours(1.0, mon), r["trace"]) for r in runs)


TRACE_KEYS = ("step", "train/loss", "eval/heldout_loss", "optim/grad_norm_preclip",
              "optim/update_norm", "optim/lr", "optim/param_jump", "train/z_loss",
              "model/logit_lse_max", "model/attn_logit_bound")


def _payload(args, runs, res, picks, rollback, overhead, wall, held_out) -> dict:
    return {
        "config": {"steps": args.steps, "seeds": args.seeds, "stable_seeds": args.stable_seeds,
                   "monitor": args.mon, "quick": args.quick, "lookback": LOOKBACK,
                   "late": LATE, "gt": {"ratio": sc.GT_RATIO, "window": sc.GT_WINDOW,
                                        "persist": sc.GT_PERSIST, "rearm": sc.GT_REARM}},
        "detectors": {n: {"knob": d["knob"], "default": d["default"],
                          "matched": {str(b): p[n] for b, p in picks.items()},
                          "sweep": {str(v): s for v, s in d["sweep"].items()},
                          "alarms_at_default": d["alarms"]}
                      for n, d in res.items()},
        "fa_budgets_per_1000": list(picks), "rollback": rollback, "overhead": overhead,
        "held_out": {n: {k: v for k, v in s.items() if k != "leads"} for n, s in held_out.items()},
        "wall_s": wall,
        "runs": [_run_json(r) for r in runs],
        "trace_keys": TRACE_KEYS,
    }


def _run_json(r: dict) -> dict:
    return {"scenario": r["scenario"], "seed": r["seed"], "inject_at": r["inject_at"],
            "tag": r["tag"], "gt": r.get("gt"), "gt_all": r.get("gt_all"),
            "final_eval": r["final_eval"], "events": r["events"],
            "trace": [[row.get(k) for k in TRACE_KEYS] for row in r["trace"]]}


if __name__ == "__main__":
    sys.exit(main())
