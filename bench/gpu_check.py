"""The GPU acceptance check: one command, one table, a non-zero exit on any failure.

    .venv/bin/python bench/gpu_check.py [--out DIR] [--jobs N]     # one GPU, under 8 minutes
    .venv/bin/python bench/gpu_check.py --device cpu --quick        # the same logic on a CPU

Every training run is the real CLI (`python -m harness.cli train`) in a subprocess of its
own, as rank 0 of a world of one (RANK=0, WORLD_SIZE=1, a free MASTER_PORT): on a GPU that is
NCCL, which refuses CPU tensors, so any collective that is skipped or fed a CPU tensor at
world size 1 fails here. In order:

1. `harness prepare-data` once, before any training; every run then reads those shards (a
   run that prepared or rewrote them would change the manifest: checked at the end).
2. correctness (small, NORM_JOBS at a time), 3 steps, gradient accumulation 2, the spike
   monitor on, eval/loss every 2 steps: ZeRO 0-3 x bf16 and ZeRO 1-3 x fp16 on a small GPT
   with every-layer checkpointing; the tiny llama with qk_norm, z-loss and the chunked loss
   at ZeRO 1 and 3; and the paths a review found crashes in: partitioned activations with
   contiguous checkpoint buffers and evaluation, cpu_checkpointing, optimizer offload.
   Against plain PyTorch in fp32 (bench/gpu_reference.py: the same initial weights, batches,
   clipping, AdamW groups and learning rates): the step-1 pre-clip norm, each step's
   train/loss, and the weights after the 3 updates (read from the run's final checkpoint as
   `harness export` reads it): an update that never reaches the weights, a doubled one or a
   stale one fails, where a step-1 norm alone would pass.
3. fp16 with a forced overflow (initial scale 2^24): step 1 must overflow and be skipped,
   the scale must halve (after fp16.hysteresis overflows) until the gradients fit, training
   must then go on to max_steps with finite norms and losses, and the monitor must raise no
   alarm (an overflow is the loss scaler's business, issue 23 item 4).
4. speed: gpt2-small and gpt-1.3b with and without checkpointing, one at a time, micro batch
   from bench_gpu.MICRO halved until the planner says it fits this GPU, global batch = micro
   batch, 10 steps: tokens/s and MFU (medians of throughput/tokens_per_s and throughput/mfu
   after 3 warm-up steps), the largest memory/gpu_max_allocated_gb against the planner's
   prediction (harness.plan.planner.predict_memory(...)["peak"], which estimates exactly that
   counter), and the first pre-clip norm against the reference too. gpt2-small without
   checkpointing also runs with train.compile=true and with the chunked loss, and with
   checkpointing with train.compile=true: compare their tok/s and memory with the plain row.
   A compiled row fails on any graph break inside a transformer block
   (harness.train.compile.block_graph_breaks on the row's model, before the runs): a block
   that falls back to eager would otherwise pass on its norm.

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
Losses: 0.5% per step (LOSS_RTOL); measured on the CPU (`--device cpu --quick`, bf16):
0.01% at ZeRO 1-3, 0.06% for the llama rows. Weights after 3 updates: 10% of the reference's
change (UPDATE_RTOL); measured 5.2-5.6% at ZeRO 1-3 and llama. Adam divides each gradient by
its own running magnitude, so an element whose bf16 gradient is rounding noise moves by a
full lr step in a random direction: the change is far noisier than the gradient (0.07%).
What the bounds catch: an update skipped (100%), doubled (100%), with the wrong lr or
weight decay on the wrong group (tens of %). The first measurement found ZeRO 0 bf16 23%
off (step 3's loss 0.56%), which these bounds fail.
Memory: the measured peak must lie within MEMORY_BAND of the planner's prediction: above it
plus the planner's own 10% margin (planner.MARGIN), `harness plan` would call configurations
safe that are not; under 75% of it, the planner overstates a term by a quarter and refuses
configurations that fit (or the reading misses the optimizer step, issue 23 item 6).
MFU (model FLOPs, the 6N + attention count of harness.model.flops, over the dense bf16 peak):
MFU_BAND per preset without checkpointing, 3/4 of the lower end with it (every_layer
recomputes each forward: 4/3 of the work for the same model FLOPs). Published dense bf16
training reaches 40-55% MFU on A100/H100 for 1-175B models (Megatron-LM, Narayanan et al.
2021; PaLM 46%), less for a 124M model whose small matmuls and per-layer overheads weigh more;
one GPU with DeepSpeed's engine and an unfused AdamW should reach half of that. Lower ends:
0.15 (gpt2-small), 0.25 (gpt-1.3b); upper ends 0.65 / 0.70, above the best published figures
for this hardware and precision, where a too-small FLOP count or a wrong peak would put it.
These bands are an argument, not yet a measurement: the first H100 run confirms or moves
them, with its table in the commit.

Checkpoints: the harness always saves one at the end (gpt-1.3b: ~18 GB), so each run saves
under /dev/shm when it has room (else under --out) and the check deletes it afterwards.
"""
from __future__ import annotations

