"""bench/gpu_check.py, the GPU acceptance check, on a CPU: its whole flow on tiny models
(`--device cpu --quick`: prepare-data, `harness train` subprocesses, the fp32 reference,
the table, the exit code) and its pass/fail rules on made-up results."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_utils import child_env

from harness.config import load_config

ROOT = Path(__file__).resolve().parents[2]
import gpu_check  # noqa: E402
import gpu_judge  # noqa: E402
from gpu_reference import Reference  # noqa: E402

from harness.smoke.checks import update_error  # noqa: E402

W0 = {"w": torch.zeros(4), "b": torch.ones(2)}
W3 = {"w": torch.tensor([0.1, -0.1, 0.1, 0.0]), "b": torch.tensor([1.0, 0.9])}  # the reference
LOSSES = [6.0, 5.5, 5.0]
QUICK_OVERRIDES = gpu_check.QUICK_MODEL


def _run(kind="speed", norm=2.0, code=0, mfu=0.4, memory=None, evals=True, steps=4,
         preset="tiny", loss_scale=1.0, params=None, skipped=()):
    cfg = load_config(preset, ["train.device=cuda"])
    planned = gpu_judge.predict_memory(cfg, 1, device="cuda")["peak"] / 1e9
    records = [{"step": s, "optim/grad_norm_preclip": norm, "optim/update_norm": 0.01,
                "train/loss": LOSSES[(s - 1) % 3] * loss_scale, "optim/skipped": s in skipped,
                "throughput/tokens_per_s": 1000.0 * s, "throughput/mfu": mfu,
                "memory/gpu_max_allocated_gb": planned if memory is None else memory,
                **({"eval/loss": 5.0} if evals else {})} for s in range(1, steps + 1)]
    run = {"name": "r", "kind": kind, "cfg": cfg, "preset": preset}
    result = {"code": code, "seconds": 1.0, "log": "r.log", "steps": records, "events": [],
              "params": W3 if params is None else params}
    return run, result, planned


def _judge(run, result, device="cuda", reference=2.0, min_mfu=0.05, graph_breaks=None):
    ref = Reference(norms=[reference], losses=LOSSES, initial=W0, final=W3)
    return gpu_judge.judge(run, result, ref, device, warmup=1, min_mfu=min_mfu,
                           graph_breaks=graph_breaks)


def test_a_good_run_passes_and_reports_medians_after_the_warmup():
    run, result, planned = _run()
    row = _judge(run, result)
    assert row["status"] == "PASS", row["problems"]
    assert row["tokens_per_s"] == 3000.0  # median of steps 2-4
    assert row["mfu"] == 0.4 and row["memory_gb"] == pytest.approx(planned)
    norm_row = _judge(*_run(kind="norm", steps=3)[:2])
    assert norm_row["status"] == "PASS" and norm_row["update_err"] == 0.0


def test_update_error_against_closed_forms():
    assert update_error(W0, W3, W3) == 0.0
    assert update_error(W0, W3, W0) == 1.0  # the update never reached the weights
    doubled = {k: 2 * W3[k] - W0[k] for k in W0}
    assert update_error(W0, W3, doubled) == pytest.approx(1.0)
    assert update_error(W0, W3, {"w": W3["w"]}) == float("inf")  # a parameter missing


@pytest.mark.parametrize("change, problem", [
    ({"norm": 2.05}, "norm off by +2.50%"),  # over the 2% tolerance
    ({"norm": float("nan")}, "step 1 norm nan"),
    ({"code": 1}, "exit 1"),
    ({"code": gpu_judge.TIMED_OUT}, "timed out"),
    ({"mfu": 0.01}, "MFU"),  # a wrong peak or a slow path
    ({"mfu": 1.5}, "MFU"),  # above the hardware peak: a wrong FLOP count or peak
    ({"memory": 1e3}, "outside the plan's band"),  # the planner calls it safe: it is not
    ({"memory": 1e-3}, "outside the plan's band"),  # the planner refuses what fits
    ({"kind": "norm", "evals": False, "steps": 3}, "eval/loss"),
    ({"steps": 0}, "no step metrics"),
    ({"kind": "norm", "steps": 3, "params": W0}, "weights after 3 updates off by 100.0%"),
    ({"kind": "norm", "steps": 3, "params": {}}, "off by inf%"),  # no checkpoint read
    ({"kind": "norm", "steps": 3, "loss_scale": 1.01}, "loss off by up to 1.00%"),
    ({"kind": "norm", "steps": 3, "skipped": (2,)}, "skipped [2]"),
    ({"kind": "norm", "steps": 2}, "2 steps"),
])
def test_each_failure_fails_the_row(change, problem):
    row = _judge(*_run(**change)[:2])
    assert row["status"] == "FAIL" and problem in "; ".join(row["problems"]), row["problems"]


@pytest.mark.parametrize("preset, policy, mfu, ok", [
    ("gpt2-small", "none", 0.16, True), ("gpt2-small", "none", 0.14, False),
    ("gpt2-small", "every_layer", 0.14, True),  # recompute: 3/4 of the lower end, 0.1125
    ("gpt2-small", "none", 0.66, False), ("gpt-1.3b", "none", 0.24, False),
    ("gpt-1.3b", "every_layer", 0.24, True)])
def test_mfu_bands_per_preset(preset, policy, mfu, ok):
    run, result, _ = _run(preset=preset, mfu=mfu)
    run["cfg"] = load_config(preset, ["train.device=cuda",
                                      f"activation_checkpointing.policy={policy}"])
    result["steps"] = [dict(r, **{"memory/gpu_max_allocated_gb": gpu_judge.predict_memory(
        run["cfg"], 1, device="cuda")["peak"] / 1e9}) for r in result["steps"]]
    row = _judge(run, result, min_mfu=None)
    assert (row["status"] == "PASS") == ok, row["problems"]


def _overflow(skipped, scales, events=(), steps=None):
    records = [{"step": s + 1, "optim/skipped": k, "optim/loss_scale": x,
                "optim/grad_norm_preclip": math.inf if k else 1.0, "train/loss": 6.0,
                "throughput/tokens_per_s": 1.0} for s, (k, x) in enumerate(zip(skipped, scales))]
    run = {"name": "o", "kind": "overflow", "preset": "tiny",
           "cfg": load_config("tiny", [f"train.max_steps={steps or len(records)}",
                                      "optim.warmup_steps=1"])}
    result = {"code": 0, "seconds": 1.0, "log": "o.log", "steps": records, "events": list(events),
              "params": {}}
    return gpu_judge.judge(run, result, Reference(), "cpu", warmup=1, min_mfu=0.0)


@pytest.mark.parametrize("skipped, scales, events, steps, problem", [
    # hysteresis 2: the first overflow keeps the scale, then each one halves it
    ([1, 1, 1, 0, 0], [2**24, 2**24, 2**23, 2**22, 2**22], [], None, None),
    ([0, 0, 0], [2**24] * 3, [], None, "step 1 did not overflow"),
    ([1, 1, 1], [2**24, 2**23, 2**22], [], None, "every step skipped"),
    ([1, 1, 0], [2**24, 2**24, 2**24], [], None, "did not halve"),
    ([1, 1, 0], [2**24, 2**22, 2**22], [], None, "did not halve"),  # a quarter: not DeepSpeed's
    ([1, 0, 1, 0], [2**24, 2**23, 2**23, 2**22], [], None, "an overflow after"),
    ([1, 1, 0], [2**24, 2**23, 2**23], [{"event": "nonfinite", "level": "alarm"}], None,
     "monitor alarms ['nonfinite']"),
    ([1, 1, 0], [2**24, 2**23, 2**23], [], 5, "3 of 5 steps ran"),
])
def test_the_forced_overflow_rules(skipped, scales, events, steps, problem):
    row = _overflow([bool(k) for k in skipped], [float(x) for x in scales], events, steps)
    if problem is None:
        assert row["status"] == "PASS", row["problems"]
    else:
        assert row["status"] == "FAIL" and problem in "; ".join(row["problems"]), row["problems"]


def test_within_tolerance_and_on_a_cpu_no_gpu_rules():
    run, result, _ = _run(norm=2.039, mfu=0.0, memory=1e3)  # 1.95% off; CPU: no MFU, no memory
    row = _judge(run, result, device="cpu")
    assert row["status"] == "PASS" and row["mfu"] is None and row["memory_gb"] is None


def test_a_failed_row_exits_non_zero(tmp_path, monkeypatch, capsys):
    norm_runs = gpu_check.norm_runs
    monkeypatch.setattr(gpu_check, "norm_runs", lambda *a: norm_runs(*a)[:1])
    monkeypatch.setattr(gpu_check, "speed_runs", lambda *a: [])
    monkeypatch.setattr(gpu_check, "train", lambda run, *a: _run(kind="norm", norm=1e3)[1])
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: zero0-bf16" in out and "FAIL" in out


@pytest.mark.slow
def test_quick_check_on_the_cpu(tmp_path):
    import forked_cli  # the script as Python runs it, forked from a warm interpreter

    code, stdout, stderr = forked_cli.run_script(
        "bench/gpu_check.py", ["--device", "cpu", "--quick", "--out", str(tmp_path)], ROOT,
        child_env(), tmp_path, timeout=600)
    assert code == 0, stdout[-4000:] + stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["prepare-data"]["status"] == "PASS"
    for stage in range(4):
        bf16 = rows[f"zero{stage}-bf16"]
        assert bf16["status"] == "PASS" and bf16["norm"] == pytest.approx(bf16["reference"],
                                                                          rel=0.02)
        if stage:  # fp16 at ZeRO 0 is refused by the config
            assert rows[f"zero{stage}-fp16"]["status"] == "SKIP"  # no fp16 on the CPU
    assert "zero0-fp16" not in rows
    for name in ("zero1-bf16-contiguous-eval", "zero1-bf16-cpu-checkpointing",
                 "zero2-bf16-offload", "llama-zero1-bf16", "llama-zero3-bf16"):
        assert rows[name]["status"] == "PASS", rows[name]["problems"]
    norm_rows = [r for r in rows.values() if r["kind"] == "norm" and r["status"] == "PASS"]
    assert len(norm_rows) == 9 and all(r["update_err"] <= gpu_judge.UPDATE_RTOL and
                                       r["loss_err"] <= gpu_judge.LOSS_RTOL for r in norm_rows)
    assert rows["zero1-fp16-overflow"]["status"] == "SKIP"
    speed = [r for r in rows.values() if r["kind"] == "speed"]
    assert len(speed) == 2 and all(r["tokens_per_s"] > 0 for r in speed)
    for r in speed:  # the tiny preset trains in fp32: the reference reproduces it exactly
        assert r["norm"] == pytest.approx(r["reference"], rel=1e-5)
    assert "norm step 1 / fp32 reference" in stdout and "loss / weights off" in stdout
    assert "all good" in stdout
    assert (tmp_path / "runs" / "zero3-bf16" / "metrics.jsonl").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_a_gpu_the_default_device_refuses(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_quick_check_on_the_gpu(tmp_path):
    """The short form on a GPU (NCCL, fp16 included); the full check is the script itself."""
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]


def test_a_graph_break_inside_a_block_fails_a_compiled_row():
    """gpu_check counts them on the row's model before the runs (the plain model, as
    harness.train.compile compiles its blocks): zero for ours, and a row with any fails."""
    from harness.model import build_model
    from harness.train.compile import block_graph_breaks

    cfg = load_config("tiny", QUICK_OVERRIDES)
    assert block_graph_breaks(build_model(cfg.model)) == [0] * cfg.model.n_layer
    run, result, _ = _run()
    assert _judge(run, result, graph_breaks=[0, 0])["status"] == "PASS"
    row = _judge(run, result, graph_breaks=[0, 2])
    assert row["status"] == "FAIL" and "graph breaks inside blocks [0, 2]" in row["problems"][0]
