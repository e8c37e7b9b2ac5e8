"""Resuming a ZeRO 1/2/3 checkpoint at another data-parallel world size
(harness.checkpoint.reshard).

A run on N ranks saves at step 3; a run on M ranks resumes it (the same global batch of 8,
accumulation re-derived) and goes on to step 6. Checked:
  - right after the resume, the fp32 master weights, Adam's exp_avg / exp_avg_sq, Adam's step
    and every group's hyperparameters equal the saved ones exactly (re-sliced, not recomputed);
  - at step 6 Adam's step is 6 in every group and the parameters match an uninterrupted 1-rank
    ZeRO 2 run within ROUNDING_TOL (2 ranks x accumulation 2 vs 1 rank x accumulation 4 sum in
    another order: one-ulp gradient differences that Adam amplifies; measured 4e-7 to 2e-6,
    and 1-rank runs at stages 2 and 3 differ by 1.4e-6 themselves);
  - the conversion lands in step/universal/, leftovers of a killed conversion are removed,
    and a second resume reuses it;
  - a single process converts on the spot; several ranks refuse a checkpoint that is not
    converted yet (one line naming `python -m harness.checkpoint.reshard STEP_DIR`) and resume once
    it is.
The stages' 2-rank runs (and the refused 2-rank start) share one launch, their 1-rank resumes
another (launch_cases, reshard_worker.py --cases, tests/batched.py): one process start per
launch, the selected tests' runs only.
"""
import json
import subprocess
import sys
from pathlib import Path

import batched
import pytest
import torch
from engine_utils import ROUNDING_TOL, child_env, max_diff, torchrun

WORKER = str(Path(__file__).parents[1] / "reshard_worker.py")
BASE = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=32",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=6",
        "optim.warmup_steps=2", "checkpoint.every=0"]
STEP3 = "checkpoints/step00000003"
STAGES = [1, 2, 3]


def _overrides(run_dir, shards, stage, *extra) -> list[str]:
    return [*BASE, f"train.run_dir={run_dir}", f"data.out_dir={shards}", f"zero.stage={stage}",
            *extra]


def launch(nproc, out, run_dir, shards, stop_at, stage, *extra, refused=None):
    """Runs the worker; with `refused`, expects every rank to exit 2 with that one line."""
    args = [str(out), str(stop_at), *_overrides(run_dir, shards, stage, *extra)]
    if nproc == 1:
        cmd = [sys.executable, WORKER, *args]
    else:
        cmd = torchrun(nproc, WORKER, *args)
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300,
                          check=False)
    if refused is not None:
        # every rank refuses; torchrun may end the others before they print, and two ranks'
        # lines can land on one line of the shared pipe: count the messages, not the lines
        count = proc.stderr.count(f"error: {refused}")
        assert proc.returncode != 0 and 1 <= count <= nproc, proc.stderr
        return None
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _results(out, nproc)


def _results(out: Path, nproc: int):
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(nproc)]
    start = torch.load(out / "start.pt") if (out / "start.pt").is_file() else None
    return ranks, start, torch.load(out / "end.pt")


def case(run_dir, shards, stop_at, stage, *extra) -> dict:
    """One run of launch_cases: launch()'s arguments but the output directory (the case's
    own, OUT/<case id>/)."""
    return {"stop_at": stop_at, "overrides": _overrides(run_dir, shards, stage, *extra)}


def launch_cases(nproc: int, out: Path, cases: dict[str, dict]) -> batched.Outcome:
    """Every case {id: case(...)} in order in one launch (reshard_worker.py --cases,
    tests/batched.py): one process start and rendezvous for all of them. A refusal ends the
    processes (assert_refused); put it last, or the cases after it take a second launch."""
    def command(spec):
        args = [WORKER, "--cases", str(spec), str(out)]
        return [sys.executable, *args] if nproc == 1 else torchrun(nproc, *args)

    return batched.launch(command, out, cases, child_env(), nproc=nproc)


def results(launch: batched.Outcome, name: str):
    """launch()'s return value for case `name`; fails with its error when it did not finish."""
    return _results(launch.dir(name), launch.nproc)


def assert_refused(launch: batched.Outcome, name: str, refused: str) -> None:
    """Case `name` was refused as launch(refused=...) expects: every rank exits 2 with that
    one line (counted as launch() does, in the output of the launch the refusal ended)."""
    code, output = launch.exited(name)
    count = output.count(f"error: {refused}")
    assert code not in (0, None) and 1 <= count <= launch.nproc, output[-6000:]


