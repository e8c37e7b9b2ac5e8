"""A data.mix run resumes exactly at another data-parallel size, and a change of its weights on
resume is refused unless explicit (data.mix_reweight=true).

Runs of tests/reshard_worker.py (harness.train.run.make_trainer, then fit): 6 steps on one rank
uninterrupted; the same run on 2 ranks stopped after step 3 (its checkpoint), resumed on 1 rank
to step 6 (the ZeRO checkpoint re-partitioned on the spot). The losses of every step, overall
and per source (train/loss/<source>), and the per-source validation losses match the
uninterrupted run within rounding (2 ranks x accumulation 2 sum in another order than 1 x 4).
The split run logs to W&B offline, as users run: one W&B run across the resume, holding the
per-source metrics that metrics.jsonl holds.
Then the finished run resumed with other weights is refused in one line; with
data.mix_reweight=true it goes on, the checkpoint recording the new phase from sample 48.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine_utils import child_env, torchrun
from mix_corpus import mix_override, write_sources
from wandb_reader import read_run, run_files

from harness.config import load_config
from harness.data.mix_prepare import prepare_mix

WORKER = str(Path(__file__).parents[1] / "reshard_worker.py")
BASE = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=32",
        "model.vocab_size=384", "data.vocab_size=384", "train.global_batch_size=8",
        "train.micro_batch_size=2", "train.max_steps=6", "optim.warmup_steps=2",
        "checkpoint.every=0", "zero.stage=1", "data.eval_every=3", "data.eval_sequences=8",
        "wandb.mode=disabled"]
# loss differences from the summation order (measured: 4.8e-7; a step moves the loss 1e-2)
LOSS_TOL = 1e-4

pytestmark = pytest.mark.slow


def _args(root: Path, run_dir: Path, *extra: str, weights=(0.7, 0.3)) -> list[str]:
    return [*BASE, mix_override(root / "web", root / "code", *weights),
            f"data.out_dir={root / 'out'}", f"train.run_dir={run_dir}", *extra]


def _launch(nproc: int, out: Path, stop_at: int, args: list[str]) -> subprocess.CompletedProcess:
    argv = [str(out), str(stop_at), *args]
    cmd = [sys.executable, WORKER, *argv] if nproc == 1 else torchrun(nproc, WORKER, *argv)
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300,
                          check=False)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "step" in r and "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixresume")
    write_sources(root)
    prepare_mix(load_config("tiny", _args(root, root / "unused")).data, progress=False)
    whole, split = root / "whole", root / "split"
    _ok(_launch(1, root / "o1", 0, _args(root, whole)))
    # the split run logs to W&B (offline) as a user's run would, across its resume
    _ok(_launch(2, root / "o2", 3, _args(root, split, "wandb.mode=offline")))
    _ok(_launch(1, root / "o3", 0, _args(root, split, "wandb.mode=offline")))
    return root, whole, split


def test_resumed_at_another_dp_size_matches_the_uninterrupted_run(runs):
    _, whole, split = runs
    a, b = _metrics(whole), _metrics(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    keys = ["train/loss", "train/loss/web", "train/loss/code"]
    for step in a:
        for key in keys:
            assert abs(a[step][key] - b[step][key]) < LOSS_TOL, (step, key)
        # each source's tokens so far: the same counts after the resume, summing to the total
        tokens = [a[step][f"data/tokens/{n}"] for n in ("web", "code")]
        assert tokens == [b[step][f"data/tokens/{n}"] for n in ("web", "code")], step
        assert sum(tokens) == a[step]["train/tokens_seen"] == step * 8 * 32, step
    for step in (3, 6):  # per-source validation: the same set at 2 ranks and 1
        for key in ("eval/loss", "eval/loss/web", "eval/loss/code", "eval/bpb/code"):
            assert abs(a[step][key] - b[step][key]) < LOSS_TOL, (step, key)
    meta = json.loads((split / "checkpoints/step00000006/meta.json").read_text())
    assert meta["data_mix"]["phases"] == [[0, {"web": 0.7, "code": 0.3}]]


def test_w_and_b_holds_the_per_source_metrics_across_the_resume(runs):
    """The 2-rank part and its 1-rank resume are one W&B run (two offline files, one id) whose
    history holds every step once, with metrics.jsonl's per-source train and eval losses."""
    _, _, split = runs
    files = run_files(split / "wandb")
    wb = [read_run(f) for f in files]
    assert len(files) == 2 and all(r.complete for r in wb)
    assert len({r.run_id for r in wb}) == 1
    rows = [row for r in wb for row in r.rows("train/loss")]
    assert [row["train/step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    logged = _metrics(split)
    keys = ["train/loss/web", "train/loss/code", "eval/loss/web", "eval/bpb/code", "eval/loss",
            "data/tokens/code"]
    for row in rows:
        step = row["train/step"]
        for key in keys:
            assert (key in row) == (key in logged[step]), (step, key)
            if key in row:
                assert row[key] == pytest.approx(logged[step][key], rel=1e-6), (step, key)
    assert all("eval/loss/web" in row for row in rows if row["train/step"] in (3, 6))


def test_changed_weights_refused_then_explicit(runs):
    root, _, split = runs
    proc = _launch(1, root / "o4", 0, _args(root, split, "train.max_steps=8", weights=(1, 1)))
    assert proc.returncode == 2
    line = ("data.mix's weights (shares web 0.5, code 0.5) differ from the ones checkpoint "
            f"{split}/checkpoints/step00000006 was trained with (web 0.7, code 0.3): restore "
            "them, or set data.mix_reweight=true to train with the new ones from step 6 on")
    assert f"error: {line}\n" in proc.stderr
    proc = _launch(1, root / "o5", 0, _args(root, split, "train.max_steps=8",
                                            "data.mix_reweight=true", weights=(1, 1)))
    _ok(proc)  # its log line: tests/data/test_mixture_prepare.py (the worker logs nothing)
    meta = json.loads((split / "checkpoints/step00000008/meta.json").read_text())
    assert meta["data_mix"]["phases"] == [[0, {"web": 0.7, "code": 0.3}],
                                          [48, {"web": 0.5, "code": 0.5}]]
    assert sorted(_metrics(split)) == list(range(1, 9))
