"""Corrupt checkpoints: verified on resume, set aside, and the run goes on bit-identically.

A run saves at steps 2 and 4 (real DeepSpeed engine, real files) and is copied once per case;
the copy's step 4 is damaged (truncated or bit-flipped model states, ds/ deleted, meta.json torn,
the RNG file deleted), and `checkpoint.resume=auto` must warn once naming the steps it loses,
set step 4 aside, resume from step 2 and end exactly where an uninterrupted run ends. No intact
checkpoint at all, or a damaged one named explicitly, is one error line (exit 2). Checkpoints
saved before checksums existed still resume.
"""
import json
import logging
import random
import shutil
from pathlib import Path

import batched
import pytest
import torch
from engine_utils import child_env, final_params, max_diff, torchrun
from test_resume import TINY, cfg_for

from harness.checkpoint.checkpointer import load
from harness.checkpoint.sums import (CHECKSUM, META, _hash_chunk, _meta_digest, _share,
                                     complete_checkpoints)
from harness.common.errors import HarnessError
from harness.train.run import make_trainer

STEP2, STEP4 = "checkpoints/step00000002", "checkpoints/step00000004"
MODEL_STATES = "ds/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def source(tmp_path_factory, shards_dir):
    """A run of 6 steps stopped after step 4: checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("source") / "run"
    final_params(cfg_for(run, shards_dir), stop_at=4)
    return run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards_dir):
    return final_params(cfg_for(tmp_path_factory.mktemp("whole"), shards_dir))


def copy_of(source: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(source, run)
    return run


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


def strip_checksums(step_dir: Path) -> None:
    """As a checkpoint written before checksums existed."""
    meta = json.loads((step_dir / META).read_text())
    for key in ("files", "checksum", "meta_sha256"):
        meta.pop(key)
    (step_dir / META).write_text(json.dumps(meta, indent=2))


DAMAGE = {
    "truncated_model_states": lambda s: truncate(s / MODEL_STATES),
    "bit_flipped_model_states": lambda s: flip_a_bit(s / MODEL_STATES),
    "ds_deleted": lambda s: shutil.rmtree(s / "ds"),
    "meta_torn": lambda s: truncate(s / META),
    "rng_file_deleted": lambda s: (s / "rank0.pt").unlink(),
    "meta_edited": lambda s: (s / META).write_text(
        (s / META).read_text().replace('"consumed_samples": 32', '"consumed_samples": 40')),
    "meta_file_list_removed": lambda s: (s / META).write_text(json.dumps(
        {k: v for k, v in json.loads((s / META).read_text()).items() if k != "files"})),
}
REASON = {"truncated_model_states": f"{MODEL_STATES}: ", "bit_flipped_model_states":
          f"{MODEL_STATES}: checksum mismatch", "ds_deleted": "ds/ is missing",
          "meta_torn": "meta.json is torn", "rng_file_deleted": "rank0.pt: missing",
          "meta_edited": "meta.json does not match its checksum",
          "meta_file_list_removed": "meta.json does not match its checksum"}


def harness_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "harness" and r.levelno >= logging.WARNING]


def resume_and_finish(cfg, expect_step: int):
    trainer, _ = make_trainer(cfg)
    assert trainer.step == expect_step
    trainer.fit()
    return {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_bit_identically(damage, source, uninterrupted,
                                                              tmp_path, shards_dir, caplog):
    run = copy_of(source, tmp_path)
    DAMAGE[damage](run / STEP4)
    caplog.set_level(logging.INFO, logger="harness")
    resumed = resume_and_finish(cfg_for(run, shards_dir), expect_step=2)
    assert max_diff(resumed, uninterrupted) == 0.0
    (line,) = harness_warnings(caplog)
    assert "checkpoint step00000004 (" in line and REASON[damage] in line, line
    assert "resuming from step00000002 instead, so steps 3-4 are lost" in line
    assert "\n" not in line
    # kept for a post-mortem, out of the way of keep_last and of the next resume
    assert (run / "checkpoints" / "corrupt-step00000004").is_dir()
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == \
           ["step00000002", "step00000004", "step00000006"]
    assert (run / "checkpoints" / "latest").read_text() == "step00000006\n"


def test_every_file_is_checksummed_before_the_rename(source):
    step = source / STEP4
    meta = json.loads((step / META).read_text())
    assert meta["checksum"] == CHECKSUM and meta["meta_sha256"] == _meta_digest(meta)
    on_disk = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())
    assert sorted(meta["files"]) == sorted(f for f in on_disk if f != META)
    assert {MODEL_STATES, "rank0.pt"} <= set(meta["files"])
    for rel, entry in meta["files"].items():
        assert (step / rel).stat().st_size == entry["size"]
        assert entry["sha256"] == [_hash_chunk(step / rel, 0, entry["size"])]  # < 64 MiB
    assert not list(step.glob(".sums-*"))  # the per-rank lists were merged and removed


def test_two_damaged_checkpoints_fall_back_twice(source, tmp_path, shards_dir, caplog):
    run = copy_of(source, tmp_path)
    shutil.copytree(run / STEP4, run / "checkpoints" / "step00000005")  # a newer one ...
    (run / "checkpoints" / "step00000005" / META).unlink()  # ... whose save never completed
    flip_a_bit(run / STEP4 / "rank0.pt")
    caplog.set_level(logging.INFO, logger="harness")
    trainer, _ = make_trainer(cfg_for(run, shards_dir))
    assert trainer.step == 2
    (line,) = harness_warnings(caplog)
    assert "step00000005 (no meta.json: its save never completed)" in line
    assert "step00000004 (rank0.pt: checksum mismatch) are corrupt" in line
    assert "steps 3-5 are lost" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
           ["corrupt-step00000004", "corrupt-step00000005", "latest", "step00000002"]


def test_no_intact_checkpoint_is_one_error_line(source, tmp_path, shards_dir):
    run = copy_of(source, tmp_path)
    truncate(run / STEP4 / MODEL_STATES)
    shutil.rmtree(run / STEP2 / "ds")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    # its own process: the real exit code, and in-process DeepSpeed state left as it was
    # (a fork of a warm interpreter, tests/forked_cli.py; its output files beside the run)
    import forked_cli

    code, _, err = forked_cli.run(["train", "--config", "tiny", *TINY, f"train.run_dir={run}",
                                   f"data.out_dir={shards_dir}"], tmp_path, child_env(),
                                  timeout=300)
    assert code == 2, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert f"no intact checkpoint in {run / 'checkpoints'}" in line
    assert "step00000004 (ds/mp_rank_00_model_states.pt: " in line
    assert "step00000002 (ds/ is missing)" in line and "move" in line
    assert "Traceback" not in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing moved


def test_a_damaged_checkpoint_named_explicitly_is_an_error(source, tmp_path, shards_dir):
    run = copy_of(source, tmp_path)
    flip_a_bit(run / STEP4 / MODEL_STATES)
    with pytest.raises(HarnessError) as info:
        make_trainer(cfg_for(run, shards_dir, f"checkpoint.resume={run / STEP4}"))
    msg = str(info.value)
    assert msg.startswith(f"checkpoint.resume={run / STEP4} is corrupt or incomplete (")
    assert f"name an older one (checkpoint.resume={run / STEP2})" in msg
    assert (run / STEP4).is_dir()  # the user named it: nothing is set aside


def test_an_older_checkpoint_named_explicitly_resumes(source, uninterrupted, tmp_path,
                                                      shards_dir):
    run = copy_of(source, tmp_path)
    shutil.rmtree(run / STEP4 / "ds")
    cfg = cfg_for(run, shards_dir, f"checkpoint.resume={run / STEP2}")
    assert max_diff(resume_and_finish(cfg, expect_step=2), uninterrupted) == 0.0


def test_checkpoints_without_checksums_resume_unverified(source, uninterrupted, tmp_path,
                                                         shards_dir, caplog):
    run = copy_of(source, tmp_path)
    strip_checksums(run / STEP4)
    caplog.set_level(logging.INFO, logger="harness")
    assert max_diff(resume_and_finish(cfg_for(run, shards_dir), 4), uninterrupted) == 0.0
    assert any("saved without checksums" in r.getMessage() and "unverified" in r.getMessage()
               for r in caplog.records)
    assert not harness_warnings(caplog)


def test_old_checkpoint_missing_its_rng_file_falls_back(source, uninterrupted, tmp_path,
                                                        shards_dir, caplog):
    run = copy_of(source, tmp_path)
    for step in (STEP2, STEP4):
        strip_checksums(run / step)
    (run / STEP4 / "rank0.pt").unlink()
    caplog.set_level(logging.INFO, logger="harness")
    assert max_diff(resume_and_finish(cfg_for(run, shards_dir), 2), uninterrupted) == 0.0
    (line,) = harness_warnings(caplog)
    assert "step00000004 (rank0.pt: missing)" in line


def test_load_refuses_a_missing_rng_file_at_the_saved_world_size(source, tmp_path, shards_dir):
    """load() itself (the monitor's rollback calls it directly): one line, not a divergence."""
    run = copy_of(source, tmp_path)
    (run / STEP4 / "rank0.pt").unlink()
    trainer, _ = make_trainer(cfg_for(tmp_path / "fresh", shards_dir))
    with pytest.raises(HarnessError, match=r"lacks rank0\.pt .* silently diverge .*"
                                           r"checkpoint\.resume=.*step00000002"):
        load(trainer, run / STEP4)
    shutil.rmtree(run / STEP4 / "ds")
    with pytest.raises(HarnessError, match=r"step00000004/ds is missing"):
        load(trainer, run / STEP4)


def test_reshard_refuses_a_damaged_checkpoint(source, tmp_path, capsys):
    from harness.checkpoint.reshard import main

    run = copy_of(source, tmp_path)
    truncate(run / STEP4 / MODEL_STATES)
    assert main([str(run / STEP4)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {run / STEP4} is corrupt or incomplete ({MODEL_STATES}: ")
    assert not (run / STEP4 / "universal").exists()


def test_a_crafted_file_list_is_refused_not_followed(tmp_path):
    """Paths out of the step directory, or entries of the wrong shape, even with a matching
    meta checksum: a verdict, never an exception on rank 0 (the others wait for its answer)."""
    from harness.checkpoint.sums import _inspect

    for files in ({"../../etc/passwd": {"size": 1, "sha256": ["0" * 64]}},
                  {"rank0.pt": {"size": 1}}, {"rank0.pt": {"size": 2**40, "sha256": ["x"]}},
                  ["rank0.pt"]):
        meta = {"step": 1, "consumed_samples": 8, "world_size": 1, "checksum": CHECKSUM,
                "files": files}
        meta["meta_sha256"] = _meta_digest(meta)
        (tmp_path / META).write_text(json.dumps(meta))
        assert _inspect(tmp_path)["problem"] == "meta.json: malformed list of files"


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_verification_work_is_split_evenly(world):
    rng = random.Random(world)
    units = [(k, i, rng.choice([64 << 20, rng.randrange(1, 64 << 20)]))
             for k in range(20) for i in range(rng.randint(1, 6))]
    shares = [_share(units, r, world) for r in range(world)]
    assert sorted(u for s in shares for u in s) == sorted(units)  # each chunk exactly once
    bound = sum(u[2] for u in units) / world + max(u[2] for u in units)
    assert max(sum(u[2] for u in s) for s in shares) <= bound


# ---- two ranks: both reach the same decision ---------------------------------------------------


@pytest.mark.slow
def test_two_ranks_fall_back_together(tmp_path, shards_dir):
    """Rank 1's optimizer partition is damaged: rank 0 alone would load intact files, but the
    verdict is shared, so both ranks resume from step 2 and end as an uninterrupted run.

    One torchrun launch (tests/batched.py): the ranks run the uninterrupted run, the run
    stopped after step 4, and (once rank 0 has flipped a bit in rank 1's partition) its resume,
    each in turn with an engine of its own."""
    out, run = tmp_path / "out", tmp_path / "run"

    def case(run_dir, **spec):
        return {**spec, "overrides": [*TINY, f"train.run_dir={run_dir}",
                                      f"data.out_dir={shards_dir}", "zero.stage=1"]}

    damaged = run / STEP4 / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    cases = {"whole": case(tmp_path / "whole"), "stopped": case(run, stop_at=4),
             "resumed": case(run, flip_a_bit=[str(damaged)])}
    worker = str(Path(__file__).parents[1] / "dist_worker.py")
    outcome = batched.launch(lambda spec: torchrun(2, worker, "--cases", str(spec), str(out)),
                             out, cases, child_env())
    whole, _, resumed = ([torch.load(outcome.dir(c) / f"rank{r}.pt") for r in range(2)]
                         for c in cases)
    log = outcome.output  # the whole launch's: only the resume may warn
    warnings = [ln for ln in log.splitlines() if "is corrupt or incomplete" in ln]
    assert len(warnings) == 1, log[-3000:]  # rank 0 says it, once
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: checksum mismatch" in warnings[0]
    assert "steps 3-4 are lost" in warnings[0]
    for r in range(2):
        assert max_diff(resumed[r], whole[r]) == 0.0
