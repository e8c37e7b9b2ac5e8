"""`harness smoke`: passes on this CPU at its real sizes, and fails with the right line when a
check is broken on purpose.

One real smoke (the tiny preset, 30 + 10 steps, export and reload) is shared by the tests that
only read it; each broken case is a smoke of a 2-layer model over 6 steps. What stays unproven
here: the GPU path (bf16, NCCL, the GPU's rounding against RESUME_TOL's GPU bounds) until the
GPU job (.github/workflows/ci.yml) runs it.
"""
from __future__ import annotations

import contextlib
import io
import math
import sys

import pytest

from harness.cli import main as cli_main
from harness.smoke import checks, command
from harness.smoke.command import Sizes

SMALL_MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.block_size=64",
               "train.global_batch_size=8", "train.micro_batch_size=4", "optim.warmup_steps=2"]
SMALL = Sizes(steps=6, every=2)
NAMES = ["data", "train", "monitor", "loss", "norm", "resume", "finite", "export"]


def run_cli(*argv: str) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["smoke", *argv])
    return code, out.getvalue().splitlines(), err.getvalue()


def status(line: str) -> tuple[str, str]:
    """A check line's (PASS | FAIL | SKIP, the detail after the check's name)."""
    verdict, _, detail = line.split(None, 2)
    return verdict, detail