import argparse
import json
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
from common import one_micro_step, print_table
from gpu_judge import (LOSS_RTOL, MEMORY_BAND, NORM_RTOL, TIMED_OUT, UPDATE_RTOL, judge,
                       new_row)
from gpu_reference import Reference, reference_run

from harness.checkpoint import io as checkpoint_io
from harness.common.jsonl import read_lines
from harness.config import load_config
from harness.data.shards import MANIFEST
from harness.model import build_model
from harness.parallel.batch import make_plan
from harness.plan.planner import predict_memory
from harness.train.compile import block_graph_breaks

ROOT = Path(__file__).resolve().parents[1]
NORM_JOBS = 4  # small correctness runs sharing the GPU
OVERFLOW_STEPS = 14
RUN_TIMEOUT_S = 360
# the small GPT of the correctness runs (the tiny preset: 4 layers, d 128, T 128, vocab 512),
# global batch 16 = micro 8 x accumulation 2
NORM_MODEL = ["train.global_batch_size=16", "train.micro_batch_size=8"]
QUICK_MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.block_size=64",
               "train.global_batch_size=8", "train.micro_batch_size=4"]


NORM_COMMON = ["monitor.enabled=true", "train.max_steps=3", "optim.warmup_steps=1",
               "data.eval_every=2", "data.eval_batches=2"]
CKPT = "activation_checkpointing"


def _norm_run(name: str, preset: str, quick: bool, extra: list[str], kind: str = "norm",
              skip: str | None = None) -> dict:
    return {"name": name, "kind": kind, "preset": preset, "skip": skip,
            "overrides": [*(QUICK_MODEL if quick else NORM_MODEL), *NORM_COMMON, *extra]}


