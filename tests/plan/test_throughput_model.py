"""harness/plan/throughput.py against closed forms worked by hand; the shipped GPUs' data and a
user file's range checks; `harness plan --gpu` (rows, JSON keys, the config as given first even
when it does not fit, fastest first, the same on every run); the calibration's split rule and
the held-out error the shipped constants reach (bench/bench_throughput_model.py)."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from harness.common.errors import HarnessError
from harness.plan import command, hardware, throughput
from harness.plan.throughput import Constants, Gemm, Workload, layer_gemms, step_time

ROOT = Path(__file__).resolve().parents[2]
# a round GPU: 100 TFLOP/s, 1 TB/s HBM, 100 GB/s NVLink, 10 GB/s network, attention at 50%
HW = hardware.Hardware("round", "Round GPU", 80e9, {"bf16": 100e12, "fp16": 100e12,
                                                   "fp32": 50e12}, 1e12, 100e9, 10e9, 0.5, "-")
C = Constants(e_max=0.5, shape_dim=0.0, comm_eff=1.0)
D, T, V, L = 1024, 1024, 4096, 2


def _work(**kw) -> Workload:
    gemms = layer_gemms("gpt2", D, 4 * D, 16)
    n = L * 12 * D * D + V * D
    base = dict(n_layer=L, d_model=D, seq=T, vocab=V, layer_gemms=gemms, head=Gemm(D, V),
                n_params=n, rank_params=n, model_flops_per_token=6 * n + 12 * L * D * T,
                micro_batch=4, grad_accum=2, dp=4, tp=1, gpus_per_node=8, zero_stage=0)
    return Workload(**{**base, **kw})


def test_zero0_step_by_hand():
    """2 layers of 12 d^2 weights + a d x V head, M = 4 x 1024 tokens per micro-step, 2 of
    them, gradients all-reduced over 4 ranks in one node."""
    M, n = 4 * T, L * 12 * D * D + V * D
    gemm = 3 * 2 * M * (L * 12 * D * D + D * V) / (100e12 * 0.5)
    attention = 0.5 * 12 * L * D * T * M / (100e12 * 0.5)
    elementwise = (100 * D * L * M + 8 * M * V) / 0.8e12
    optimizer, norm = 30 * n / 0.8e12, 4 * n / 0.8e12
    allreduce = 2 * 3 / 4 * 2 * n / 100e9
    want = 2 * (gemm + attention + elementwise) + optimizer + norm + allreduce
    t = step_time(_work(), HW, C)
    assert t.total == pytest.approx(want, rel=1e-12)
    assert t.dp_comm_intra == pytest.approx(allreduce) and t.dp_comm_inter == 0
    assert t.tokens == 2 * 4 * M and t.limiter == "compute"
    assert t.mfu == pytest.approx((6 * n + 12 * L * D * T) * t.tokens / want / 4 / 100e12)


def test_shape_term_and_tensor_parallel_by_hand():
    """SHAPE_DIM s: a GEMM costs (1 + s (1/M + 1/N + 1/K)) more; tp 2 halves the sharded side
    and adds 4 all-reduces of M x d 16-bit activations per layer per micro-step."""
    c = Constants(0.5, 256.0, 1.0)
    M = 4 * T
    assert throughput.gemm_seconds(M, D, V, 100e12, c) == pytest.approx(
        2 * M * D * V / 50e12 * (1 + 256 * (1 / M + 1 / D + 1 / V)))
    one, two = step_time(_work(), HW, C), step_time(_work(tp=2, dp=2), HW, C)
    per = 2 * (2 - 1) / 2 * M * D * 2 / 100e9 + throughput.COLLECTIVE_LATENCY_S
    assert two.tp_comm == pytest.approx(2 * L * 4 * per)
    layer_gemm = 3 * 2 * M * L * 12 * D * D / 50e12
    assert one.gemm - two.gemm == pytest.approx(2 * layer_gemm / 2)  # the head stays whole


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_by_hand(stage):
    """ZeRO 1 and 2: the reduce-scatter (ZeRO 1: in the last micro-step only) hides under a
    longer backward, the parameters' all-gather after the step does not; without overlap_comm
    ZeRO 1 pays both. ZeRO 3 across 2 nodes of 2: gathers and the
    scatter hide under compute but for one layer's gather; the term is inter-node, at the two
    NICs of a node's two ranks together (one ring per NIC)."""
    w = _work(zero_stage=stage, gpus_per_node=2 if stage == 3 else 8)
    n = w.rank_params
    bw = 2 * 10e9 if stage == 3 else 100e9
    move = 3 / 4 * 2 * n / bw
    t = step_time(w, HW, C)
    comm = t.dp_comm_inter if stage == 3 else t.dp_comm_intra
    want = {1: move, 2: move, 3: 2 * move / L}[stage]
    assert comm == pytest.approx(want)
    if stage == 1:
        assert step_time(_work(zero_stage=1, overlap=False), HW, C).dp_comm_intra == \
            pytest.approx(2 * move)
    assert t.optimizer == pytest.approx(30 * n / 4 / 0.8e12)  # a quarter of the states


def test_shipped_hardware_is_complete_and_cited():
    gpus = hardware.load()
    assert set(gpus) == {"a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h100-nvl", "h200"}
    assert gpus["h100-sxm"].peak_for("bf16") == 989e12 and gpus["a100-80gb"].memory_bytes == 80e9
    for g in gpus.values():
        assert "data sheet" in g.source and g.intra_bytes_s > g.inter_bytes_s > 0