def small(tmp_path, capsys, *extra: str) -> tuple[int, dict[str, str]]:
    """A small smoke through command.main: (exit code, check name -> its line)."""
    code = command.main(str(tmp_path / "smoke"), "cpu", SMALL, [*SMALL_MODEL, *extra])
    lines = capsys.readouterr().out.splitlines()
    return code, {line.split()[1]: line for line in lines[:-1]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke") / "dir"
    with pytest.MonkeyPatch.context() as mp:  # as conftest's autouse fixture does per test:
        # the CLI leaves the process group at the end, which later tests' engines share
        mp.setattr("harness.parallel.distributed.close_process_group", lambda: None)
        code, lines, err = run_cli("--dir", str(root), "--device", "cpu")
    return root, code, lines, err


def test_the_smoke_passes_on_this_cpu(smoke):
    root, code, lines, err = smoke
    assert code == 0, "\n".join(lines) + err
    assert [line.split()[:2] for line in lines[:-1]] == [["PASS", n] for n in NAMES]
    assert lines[-1].startswith("smoke: all 8 checks passed")
    assert err == ""  # the phases' output went to smoke.log
    log = (root / "smoke.log").read_text()
    assert "step     30/30" in log and "step 20 of 30" in log  # the run and the resumed run
    assert (root / "run" / "report.png").is_file() and (root / "run" / "metrics.jsonl").is_file()
    assert (root / "hf" / "model.safetensors").is_file()


def test_the_lines_carry_their_numbers(smoke):
    _, _, lines, _ = smoke
    by = {line.split()[1]: line for line in lines[:-1]}
    assert "30/30 steps" in by["train"] and "fp32, ZeRO 1, every-layer" in by["train"]
    assert "from step 20, steps 21-30" in by["resume"] and "(bitwise)" in by["resume"]
    assert "GPT2LMHeadModel" in by["export"] and "tokenizer ids equal" in by["export"]


def test_the_step1_reference_is_plain_pytorch(smoke):
    """The norm line's reference against the run's own step 1, recomputed here: the reference
    (plain PyTorch on the run's config) and the logged norm agree within fp32 rounding."""
    root, *_ = smoke
    from harness.checkpoint.io import load_config_of
    from harness.smoke.reference import step1_norm

    logged = command.metrics(root / "run")[0]["optim/grad_norm_preclip"]
    ref = step1_norm(load_config_of(root / "run"), "cpu")
    assert checks.rel(logged, ref) <= checks.NORM_RTOL["fp32"]
    assert checks.step1_norm(logged * (1 + 3 * checks.NORM_RTOL["fp32"]), ref, "fp32").status \
        == "FAIL"


def test_a_second_smoke_in_the_same_dir_refuses_foreign_files(smoke, tmp_path):
    root, *_ = smoke
    (tmp_path / "mine.txt").write_text("the user's")
    code, lines, err = run_cli("--dir", str(tmp_path))
    assert code == 2 and lines == [] and "not an earlier smoke's (mine.txt)" in err
    assert (tmp_path / "mine.txt").read_text() == "the user's"
    command.claim_dir(root)  # an earlier smoke's directory: cleared but for its data
    assert sorted(p.name for p in root.iterdir()) == [".harness-smoke", "data"]


def test_bad_input_exits_2(tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = run_cli("--dir", str(tmp_path / "file"))
    assert code == 2 and err.startswith("error: --dir") and "is a file" in err
    if "torch" in sys.modules and not sys.modules["torch"].cuda.is_available():
        code, _, err = run_cli("--dir", str(tmp_path / "new"), "--device", "cuda")
        assert code == 2 and "sees no CUDA GPU" in err
        assert not (tmp_path / "new").exists()


def test_missing_transformers_is_one_line_naming_the_extra(smoke, tmp_path, monkeypatch):
    root, *_ = smoke
    from harness.smoke.hf_reload import export_and_reload

    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    check = export_and_reload(root / "run", tmp_path / "hf")
    assert check.status == "FAIL" and check.line().endswith("pip install -e .[hf]")


def test_a_nonfinite_loss_fails_and_bf16_passes_the_rest(tmp_path, capsys, monkeypatch):
    """A NaN train/loss at step 3 (the logged value only): the finite check names it, the
    monitor's alarm and the loss check fail too, exit 1. The run is in bf16, what the GPU job
    trains (--device cuda picks it: the config is read here), so the checks that do not depend
    on the model's size show the GPU precision on this CPU: the step-1 norm within the bf16
    bound, the resume bit for bit, the export of BF16_Optimizer's fp32 masters. Unproven until
    the GPU job runs: CUDA kernels, NCCL, the GPU's rounding against checks.RESUME_TOL."""
    from harness.train.trainer import Trainer

    gpu = command.smoke_config(tmp_path, "cuda", Sizes())
    assert (gpu.train.device, gpu.train.precision, gpu.zero.stage) == ("cuda", "bf16", 1)
    real = Trainer._reduced_scalars

    def nan_at_3(self, stats):
        signals = real(self, stats)
        if self.step + 1 == 3:
            signals["train/loss"] = math.nan
        return signals

    monkeypatch.setattr(Trainer, "_reduced_scalars", nan_at_3)
    code, by = small(tmp_path, capsys, "train.precision=bf16")
    assert code == 1
    assert status(by["finite"]) == ("FAIL", "train/loss=nan at step 3 of the uninterrupted run's "
                                            "metrics.jsonl")
    assert status(by["monitor"]) == ("FAIL", "1 events, 1 alarms: first nonfinite on "
                                             "train/loss at step 3")
    assert status(by["loss"])[0] == "FAIL"
    assert "bf16" in by["train"] and "tolerance 0.02" in by["norm"]
    assert [status(by[n])[0] for n in ("train", "norm", "resume", "export")] == ["PASS"] * 4
    assert "(bitwise)" in by["resume"]


def test_a_perturbed_resume_fails_the_resume_check(tmp_path, capsys, monkeypatch):
    """The resumed run starts one global batch further into the data than the checkpoint
    says (a data-position bug): its steps differ from the uninterrupted run's."""
    import harness.train.run as run_mod

    real = run_mod.load

    def skip_a_batch(trainer, path):
        meta = real(trainer, path)
        trainer.consumed_samples += trainer.plan.batch.global_batch
        return meta

    monkeypatch.setattr(run_mod, "load", skip_a_batch)
    code, by = small(tmp_path, capsys)
    assert code == 1
    verdict, detail = status(by["resume"])
    assert verdict == "FAIL" and detail.startswith("from step 4, steps 5-6 against the "
                                                   "uninterrupted run (bitwise)")
    assert all(status(by[n])[0] == "PASS" for n in ("data", "train", "norm", "finite"))



def test_a_phase_that_raises_is_a_fail_line_with_its_traceback_in_the_log(tmp_path, capsys):
    log = tmp_path / "smoke.log"
    result, failed = command.Phase(log)("export", lambda: print("chatter") or 1 / 0)
    assert result is None and capsys.readouterr().out == ""  # its output went to the log
    assert failed.line() == (f"FAIL export  ZeroDivisionError: division by zero (traceback in "
                             f"{log})")
    assert "chatter" in log.read_text() and "Traceback" in log.read_text()
