"""`harness plan`: the world as --nodes x --gpus-per-node or --world-size (contradictions refused
in one line), named tensor-parallel x data-parallel, and absolute time estimates checked
against the closed form F = 6 (N - T d) + 12 L d T FLOPs per token at the assumed speed; the
large presets' checkpointing agrees with the plan's first choice on their target hardware."""
from __future__ import annotations

import re
from functools import lru_cache

import pytest
import torch

from harness import cli
from harness.config import load_config
from harness.model import build_model, count_params
from harness.plan import command, planner
from harness.plan.speed import MICRO_STEP_OVERHEAD_S, Speed, speed_for

GB = 1e9
H100_BF16 = 989e12  # NVIDIA's data sheet: 1,979 TFLOP/s with sparsity, half of it dense


def _plan(capsys, *argv) -> tuple[int, str, str]:
    code = command.main(["--config", "gpt2-small", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@lru_cache(maxsize=None)
def _n_params(preset: str) -> int:
    with torch.device("meta"):  # the real model's parameters, no memory or init spent
        return count_params(build_model(load_config(preset).model))


def _flops_per_token(cfg) -> float:
    """GPT-2: every weight but the position table is a matmul (2 FLOPs forward, 4 backward),
    plus attention's QK^T and AV: 12 L d T."""
    m = cfg.model
    n = _n_params("gpt2-small")
    return 6 * (n - m.block_size * m.d_model) + 12 * m.n_layer * m.d_model * m.block_size


def test_nodes_times_gpus_per_node_is_the_world(capsys):
    code, by_nodes, _ = _plan(capsys, "--nodes", "2", "--gpus-per-node", "4", "--top", "3")
    assert code == 0
    assert "8 GPUs (2 nodes x 4) = tensor-parallel 1 x data-parallel 8" in by_nodes
    code, by_size, _ = _plan(capsys, "--world-size", "8", "--top", "3")
    assert "8 GPUs = tensor-parallel 1 x data-parallel 8" in by_size
    # everything but the world's description is the same
    assert by_nodes.replace(" (2 nodes x 4)", "") == by_size
    code, agreed, _ = _plan(capsys, "--world-size", "8", "--nodes", "2", "--gpus-per-node", "4",
                            "--top", "3")
    assert code == 0 and agreed == by_nodes


@pytest.mark.parametrize("argv,words", [
    (["--world-size", "16", "--nodes", "2", "--gpus-per-node", "4"],
     ("--world-size 16 contradicts --nodes 2 x --gpus-per-node 4 = 8",)),
    (["--nodes", "2"], ("--nodes 2 needs --gpus-per-node",)),
    (["--nodes", "0", "--gpus-per-node", "8"], ("--nodes='0'",)),
    (["--gpus-per-node", "4", "parallel.tensor_parallel_size=3"],
     ("parallel.tensor_parallel_size=3 does not divide --gpus-per-node 4",)),
    (["--mfu", "1.5"], ("--mfu='1.5'", "(0, 1]")),
    (["--peak-tflops", "nan"], ("--peak-tflops='nan'",))])
def test_contradictions_and_bad_numbers_are_one_line(capsys, argv, words):
    code, out, err = _plan(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
    for word in words:
        assert word in err


def test_the_world_is_not_called_data_parallel(capsys):
    """Under tensor parallelism 2, 8 GPUs are 4 data-parallel ranks: the breakdown says so,
    and the help names --world-size as all GPUs."""
    code, out, _ = _plan(capsys, "--world-size", "8", "parallel.tensor_parallel_size=2",
                         "--top", "1")
    assert code == 0 and "8 GPUs = tensor-parallel 2 x data-parallel 4" in out
    sub = cli._parser()._subparsers._group_actions[0].choices["plan"]
    text = " ".join(sub.format_help().split())
    assert "data-parallel GPUs" not in text
    for flag in ("--world-size", "--nodes", "--gpus-per-node", "--gpu-type", "--mfu"):
        assert flag in text


def test_step_time_is_the_flops_at_the_assumed_speed(capsys):
    """gpt2-small as given on 8 H100s (micro 16, accumulation 4, no checkpointing): seconds
    per step = global tokens x F / (8 x peak x MFU) + 4 x 5 ms; the run is max_steps of them."""
    cfg = load_config("gpt2-small")
    tokens = 512 * cfg.model.block_size
    want = tokens * _flops_per_token(cfg) / (8 * H100_BF16 * 0.4) + 4 * MICRO_STEP_OVERHEAD_S
    code, out, _ = _plan(capsys, "--world-size", "8", "--gpu-type", "H100", "--mfu", "0.4")
    assert code == 0 and "assumes H100: 989 TFLOP/s dense bf16 peak x MFU 40%" in out
    assert "an estimate (not a measurement)" in out
    line = re.search(r"([0-9.]+) s per step of ([0-9,]+) tokens \(([0-9,]+) tokens/s\)", out)
    assert float(line[1]) == pytest.approx(want, rel=5e-3)
    assert int(line[2].replace(",", "")) == tokens
    assert int(line[3].replace(",", "")) == pytest.approx(tokens / want, rel=5e-3)
    hours = want * cfg.train.max_steps / 3600  # 2 to 48 hours print as hours
    assert 2 < hours < 48 and f"train.max_steps={cfg.train.max_steps:,}: {hours:.1f} h (" \
        f"{hours * 8:,.0f} GPU-hours)" in out


def test_every_recommendation_carries_its_step_time():
    """Each row: the closed form with the row's recompute share and accumulation; relative is
    its ratio to the fastest; a faster GPU (the --peak-tflops route) shrinks only the compute."""
    cfg = load_config("gpt2-small")
    speed = speed_for("A100", "bf16", 0.5)
    assert speed.peak == 312e12
    found = planner.recommend(cfg, 8, 80 * GB, 512, speed)
    counts = planner.param_counts(cfg)
    tokens, f = 512 * cfg.model.block_size, _flops_per_token(cfg)
    for c in found:
        share = planner.recompute_share(cfg, c["policy"], counts)
        want = tokens * f * (1 + share) / (8 * 312e12 * 0.5) + c["grad_accum"] * 5e-3
        assert c["step_s"] == pytest.approx(want, rel=1e-9)
        assert c["relative"] == pytest.approx(c["step_s"] / found[0]["step_s"])
    first = found[0]
    fast = planner.recommend(cfg, 8, 80 * GB, 512, Speed(2 * 312e12, 0.5))[0]
    overhead = first["grad_accum"] * 5e-3
    assert fast["step_s"] - overhead == pytest.approx((first["step_s"] - overhead) / 2)


def test_an_unknown_gpu_gives_relative_times_only(capsys):
    code, out, _ = _plan(capsys, "--world-size", "8", "--gpu-type", "Z9000", "--top", "2")
    assert code == 0 and "no known dense bf16 peak for --gpu-type 'Z9000'" in out
    assert "s per step" not in out and re.search(r"\n +\d+ +\d+ +none +- +1\.00 ", out)
    code, out, _ = _plan(capsys, "--world-size", "8", "--gpu-type", "Z9000",
                         "--peak-tflops", "500", "--top", "2")
    assert "assumes Z9000: 500 TFLOP/s" in out and "s per step" in out


@pytest.mark.parametrize("preset", ["gpt2-small", "gpt2-medium", "gpt-1.3b", "llama-1b"])
def test_large_presets_checkpoint_as_the_plan_ranks_first(preset):
    """Their documented target, one node of 8 x 80 GB: the preset's policy is the plan's
    fastest, and the preset's own micro batch with it fits."""
    cfg = load_config(preset)
    found = planner.recommend(cfg, 8, 80 * GB, cfg.train.global_batch_size)
    assert cfg.activation_checkpointing.policy == found[0]["policy"]
    assert (cfg.train.micro_batch_size, cfg.activation_checkpointing.policy) in {
        (c["micro_batch"], c["policy"]) for c in found}


def test_a_flag_prefix_is_not_taken_for_another_flag(capsys):
    """argparse would read --gpus as --gpus-per-node, its only completion: refused instead."""
    assert cli.main(["plan", "--gpus", "8"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --gpus" in err and err.count("\n") == 1
