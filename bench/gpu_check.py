"""The GPU acceptance check: one command, one table, a non-zero exit on any failure.

    .venv/bin/python bench/gpu_check.py [--out DIR] [--jobs N]     # one GPU, under 8 minutes
    .venv/bin/python bench/gpu_check.py --device cpu --quick        # the same logic on a CPU

Every training run is the real CLI (`python -m harness.cli train`) in a subprocess of its
own, as rank 0 of a world of one (RANK=0, WORLD_SIZE=1, a free MASTER_PORT): on a GPU that is
NCCL, which refuses CPU tensors, so any collective that is skipped or fed a CPU tensor at
world size 1 fails here. In order:

1. `harness prepare-data` once, before any training; every run then reads those shards (a
   run that prepared or rewrote them would change the manifest: checked at the end).
2. correctness: ZeRO 0-3 x bf16 and fp16 on a small GPT, every-layer activation
   checkpointing, the spike monitor on, eval/loss every 2 steps, 3 steps, gradient
   accumulation 2; and the tiny llama with qk_norm, z-loss and the chunked loss at ZeRO 1
   and 3 in bf16 (its reference: the full-logits loss with the same z-loss). Each run's FIRST pre-clip norm (optim/grad_norm_preclip at step 1 in
   RUN_DIR/metrics.jsonl) is compared with plain PyTorch in fp32 on the same weights and
   batch: harness.model.gpt.GPT built after harness.train.engine.seed_everything(train.seed) as
   harness.train.engine.build does, the first global batch drawn from the same shards by the
   trainer's GlobalSampler, loss / accumulation backward, clip_grad_norm_. These runs are
   small and go NORM_JOBS at a time.
3. speed: gpt2-small and gpt-1.3b with and without checkpointing, one at a time, micro batch
   from bench_gpu.MICRO halved until the planner says it fits this GPU, global batch = micro
   batch, 10 steps: tokens/s and MFU (medians of throughput/tokens_per_s and throughput/mfu
   after 3 warm-up steps), the largest memory/gpu_max_allocated_gb against the planner's
   prediction (harness.plan.planner.predict_memory(...)["peak"], which estimates exactly that
   counter), and the first pre-clip norm against the reference too. gpt2-small without
   checkpointing also runs with train.compile=true and with the chunked loss: compare their
   tok/s and memory with the plain row.

Tolerances. Norm: 2% (NORM_RTOL). A bf16 run starts from the fp32 weights rounded to 8
significant bits (up to 2^-9 = 0.2% per weight) and computes in bf16; the global norm sums
the squares of every gradient element, whose rounding errors mostly cancel. Measured on the
CPU with this check: 0.02% off (the tiny preset) and 0.07% (a 2-layer model) at ZeRO 0-3,
bf16 accumulation at ZeRO 0 included; an fp32 run matches to 2e-8. fp16 carries 3 more bits.
2% leaves a wide margin over rounding and still catches real errors: a missing or doubled
accumulation division (x2 here), a big layer group counted twice or left out, a loss scale
left in. (fp16 runs start at loss scale 2^12, not the default 2^16, so that an overflow in
the first step, which DeepSpeed answers by skipping it, cannot make the check flaky.) The
per-group norms (grad_norm/*) are NOT compared with fp32: the LayerNorm biases' gradients
are sums over every token with heavy cancellation, and bf16 puts that group 5.6% below fp32
on the tiny preset, in plain PyTorch exactly as in the harness.
Memory: the measured peak must stay under the planner's prediction plus the 10% margin the
planner itself adds (planner.MARGIN), else `harness plan` would call configurations safe
that are not. MFU must lie in (MIN_MFU, 1]: outside means a wrong peak (harness.model.flops) or
FLOP count, or a pathologically slow path.

Checkpoints: the harness always saves one at the end (gpt-1.3b: ~18 GB), so each run saves
under /dev/shm when it has room (else under --out) and the check deletes it afterwards.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from bench_gpu import MICRO, flash_runs
from common import median, one_micro_step, print_table

from harness.common.jsonl import read_lines
from harness.config import load_config
from harness.data.sampler import GlobalSampler
from harness.data.shards import MANIFEST, TokenShards
from harness.data.sources import TrainData
from harness.model import build_model
from harness.parallel.batch import make_plan
from harness.plan.planner import MARGIN, predict_memory
from harness.train.engine import seed_everything

ROOT = Path(__file__).resolve().parents[1]
NORM_RTOL = 0.02
MIN_MFU = 0.05
NORM_JOBS = 4  # small correctness runs sharing the GPU
RUN_TIMEOUT_S = 360
TIMED_OUT = 124  # as timeout(1) reports it; `harness train` exits 0, 2, 3 or 42
# the small GPT of the correctness runs (the tiny preset: 4 layers, d 128, T 128, vocab 512),
# global batch 16 = micro 8 x accumulation 2
NORM_MODEL = ["train.global_batch_size=16", "train.micro_batch_size=8"]
QUICK_MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.block_size=64",
               "train.global_batch_size=8", "train.micro_batch_size=4"]


def norm_runs(device: str, quick: bool) -> list[dict]:
    """ZeRO 0-3 x bf16, ZeRO 1-3 x fp16 (the config refuses fp16 at ZeRO 0); stage 0 sums and
    reduces in the run's precision (the config refuses fp32 accumulation without ZeRO)."""
    runs = []
    for precision in ("bf16", "fp16"):
        for stage in range(4) if precision == "bf16" else range(1, 4):
            dtypes = ([f"train.grad_accum_dtype={precision}", f"train.reduce_dtype={precision}"]
                      if stage == 0 else [])
            if precision == "fp16":
                dtypes.append("fp16.initial_scale_power=12")
            runs.append({
                "name": f"zero{stage}-{precision}", "kind": "norm", "preset": "tiny",
                "overrides": [*(QUICK_MODEL if quick else NORM_MODEL), f"zero.stage={stage}",
                              f"train.precision={precision}", *dtypes,
                              "activation_checkpointing.policy=every_layer",
                              "monitor.enabled=true", "train.max_steps=3",
                              "optim.warmup_steps=1", "data.eval_every=2",
                              "data.eval_batches=2"],
                # DeepSpeed's CPU accelerator has no fp16 (the config refuses it up front)
                "skip": "no fp16 on the CPU" if precision == "fp16" and device == "cpu" else None})
    # issue 13's model: llama with qk_norm, z-loss and the chunked loss, at ZeRO 1 and 3
    for stage in (1, 3):
        runs.append({
            "name": f"llama-zero{stage}-bf16", "kind": "norm", "preset": "tiny-llama",
            "overrides": [*(QUICK_MODEL if quick else NORM_MODEL), f"zero.stage={stage}",
                          "train.precision=bf16", "model.qk_norm=true", "train.z_loss=1e-4",
                          "train.loss_chunk_tokens=256", "monitor.enabled=true",
                          "train.max_steps=3", "optim.warmup_steps=1", "data.eval_every=2",
                          "data.eval_batches=2"],
            "skip": None})
    return runs