@pytest.mark.parametrize("edit,words", [
    ("hbm_tb_s: 3350", "x.hbm_tb_s=3350 must be a number in (0, 100]"),
    ("hbm_tb_s: fast", "x.hbm_tb_s='fast'"),
    ("colour: red", "unknown keys colour"),
    ("peak_tflops: {bf16: 1}", "x.peak_tflops must map exactly bf16, fp16, fp32")])
def test_a_bad_hardware_file_is_one_line(tmp_path, capsys, edit, words):
    lines = {"name": "X", "memory_gb": "80", "peak_tflops": "{bf16: 9, fp16: 9, fp32: 4}",
             "hbm_tb_s": "3", "intra_node_gb_s": "450", "inter_node_gb_s": "50",
             "attention_fraction": "0.4", "source": "my cluster's spec"}
    key, value = edit.split(": ", 1)
    lines[key] = value
    path = tmp_path / "hw.yaml"
    path.write_text("x:\n" + "".join(f"  {k}: {v}\n" for k, v in lines.items()))
    with pytest.raises(HarnessError, match=None) as err:
        hardware.load(path)
    assert words in str(err.value)
    assert command.main(["--config", "gpt2-small", "--hardware", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and words in out.err


@pytest.mark.parametrize("argv,words", [
    (["--gpu", "b200"], "--gpu 'b200' is not known: one of a100-40gb"),
    (["--gpu", "h100-sxm", "--mfu", "0.5"], "--mfu belongs to the estimate without --gpu"),
    (["--json"], "--json needs --gpu NAME"),
    (["--tokens", "10B"], "--tokens needs --gpu NAME"),
    (["--gpu", "h200", "--tokens", "10Q"], "--tokens='10Q' must be a number of tokens")])
def test_bad_gpu_flags_are_one_line(capsys, argv, words):
    assert command.main(["--config", "gpt2-small", *argv]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and words in out.err


def _json(capsys, *argv) -> list[dict]:
    assert command.main(["--config", "gpt2-small", "--json", *argv]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_plan_json_rows_fastest_first_and_deterministic(capsys):
    argv = ("--nodes", "2", "--gpus-per-node", "8", "--gpu", "h100-sxm")
    rows = _json(capsys, *argv)
    keys = ["as_configured", "zero_stage", "tp", "micro_batch", "grad_accum", "policy", "fits",
            "step_time_s", "tokens_per_s_per_gpu", "mfu", "limiter"]
    assert all(list(r) == keys for r in rows)
    given, rest = rows[0], rows[1:]
    assert given["as_configured"] and not any(r["as_configured"] for r in rest)
    assert (given["zero_stage"], given["micro_batch"], given["policy"]) == (1, 16, "none")
    assert all(r["fits"] for r in rest) and len(rest) > 10
    times = [r["step_time_s"] for r in rest]
    assert times == sorted(times)
    # ZeRO 0 is refused by the config's own check (the preset accumulates in fp32)
    assert {r["tp"] for r in rest} >= {1, 2} and {r["zero_stage"] for r in rest} == {1, 2, 3}
    for r in rows:  # tokens/s per GPU is the step's tokens over its time and the 16 GPUs
        assert r["tokens_per_s_per_gpu"] == pytest.approx(512 * 1024 / r["step_time_s"] / 16)
    assert _json(capsys, *argv) == rows  # no clock, no randomness
    # pinned: the shipped constants' prediction for gpt2-small as configured on 16 H100s
    assert given["step_time_s"] == pytest.approx(0.08568, abs=5e-5)


def test_the_config_as_given_is_shown_even_when_it_does_not_fit(capsys):
    argv = ["--config", "gpt2-small", "--gpu", "a100-40gb", "--world-size", "8",
            "train.micro_batch_size=64", "--tokens", "10B"]
    assert command.main(argv) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "as configured" in x)
    assert line.split()[:8] == ["as", "configured*", "1", "1", "64", "1", "none", line.split()[7]]
    assert "the config as given does NOT fit" in out and "time for 10,000,000,000 tokens" in out


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_throughput_model", ROOT / "bench" / "bench_throughput_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_calibration_split_and_held_out_error():
    """The file's rule: per source, odd positions FIT, even HELD-OUT, a lone point HELD-OUT;
    every point cited. The shipped constants' held-out error is what docs/plan.md reports."""
    bench = _bench()
    points = bench.load_points()
    by_source: dict[str, list] = {}
    for p in points:
        by_source.setdefault(p["source"], []).append(p["split"])
        assert p["citation"] and p["measured"]
    for splits in by_source.values():
        want = ["HELD-OUT"] if len(splits) == 1 else [
            "FIT" if i % 2 == 0 else "HELD-OUT" for i in range(len(splits))]
        assert splits == want
    held = [p for p in points if p["split"] == "HELD-OUT"]
    errs = [abs(e) for e in bench.errors(held, hardware.load(), Constants())]
    assert statistics.median(errs) == pytest.approx(throughput.HELD_OUT_ERROR[0], abs=0.001)
    assert max(errs) == pytest.approx(throughput.HELD_OUT_ERROR[1], abs=0.001)
    pairs = bench.rankings(points, hardware.load(), Constants())
    assert len(pairs) == 2 and all(ok for *_, ok in pairs)  # layouts ordered as published