def norm_runs(device: str, quick: bool) -> list[dict]:
    """ZeRO 0-3 x bf16, ZeRO 1-3 x fp16 (the config refuses fp16 at ZeRO 0); stage 0 sums and
    reduces in the run's precision (the config refuses fp32 accumulation without ZeRO). Then
    the paths a review found crashes or wrong numbers in: contiguous checkpoint buffers with
    evaluation, cpu_checkpointing, optimizer offload, and fp16 with a forced overflow."""
    no_fp16 = "no fp16 on the CPU" if device == "cpu" else None  # DeepSpeed's CPU accelerator
    runs = []
    for precision in ("bf16", "fp16"):
        for stage in range(4) if precision == "bf16" else range(1, 4):
            dtypes = ([f"train.grad_accum_dtype={precision}", f"train.reduce_dtype={precision}"]
                      if stage == 0 else [])
            if precision == "fp16":
                dtypes.append("fp16.initial_scale_power=12")
            runs.append(_norm_run(
                f"zero{stage}-{precision}", "tiny", quick,
                [f"zero.stage={stage}", f"train.precision={precision}", *dtypes,
                 f"{CKPT}.policy=every_layer"], skip=no_fp16 if precision == "fp16" else None))
    # issue 13's model: llama with qk_norm, z-loss and the chunked loss, at ZeRO 1 and 3
    for stage in (1, 3):
        runs.append(_norm_run(f"llama-zero{stage}-bf16", "tiny-llama", quick, [
            f"zero.stage={stage}", "train.precision=bf16", "model.qk_norm=true",
            "train.z_loss=1e-4", "train.loss_chunk_tokens=256"]))
    partitioned = [f"{CKPT}.policy=every_layer", f"{CKPT}.partition_activations=true"]
    runs += [
        _norm_run("zero1-bf16-contiguous-eval", "tiny", quick, [
            "zero.stage=1", "train.precision=bf16", *partitioned,
            f"{CKPT}.contiguous_memory_optimization=true"]),
        _norm_run("zero1-bf16-cpu-checkpointing", "tiny", quick, [
            "zero.stage=1", "train.precision=bf16", *partitioned,
            f"{CKPT}.cpu_checkpointing=true"]),
        _norm_run("zero2-bf16-offload", "tiny", quick, [
            "zero.stage=2", "train.precision=bf16", "zero.offload_optimizer=true"]),
        # 2^24 overflows the first steps' fp16 gradients (an element of 0.004 x 2^24 > 65504);
        # hysteresis 2, then a halving per overflow, until the gradients fit
        _norm_run("zero1-fp16-overflow", "tiny", quick, [
            "zero.stage=1", "train.precision=fp16", "fp16.initial_scale_power=24",
            f"train.max_steps={OVERFLOW_STEPS}"], kind="overflow", skip=no_fp16),
    ]
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
            if preset != "gpt2-small":
                continue
            # issue 13's levers, same shape; compile also where checkpointing used to make
            # every block run eager (issue 23 item 11)
            levers = (["train.compile=true", "train.loss_chunk_tokens=4096"] if policy == "none"
                      else ["train.compile=true"])
            for lever in levers:
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
    """One `harness train`; returns the step records and events of its metrics.jsonl, how it
    ended, and (norm rows) the fp32 weights of its final checkpoint."""
    run_dir = out / "runs" / run["name"].replace(" ", "_")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
    n_params = predict_memory(run["cfg"], 1, device=device)["n_params"]
    ckpt = checkpoint_root(out, 16 * n_params) / run_dir.name
    args = ["train", "--config", run["preset"], *run["overrides"], *common,
            f"train.run_dir={run_dir}", f"checkpoint.dir={ckpt}"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    code = harness_cli(args, run_dir.with_suffix(".log"), child_env(device, jobs), RUN_TIMEOUT_S)
    seconds = time.perf_counter() - start
    params = final_params(run_dir) if run["kind"] == "norm" and code == 0 else {}
    shutil.rmtree(ckpt, ignore_errors=True)
    metrics = run_dir / "metrics.jsonl"
    records = read_lines(metrics) if metrics.is_file() else []  # a torn last line dropped
    return {"code": code, "seconds": seconds, "log": str(run_dir) + ".log", "params": params,
            "steps": [r for r in records if "optim/grad_norm_preclip" in r],
            "events": [r for r in records if "event" in r]}


def final_params(run_dir: Path) -> dict:
    """The fp32 weights of the run's newest checkpoint (the one saved at the end), read as
    `harness export` reads them; {} when there is none (the row then fails)."""
    try:
        return checkpoint_io.state_dict(checkpoint_io.find_checkpoint(run_dir)[1])
    except Exception as err:  # noqa: BLE001 - reported in the row, not raised
        print(f"  {run_dir.name}: no final weights ({err})", flush=True)
        return {}


# ---- the reference (bench/gpu_reference.py) ---------------------------------------------
def reference_key(run: dict) -> str:
    """Runs that differ only in precision, ZeRO stage, accumulation dtypes, checkpointing,
    offload, monitor or eval share a reference."""
    cfg = run["cfg"]
    b = make_plan(cfg, 1).batch
    return json.dumps([vars(cfg.model), vars(cfg.optim), cfg.train.seed, cfg.train.max_steps,
                       b.micro_batch, b.grad_accum, cfg.clip.max_norm, cfg.data.out_dir,
                       cfg.train.z_loss, run["kind"]], sort_keys=True, default=str)


def make_reference(run: dict, device: str) -> Reference:
    """Norm rows: 3 updates and the weights after them; speed rows: the first norm only (a
    1.3B model's fp32 weights and AdamW states would crowd the GPU the runs need)."""
    steps = run["cfg"].train.max_steps if run["kind"] == "norm" else 1
    return reference_run(run["cfg"], device, steps, keep_params=run["kind"] == "norm")


# ---- the table --------------------------------------------------------------------------
def fmt(row: dict) -> list[str]:
    def num(v, spec):
        return "-" if v is None else format(v, spec)

    norm, ref = row["norm"], row["reference"]
    norm = "-" if norm is None or ref is None else f"{norm:.4f} / {ref:.4f} ({norm / ref - 1:+.2%})"
    memory = f"{num(row['memory_gb'], '.1f')} / {num(row['planned_gb'], '.1f')}"
    after = f"{num(row['loss_err'], '.2%')} / {num(row['update_err'], '.1%')}"
    return [row["name"], row["status"], norm, after, num(row["tokens_per_s"], ",.0f"),
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
    norm = [r for r in runs if r["kind"] != "speed"]
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
                   help=f"correctness runs at a time (default {NORM_JOBS} on a GPU, one per "
                        f"core up to {NORM_JOBS} on a CPU: each trains on one thread)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (use --device cpu --quick to check the logic)")
        return 2
    device, out = args.device, Path(args.out).resolve()
    jobs = args.jobs or (NORM_JOBS if device == "cuda" else min(NORM_JOBS, os.cpu_count() or 1))
    warmup, steps = (1, 3) if args.quick else (3, 10)
    min_mfu = 0.0 if args.quick else None  # the tiny preset cannot keep a GPU busy
    out.mkdir(parents=True, exist_ok=True)
    common = [f"train.device={device}", f"data.out_dir={out / 'data'}", "data.vocab_size=512",
              f"data.max_bytes={300_000 if args.quick else 4_000_000}", "wandb.mode=disabled",
              "checkpoint.every=0", "train.log_every=1",
              "data.allow_toy_corpus=true"]  # the built-in corpus, for gpt2-small and gpt-1.3b
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
        references: dict[str, Reference] = {}
        for run in todo:  # here, before the runs: the GPU memory it takes is freed after each
            key = reference_key(run)
            if key not in references:
                references[key] = make_reference(run, device)
        breaks = {r["name"]: block_graph_breaks(build_model(r["cfg"].model).to(device))
                  for r in todo if r["cfg"].train.compile}
        results = execute(todo, common, out, device, jobs)
        for run in runs:
            if run["skip"]:
                rows.append(new_row(run["name"], run["kind"], status="SKIP", notes=[run["skip"]]))
                continue
            rows.append(judge(run, results[run["name"]], references[reference_key(run)],
                              device, warmup, min_mfu, breaks.get(run["name"])))
            if run["kind"] == "speed" and device == "cuda":
                rows[-1]["notes"].append("flash" if flash_runs(run["cfg"]) else "no flash")
        if (out / "data" / MANIFEST).stat().st_mtime != manifest_mtime:
            data_row["status"] = "FAIL"
            data_row["problems"].append("a training run rewrote the shards")
    print_table(["run", "status", "norm step 1 / fp32 reference", "loss / weights off",
                 "tok/s", "MFU", "mem GB / planned", "s", "note"], [fmt(r) for r in rows],
                f"\ngpu_check on {device}: 1 rank, `harness train` per row; norms within "
                f"{NORM_RTOL:.0%}, losses within {LOSS_RTOL:.0%} and weights within "
                f"{UPDATE_RTOL:.0%} after 3 updates, memory in {MEMORY_BAND[0]:.2f}-"
                f"{MEMORY_BAND[1]:.2f} x the plan, MFU in "
                f"{'the band per preset' if min_mfu is None else f'({min_mfu}, 1]'}")
    failed = [r["name"] for r in rows if r["status"] == "FAIL"]
    (out / "results.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows passed or skipped; "
          f"{'FAILED: ' + ', '.join(failed) if failed else 'all good'} "
          f"({time.perf_counter() - t0:.0f} s; details in {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