def speed_runs(device: str, quick: bool, steps: int) -> list[dict]:
    presets = {"tiny": 8} if quick else {p: MICRO[p] for p in ("gpt2-small", "gpt-1.3b")}
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    runs = []
    for preset, micro in presets.items():
        for policy in ("none", "every_layer"):
            extra = [f"activation_checkpointing.policy={policy}", f"train.max_steps={steps}",
                     "optim.warmup_steps=1", "data.eval_every=0", "monitor.enabled=true",
                     *(QUICK_MODEL[:4] if quick else [])]
            m = micro
            while gpu_bytes and m > 1 and not predict_memory(
                    load_config(preset, [*one_micro_step(m), *extra]), 1,
                    gpu_memory_bytes=gpu_bytes)["fits"]:
                m //= 2
            runs.append({"name": f"{preset} {policy} micro {m}", "kind": "speed",
                         "preset": preset, "overrides": [*one_micro_step(m), *extra],
                         "skip": None})
            if preset == "gpt2-small" and policy == "none":  # issue 13's levers, same shape
                for lever in ("train.compile=true", "train.loss_chunk_tokens=4096"):
                    runs.append({"name": f"{preset} {policy} micro {m} {lever.split('.')[1]}",
                                 "kind": "speed", "preset": preset,
                                 "overrides": [*one_micro_step(m), *extra, lever], "skip": None})
    return runs