def assert_same_state(resumed: dict, saved: dict) -> None:
    """Exact equality of everything the optimizer carries, per parameter and per group."""
    assert resumed["step_count"] == saved["step_count"]
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert resumed[key].keys() == saved[key].keys()
        for name in saved[key]:
            assert torch.equal(resumed[key][name], saved[key][name]), (key, name)
    assert len(resumed["step"]) == len(saved["step"]) == 2  # decay and no-decay groups
    assert set(resumed["step"]) == set(saved["step"]) == {float(saved["step_count"])}
    hyper = ("lr", "weight_decay", "betas", "eps")
    assert [{k: g[k] for k in hyper} for g in resumed["groups"]] == \
           [{k: g[k] for k in hyper} for g in saved["groups"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards_dir):
    """1 rank, ZeRO 2, 6 steps, saving at 3 and 6: the reference, and a 1-rank checkpoint."""
    tmp = tmp_path_factory.mktemp("one")
    (params,), _, end = launch(1, tmp / "out", tmp / "run", shards_dir, 0, 2, "checkpoint.every=3")
    assert end["step_count"] == 6
    return {"params": params, "step3": tmp / "run" / STEP3,
            "saved3": torch.load(tmp / "out" / "saved3.pt")}


@pytest.fixture(scope="module")
def two_rank_launch(request, tmp_path_factory, shards_dir, uninterrupted):
    """One 2-process launch: for each selected stage a run that stops at 3 and saves; last, the
    1-rank checkpoint's refusal at 2 ranks (test_one_rank_zero_checkpoint_resumes_on_two_ranks,
    when selected)."""
    tmp = tmp_path_factory.mktemp("two")
    stages = {p["stage"] for p in batched.launched_params(
        request, "test_two_rank_zero_checkpoint_resumes_on_one_rank")}
    cases = {f"stop-{s}": case(tmp / f"run{s}", shards_dir, 3, s) for s in STAGES if s in stages}
    if batched.selected(request, "test_one_rank_zero_checkpoint_resumes_on_two_ranks"):
        cases["refused"] = case(tmp / "run0", shards_dir, 0, 2,
                                f"checkpoint.resume={uninterrupted['step3']}")
    return {"tmp": tmp, "launch": launch_cases(2, tmp / "out", cases)}


@pytest.fixture(scope="module")
def resumed_on_one_rank(tmp_path_factory, shards_dir, two_rank_launch):
    """One 1-rank process resuming each stage's 2-rank checkpoint in turn (the run directory
    of two_rank_launch's stop-S). Before it: each step 3's meta.json, and the leftovers of a
    killed conversion planted in each."""
    tmp, stopped = two_rank_launch["tmp"], two_rank_launch["launch"]
    meta, cases = {}, {}
    for s in STAGES:
        if not stopped.ok(f"stop-{s}"):  # its test fails with stop-S's error
            continue
        step_dir = tmp / f"run{s}" / STEP3
        meta[s] = json.loads((step_dir / "meta.json").read_text())
        # as if a conversion was killed
        (step_dir / ".tmp-universal-999" / "ds").mkdir(parents=True)
        cases[f"resume-{s}"] = case(tmp / f"run{s}", shards_dir, 0, s)
    out = tmp_path_factory.mktemp("one_resumes") / "out"
    return {"meta": meta, "launch": launch_cases(1, out, cases)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_two_rank_zero_checkpoint_resumes_on_one_rank(uninterrupted, two_rank_launch,
                                                      resumed_on_one_rank, stage):
    """Stage S's 2-rank run (stops at 3 and saves) and its 1-rank resume come from the module's
    shared launches (two_rank_launch, resumed_on_one_rank): 2 launches for the 3 stages."""
    _, _, saved = results(two_rank_launch["launch"], f"stop-{stage}")
    step_dir = two_rank_launch["tmp"] / f"run{stage}" / STEP3
    assert resumed_on_one_rank["meta"][stage]["world_size"] == 2  # read before the resume

    (resumed,), start, end = results(resumed_on_one_rank["launch"], f"resume-{stage}")
    assert_same_state(start, saved)
    assert end["step_count"] == 6 and set(end["step"]) == {6.0}
    assert max_diff(resumed, uninterrupted["params"]) <= ROUNDING_TOL

    info = json.loads((step_dir / "universal" / "reshard.json").read_text())
    assert info["source_dp_world_size"] == 2 and info["global_steps"] == 3
    assert not list(step_dir.glob(".tmp-universal-*"))
    if stage == 2:
        from harness.checkpoint.reshard import convert

        assert convert(step_dir) == (step_dir / "universal", 0.0)  # reused, not redone


@pytest.mark.slow
def test_one_rank_zero_checkpoint_resumes_on_two_ranks(tmp_path, shards_dir, uninterrupted,
                                                       two_rank_launch):
    step3 = uninterrupted["step3"]
    resume = f"checkpoint.resume={step3}"
    # two ranks do not wait for rank 0 to convert (minutes for large models, past the process
    # group's timeout): they refuse, naming the command that converts ahead of time (the
    # refused start is two_rank_launch's last case, run0)
    assert_refused(two_rank_launch["launch"], "refused", (
        f"{step3} was saved by another number of data-parallel ranks and has no universal "
        f"checkpoint yet, which 2 ranks cannot wait for: run `python -m harness.checkpoint.reshard "
        f"{step3}` once, then start again"))
    assert not (step3 / "universal").exists()
    proc = subprocess.run([sys.executable, "-m", "harness.checkpoint.reshard", str(step3)],
                          env=child_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "converted in" in proc.stdout, proc.stderr[-3000:]

    (r0, r1), start, end = launch(2, tmp_path / "b", tmp_path / "run", shards_dir, 0, 2, resume)
    assert_same_state(start, uninterrupted["saved3"])
    assert end["step_count"] == 6 and set(end["step"]) == {6.0}
    assert max_diff(r0, r1) == 0.0
    assert max_diff(r0, uninterrupted["params"]) <= ROUNDING_TOL


def test_convert_refuses_a_directory_without_zero_files(tmp_path):
    from harness.checkpoint.reshard import convert, needs_reshard
    from harness.common.errors import HarnessError

    (tmp_path / "ds").mkdir()
    with pytest.raises(HarnessError, match="no ZeRO optimizer files"):
        convert(tmp_path)
    assert not (tmp_path / "universal").exists()
    assert needs_reshard(2, 1, 1) and needs_reshard(1, 4, 3)
    assert not needs_reshard(2, 1, 0) and not needs_reshard(2, 2, 2)
