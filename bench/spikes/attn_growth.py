"""Attention-logit growth at a high LR: which runs the monitor warns, and whether the warned
runs are the damaged ones (issue 25, item 3).

    OMP_NUM_THREADS=1 .venv/bin/python bench/spikes/attn_growth.py --out runs/attn_growth.json
        [--seeds 6] [--steps 300] [--jobs 2] [--lrs 0.1 0.03]
    .venv/bin/python bench/spikes/attn_growth.py --rescore runs/attn_growth.json [MORE.json]

Per seed, four runs of the spike suite's 2-layer model (spike_scenarios.MODEL), nothing
injected, cosine to LR 0: LR 0.1 and LR 0.03, each without qk-norm and with it (the twin: same
seed, data, LR). A run without qk-norm is DAMAGED when its held-out loss falls behind its
twin's (spike_scenarios.twin_gap_onsets: 10-step mean > 1.05 x the twin's for 20 steps); the
onset is that step. Every other run is UNDAMAGED: the twins (healthy high-LR runs that leave
their loss plateau, the update norm rising with it) and runs without qk-norm that never fall
behind their twin (their bound grows too: the case an absolute ceiling cannot tell apart).

Scored per rule, on every run, replayed from the recorded traces: a damaged run is a HIT when
the rule warned at or before its onset (lead = onset - first warning), a MISS otherwise; an
undamaged run with any warning of the rule is a FALSE warning. Also every warning the default
monitor gives per 1000 steps on the undamaged runs (what a user of a healthy high-LR run reads).

Split, fixed before any tuning: seeds 1-3 may be tuned on, seeds 4+ are held out; the script
prints both parts apart.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import spike_scenarios as sc  # noqa: E402

from harness.config.monitor import is_post_step  # noqa: E402
from harness.monitor import MonitorConfig, SpikeDetector  # noqa: E402

TUNE_SEEDS = (1, 2, 3)  # seeds 4+ are held out (fixed before any tuning)
LRS = (0.1, 0.03)
BASE = ["optim.min_lr_ratio=0"]  # cosine to LR 0, as the runs
KEYS = ("step", "train/loss", "eval/heldout_loss", "optim/grad_norm_preclip",
        "optim/update_norm", "optim/lr", "train/z_loss", "model/attn_logit_bound")
SUITE_MON = {"warmup_steps": 50, "window": 64}
ARCH = {"gpt2": [], "llama": ["model.arch=llama", "model.bias=false"]}  # the same width


def label(lr: float, qk: bool) -> str:
    return f"{'qk' if qk else 'noqk'}{lr:g}"


def _job(job: tuple) -> dict:
    seed, lr, qk, steps, shards, workdir, arch = job
    t0 = time.perf_counter()
    extra = [*BASE, f"optim.lr={lr}", f"model.qk_norm={str(qk).lower()}", *ARCH[arch]]
    r = sc.run_scenario("stable", seed, steps, 0, shards, workdir, extra,
                        f"{arch}-{label(lr, qk)}")
    print(f"  ran seed {seed} {label(lr, qk):<9} {time.perf_counter() - t0:5.1f}s", flush=True)
    return {"seed": seed, "lr": lr, "qk": qk, "arch": arch, "final_eval": r["final_eval"],
            "trace": [[row.get(k) for k in KEYS] for row in r["trace"]]}


def record(args) -> list[dict]:
    workdir = Path(args.workdir)
    shards = sc.prepare_shards(workdir / "shards", 1_000_000)
    jobs = [(s, lr, qk, args.steps, shards, workdir, args.arch)
            for s in range(1, args.seeds + 1) for lr in args.lrs for qk in (False, True)]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_job, jobs))


def traces(runs: list[dict]) -> None:
    """Rows back as dicts; each run without qk-norm gets its onset against its twin."""
    for r in runs:
        r["rows"] = [{k: v for k, v in zip(KEYS, row) if v is not None} for row in r["trace"]]
    key = lambda r: (r["seed"], r["lr"], r.get("arch", "gpt2"))  # noqa: E731
    twins = {key(r): r for r in runs if r["qk"]}
    for r in runs:
        twin = twins[key(r)]
        r["onset"] = None if r["qk"] else (sc.twin_gap_onsets(r["rows"], twin["rows"]) or
                                           [None])[0]


def replay(rows: list[dict], mon: dict) -> list[dict]:
    det, events = SpikeDetector(MonitorConfig(**mon)), []
    for row in rows:
        step = int(row["step"])
        sig = {k: v for k, v in row.items() if k != "step" and not k.startswith("eval/")}
        events += det.check_pre_step(step, {k: v for k, v in sig.items() if not is_post_step(k)})
        events += det.check_post_step(step, {k: v for k, v in sig.items() if is_post_step(k)})
    return events


def tag(r: dict) -> str:
    return f"{r.get('arch', 'gpt2')}-{label(r['lr'], r['qk'])}"


def rule_of(e: dict) -> str:
    return f"{e['event']}:{e.get('rule', '-')}:{e['signal']}"


def score(runs: list[dict], mon: dict, part: str) -> dict:
    sel = [r for r in runs if (r["seed"] in TUNE_SEEDS) == (part == "tuning")]
    damaged = [r for r in sel if r["onset"] is not None]
    healthy = [r for r in sel if r["onset"] is None]
    print(f"\n{part} part: {len(damaged)} damaged runs, {len(healthy)} undamaged "
          f"({', '.join(sorted({tag(r) for r in healthy}))})")
    per_rule: dict[str, dict] = {}
    steps_healthy, warn_healthy = 0, 0
    for r in sel:
        events = replay(r["rows"], mon)  # from step 1: the growth rule arms in warm-up
        events += [dict(e, event="ANY", rule="warning", signal="-") for e in events
                   if e["level"] == "warning"]
        if r["onset"] is None:
            steps_healthy += len(r["rows"])
            warn_healthy += sum(e["level"] == "warning" and e["event"] != "ANY" for e in events)
        for e in events:
            d = per_rule.setdefault(rule_of(e), {"hit": [], "false": set(), "late": []})
            if r["onset"] is None:
                d["false"].add((r["seed"], tag(r)))
        for rule, d in per_rule.items():
            firsts = [e["step"] for e in events if rule_of(e) == rule]
            if r["onset"] is not None and firsts:
                (d["hit"] if firsts[0] <= r["onset"] else d["late"]).append(
                    r["onset"] - firsts[0])
    print(f"  {'rule':<52} {'hits':>5} {'late':>5} {'false':>6}  leads")
    for rule, d in sorted(per_rule.items()):
        print(f"  {rule:<52} {len(d['hit']):>2}/{len(damaged):<2} {len(d['late']):>5} "
              f"{len(d['false']):>3}/{len(healthy):<2}  {sorted(d['hit'])}")
    for r in damaged:
        print(f"  damaged: seed {r['seed']} {tag(r)} onset {r['onset']}")
    rate = 1000 * warn_healthy / max(steps_healthy, 1)
    print(f"  warnings on undamaged runs: {warn_healthy} in {steps_healthy} steps = "
          f"{rate:.2f} / 1000")
    return per_rule


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/attn_growth.json")
    p.add_argument("--rescore", nargs="+", metavar="FILE", help="score recorded runs (merged)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    p.add_argument("--arch", choices=list(ARCH), default="gpt2")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--workdir", default="runs/attn_growth_work")
    args = p.parse_args(argv)
    if args.rescore:
        runs = [r for f in args.rescore for r in json.loads(Path(f).read_text())["runs"]]
    else:
        t0 = time.perf_counter()
        runs = record(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"keys": KEYS, "runs": runs}))
        print(f"recorded {len(runs)} runs in {time.perf_counter() - t0:.0f}s -> {args.out}")
    traces(runs)
    for name, mon in (("the suite's monitor (warm-up 50, window 64)", SUITE_MON),
                      ("the default monitor", {})):
        print(f"\n== {name}")
        for part in ("tuning", "held-out"):
            score(runs, mon, part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