# ---- running the CLI --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(device: str, jobs: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    threads = 1 if device == "cpu" else max(1, (os.cpu_count() or 1) // jobs)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WANDB_MODE="disabled", OMP_NUM_THREADS=str(threads))
    return env


def harness_cli(args: list[str], log: Path, env: dict[str, str], timeout: float) -> int:
    """`python -m harness.cli ARGS`, output to `log`; the exit code, or TIMED_OUT after
    killing the whole process group at the timeout."""
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return TIMED_OUT


def checkpoint_root(out: Path, ckpt_bytes: float) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.5 * ckpt_bytes:
        return shm / f"gpu_check-{os.getpid()}"
    return out / "checkpoints"


def train(run: dict, common: list[str], out: Path, device: str, jobs: int) -> dict:
    """One `harness train`; returns the step records of its metrics.jsonl and how it ended."""
    run_dir = out / "runs" / run["name"].replace(" ", "_")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
    n_params = predict_memory(run["cfg"], 1, device=device)["n_params"]
    ckpt = checkpoint_root(out, 16 * n_params) / run_dir.name
    args = ["train", "--config", run["preset"], *run["overrides"], *common,
            f"train.run_dir={run_dir}", f"checkpoint.dir={ckpt}"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    code = harness_cli(args, run_dir.with_suffix(".log"), child_env(device, jobs), RUN_TIMEOUT_S)
    shutil.rmtree(ckpt, ignore_errors=True)
    metrics = run_dir / "metrics.jsonl"
    records = read_lines(metrics) if metrics.is_file() else []  # a torn last line dropped
    return {"code": code, "seconds": time.perf_counter() - start, "log": str(run_dir) + ".log",
            "steps": [r for r in records if "optim/grad_norm_preclip" in r]}


# ---- the reference ----------------------------------------------------------------------
def reference_norm(cfg, device: str) -> float:
    """Plain PyTorch in fp32: the first pre-clip norm of cfg's run, one sample at a time (the
    mean over equal-length samples splits exactly; 1.3B parameters' fp32 activations for a
    whole micro batch would not fit)."""
    if cfg.model.dropout:
        raise ValueError("the reference needs model.dropout=0 (its RNG stream differs)")
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    torch.set_default_dtype(torch.float32)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(device)  # built on the CPU like harness.train.engine.build: same weights
    model.set_loss(cfg.train.z_loss, 0)  # the full-logits loss: the chunked one's reference
    batch = make_plan(cfg, 1).batch
    seqs = TokenShards.open(cfg.data.out_dir).sequences("train", cfg.model.block_size)
    data = TrainData(seqs, GlobalSampler(len(seqs), cfg.train.seed, batch.micro_batch, 0, 1),
                     device)
    for k in range(batch.grad_accum):
        x, y = data.micro_batch(0, k)  # what the trainer's first step draws
        for i in range(len(x)):
            (model(x[i:i + 1], y[i:i + 1]) / (batch.grad_accum * len(x))).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip.max_norm or math.inf)
    result = norm.item()
    del model, data
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def reference_key(run: dict) -> str:
    """Runs that differ only in precision, ZeRO stage, accumulation dtypes, checkpointing,
    monitor or eval share a reference."""
    cfg = run["cfg"]
    b = make_plan(cfg, 1).batch
    return json.dumps([vars(cfg.model), cfg.train.seed, b.micro_batch, b.grad_accum,
                       cfg.clip.max_norm, cfg.data.out_dir, cfg.train.z_loss], sort_keys=True)


