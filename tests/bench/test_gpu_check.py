"""bench/gpu_check.py, the GPU acceptance check, on a CPU: its whole flow on tiny models
(`--device cpu --quick`: prepare-data, `harness train` subprocesses, the fp32 reference,
the table, the exit code) and its pass/fail rules on made-up results."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_utils import child_env

from harness.config import load_config

ROOT = Path(__file__).resolve().parents[2]
import gpu_check  # noqa: E402


def _run(kind="speed", norm=2.0, code=0, mfu=0.4, memory=None, evals=True, steps=4):
    cfg = load_config("tiny", ["train.device=cuda"])
    planned = gpu_check.predict_memory(cfg, 1, device="cuda")["peak"] / 1e9
    records = [{"step": s, "optim/grad_norm_preclip": norm, "optim/update_norm": 0.01,
                "throughput/tokens_per_s": 1000.0 * s, "throughput/mfu": mfu,
                "memory/gpu_max_allocated_gb": planned if memory is None else memory,
                **({"eval/loss": 5.0} if evals else {})} for s in range(1, steps + 1)]
    run = {"name": "r", "kind": kind, "cfg": cfg}
    return run, {"code": code, "seconds": 1.0, "log": "r.log", "steps": records}, planned


def _judge(run, result, device="cuda", reference=2.0):
    return gpu_check.judge(run, result, reference, device, warmup=1, min_mfu=0.05)


def test_a_good_run_passes_and_reports_medians_after_the_warmup():
    run, result, planned = _run()
    row = _judge(run, result)
    assert row["status"] == "PASS", row["problems"]
    assert row["tokens_per_s"] == 3000.0  # median of steps 2-4
    assert row["mfu"] == 0.4 and row["memory_gb"] == pytest.approx(planned)


@pytest.mark.parametrize("change, problem", [
    ({"norm": 2.05}, "norm off by +2.50%"),  # over the 2% tolerance
    ({"norm": float("nan")}, "step 1 norm nan"),
    ({"code": 1}, "exit 1"),
    ({"code": gpu_check.TIMED_OUT}, "timed out"),
    ({"mfu": 0.01}, "MFU"),  # a wrong peak or a slow path
    ({"mfu": 1.5}, "MFU"),  # above the hardware peak: a wrong FLOP count or peak
    ({"memory": 1e3}, "memory over the plan"),
    ({"kind": "norm", "evals": False}, "eval/loss"),
    ({"steps": 0}, "no step metrics"),
])
def test_each_failure_fails_the_row(change, problem):
    row = _judge(*_run(**change)[:2])
    assert row["status"] == "FAIL" and problem in "; ".join(row["problems"])


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
    speed = [r for r in rows.values() if r["kind"] == "speed"]
    assert len(speed) == 2 and all(r["tokens_per_s"] > 0 for r in speed)
    for r in speed:  # the tiny preset trains in fp32: the reference reproduces it exactly
        assert r["norm"] == pytest.approx(r["reference"], rel=1e-5)
    assert "norm step 1 / fp32 reference" in stdout and "all good" in stdout
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