# ---- judging ----------------------------------------------------------------------------
def new_row(name: str, kind: str, **values) -> dict:
    return {"name": name, "kind": kind, "status": "PASS", "norm": None, "reference": None,
            "tokens_per_s": None, "mfu": None, "memory_gb": None, "planned_gb": None,
            "seconds": 0.0, "problems": [], "notes": [], **values}


def judge(run: dict, result: dict, reference: float, device: str, warmup: int,
          min_mfu: float) -> dict:
    """The table row of one finished run: status PASS/FAIL and why."""
    row = new_row(run["name"], run["kind"], reference=reference, seconds=result["seconds"])
    problems = row["problems"]
    steps = result["steps"]
    if result["code"] != 0:
        ended = "timed out" if result["code"] == TIMED_OUT else f"exit {result['code']}"
        problems.append(f"{ended} (see {result['log']})")
    if not steps:
        problems.append("no step metrics")
        row["status"] = "FAIL"
        return row
    row["norm"] = norm = steps[0].get("optim/grad_norm_preclip")
    if steps[0].get("step") != 1 or not isinstance(norm, float) or not math.isfinite(norm):
        problems.append(f"step 1 norm {norm!r}")
    elif abs(norm / reference - 1) > NORM_RTOL:
        problems.append(f"norm off by {norm / reference - 1:+.2%}")
    if "optim/update_norm" not in steps[0]:
        problems.append("no optim/update_norm (monitor off?)")
    if run["kind"] == "norm":
        evals = [r["eval/loss"] for r in steps if "eval/loss" in r]
        if not evals or not all(isinstance(v, float) and math.isfinite(v) for v in evals):
            problems.append(f"eval/loss {evals}")
    measured = steps[warmup:] or steps
    row["tokens_per_s"] = median([r["throughput/tokens_per_s"] for r in measured])
    if device == "cuda":
        mfus = [r["throughput/mfu"] for r in measured if "throughput/mfu" in r]
        row["mfu"] = median(mfus) if mfus else None
        row["memory_gb"] = max(r.get("memory/gpu_max_allocated_gb", 0.0) for r in steps)
        row["planned_gb"] = predict_memory(run["cfg"], 1, device="cuda")["peak"] / 1e9
        if run["kind"] == "speed":
            if row["mfu"] is None or not min_mfu < row["mfu"] <= 1:
                problems.append(f"MFU {row['mfu']} outside ({min_mfu}, 1]")
            if row["memory_gb"] > row["planned_gb"] * (1 + MARGIN):
                problems.append(f"memory over the plan + {MARGIN:.0%}")
    row["status"] = "FAIL" if problems else "PASS"
    return row


def fmt(row: dict) -> list[str]:
    def num(v, spec):
        return "-" if v is None else format(v, spec)

    norm, ref = row["norm"], row["reference"]
    norm = "-" if norm is None or ref is None else f"{norm:.4f} / {ref:.4f} ({norm / ref - 1:+.2%})"
    memory = f"{num(row['memory_gb'], '.1f')} / {num(row['planned_gb'], '.1f')}"
    return [row["name"], row["status"], norm, num(row["tokens_per_s"], ",.0f"),
            num(row["mfu"], ".1%"), memory, f"{row['seconds']:.0f}",
            "; ".join(row["problems"] + row["notes"])]


# ---- the check --------------------------------------------------------------------------
def prepare(common: list[str], out: Path, device: str) -> tuple[dict, float]:
    data = Path(next(o.split("=", 1)[1] for o in common if o.startswith("data.out_dir=")))
    start = time.perf_counter()
    code = harness_cli(["prepare-data", "--config", "tiny", *common], out / "prepare-data.log",
                       child_env(device, 1), RUN_TIMEOUT_S)
    ok = code == 0 and (data / MANIFEST).is_file()
    row = new_row("prepare-data", "data", status="PASS" if ok else "FAIL",
                  seconds=time.perf_counter() - start,
                  problems=[] if ok else [f"exit {code} (see {out / 'prepare-data.log'})"])
    return row, (data / MANIFEST).stat().st_mtime if ok else 0.0


def execute(runs: list[dict], common: list[str], out: Path, device: str,
            jobs: int) -> dict[str, dict]:
    """The correctness runs `jobs` at a time (small: they share the GPU), then the speed runs
    one at a time (timed: alone on the GPU)."""
    norm = [r for r in runs if r["kind"] == "norm"]
    with ThreadPoolExecutor(jobs) as pool:
        results = dict(zip([r["name"] for r in norm],
                           pool.map(lambda r: train(r, common, out, device, jobs), norm)))
    for run in runs:
        if run["kind"] == "speed":
            results[run["name"]] = train(run, common, out, device, 1)
        print(f"  {run['name']}: exit {results[run['name']]['code']}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true",
                   help="a 2-layer model for the norms, the tiny preset for speed, 3 steps")
    p.add_argument("--out", default="runs/gpu_check", help="data, runs, logs, results.json")
    p.add_argument("--jobs", type=int, default=None,
                   help=f"correctness runs at a time (default {NORM_JOBS} on a GPU, 1 on a CPU)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (use --device cpu --quick to check the logic)")
        return 2
    device, out = args.device, Path(args.out).resolve()
    jobs = args.jobs or (NORM_JOBS if device == "cuda" else 1)
    warmup, steps = (1, 3) if args.quick else (3, 10)
    min_mfu = 0.0 if args.quick else MIN_MFU  # the tiny preset cannot keep a GPU busy
    out.mkdir(parents=True, exist_ok=True)
    common = [f"train.device={device}", f"data.out_dir={out / 'data'}", "data.vocab_size=512",
              f"data.max_bytes={300_000 if args.quick else 4_000_000}", "wandb.mode=disabled",
              "checkpoint.every=0", "train.log_every=1"]
    t0 = time.perf_counter()
    if device == "cuda":
        torch.set_num_threads(os.cpu_count() or 1)  # the references build big models on the CPU
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    data_row, manifest_mtime = prepare(common, out, device)  # before any training
    rows = [data_row]
    runs = norm_runs(device, args.quick) + speed_runs(device, args.quick, steps)
    if data_row["status"] == "PASS":
        todo = [r for r in runs if not r["skip"]]
        for run in todo:
            run["cfg"] = load_config(run["preset"], [*run["overrides"], *common])
        references: dict[str, float] = {}
        for run in todo:  # here, before the runs: the GPU memory it takes is freed after each
            key = reference_key(run)
            if key not in references:
                references[key] = reference_norm(run["cfg"], device)
        results = execute(todo, common, out, device, jobs)
        for run in runs:
            if run["skip"]:
                rows.append(new_row(run["name"], run["kind"], status="SKIP", notes=[run["skip"]]))
                continue
            rows.append(judge(run, results[run["name"]], references[reference_key(run)],
                              device, warmup, min_mfu))
            if run["kind"] == "speed" and device == "cuda":
                rows[-1]["notes"].append("flash" if flash_runs(run["cfg"]) else "no flash")
        if (out / "data" / MANIFEST).stat().st_mtime != manifest_mtime:
            data_row["status"] = "FAIL"
            data_row["problems"].append("a training run rewrote the shards")
    print_table(["run", "status", "norm step 1 / fp32 reference", "tok/s", "MFU",
                 "mem GB / planned", "s", "note"], [fmt(r) for r in rows],
                f"\ngpu_check on {device}: 1 rank, `harness train` per row; norms within "
                f"{NORM_RTOL:.0%}, memory within the plan + {MARGIN:.0%}, MFU in ({min_mfu}, 1]")
    failed = [r["name"] for r in rows if r["status"] == "FAIL"]
    (out / "results.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows passed or skipped; "
          f"{'FAILED: ' + ', '.join(failed) if failed else 'all good'} "
          f"({time.perf_counter() - t0:.0f} s; details in {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
