"""`harness eval RUN --split val` on a run trained on a data mixture (data.mix): each source's
split scored on its own, the mixture's loss and bits per byte combined with the config's shares
as the trainer combines them; with --trainer-set every loss is the trainer's own eval/loss/<name>
and eval/loss at the checkpoint's step. One tiny mix run (tests/mix_corpus.py), trained in the
run's directory's parent with relative paths, as a user would, serves every test."""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
from pathlib import Path

import pytest
from mix_corpus import mix_cfg, write_sources
from trained_runs import BASE

from harness.callbacks.evaluator import eval_set_size
from harness.callbacks.loggers import end_lines
from harness.checkpoint import io as checkpoint_io
from harness.cli import main
from harness.data.shards import TokenShards
from harness.train.run import make_trainer

OVERRIDES = [x for x in BASE if not x.startswith(("model.vocab_size", "data.eval_every"))] + [
    "data.eval_every=1", "data.eval_sequences=6", "data.out_dir=out", "train.run_dir=run"]


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory):
    """(root, the trainer's closing lines): root/run trained 2 steps on root/out's web (0.7)
    and code (0.3), from the current directory root (data.out_dir=out, train.run_dir=run)."""
    root = tmp_path_factory.mktemp("evalmix")
    write_sources(root)
    here = os.getcwd()
    os.chdir(root)
    try:
        trainer, _ = make_trainer(mix_cfg(root, *OVERRIDES))
        trainer.fit()
        return root, end_lines(trainer)
    finally:
        os.chdir(here)


def _eval(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _last_eval(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r][-1]


def test_trainer_set_gives_the_trainers_eval_losses(mix_run, capsys):
    root, _ = mix_run
    run = root / "run"
    rec = _last_eval(run)
    out = _eval(capsys, run, "--split", "val", "--trainer-set")
    cfg = checkpoint_io.load_config_of(run)
    assert out["step"] == rec["step"] == cfg.train.max_steps
    assert out["weights"] == {"web": 0.7, "code": 0.3}
    assert list(out["sources"]) == ["web", "code"]
    for name, src in out["sources"].items():
        val = TokenShards.open(root / "out" / name).sequences("val", cfg.model.block_size)
        assert src["windows"] == min(len(val), eval_set_size(cfg)) == 6  # a set of some
        assert src["loss"] == pytest.approx(rec[f"eval/loss/{name}"], rel=1e-6)
        assert src["bits_per_byte"] == pytest.approx(rec[f"eval/bpb/{name}"], rel=1e-6)
    assert out["loss"] == pytest.approx(rec["eval/loss"], rel=1e-6)
    assert out["bits_per_byte"] == pytest.approx(rec["eval/bpb"], rel=1e-6)
    # the closed forms, from the per-source records
    web, code = out["sources"]["web"], out["sources"]["code"]
    assert out["loss"] == pytest.approx(0.7 * web["loss"] + 0.3 * code["loss"], rel=1e-12)
    bpt = 0.7 * web["bytes"] / web["tokens"] + 0.3 * code["bytes"] / code["tokens"]
    assert out["bits_per_byte"] == pytest.approx(out["loss"] / (math.log(2) * bpt), rel=1e-12)
    assert out["tokens"] == web["tokens"] + code["tokens"] == 12 * cfg.model.block_size


def test_the_closing_lines_eval_command_works(mix_run, capsys, monkeypatch):
    """The command the trainer prints, from where it trained; the run's absolute path from
    elsewhere (data.out_dir found beside the run); the train split, --max-tokens per source."""
    root, lines = mix_run
    command = next(x for x in lines if x.startswith("eval: "))[len("eval: "):]
    assert command == "harness eval run --split val"
    monkeypatch.chdir(root)
    here = _eval(capsys, *shlex.split(command)[2:])
    for name, src in here["sources"].items():  # the whole split, every token once
        assert src["shards"] == str(Path("out") / name)
        assert src["tokens"] == src["split_tokens"] - 1
    monkeypatch.chdir(root / "web")
    away = _eval(capsys, root / "run", "--split", "val")
    assert away["shards"] == str(root / "out")  # beside the run, not web/out
    assert away["loss"] == pytest.approx(here["loss"], rel=1e-9)
    train = _eval(capsys, root / "run", "--split", "train", "--max-tokens", 100)
    assert [s["tokens"] for s in train["sources"].values()] == [100, 100]


def test_a_source_prepared_again_is_warned_and_a_missing_one_refused(mix_run, capsys, caplog,
                                                                     monkeypatch):
    root, _ = mix_run
    real_load = checkpoint_io.load

    def load(path):  # as if trained on code's shards of another preparation, other weights
        loaded = real_load(path)
        loaded.meta["data_mix"]["fingerprints"]["code"] = "0" * 64
        loaded.meta["data_mix"]["phases"][-1][1] = {"web": 0.5, "code": 0.5}
        return loaded

    # a context, not monkeypatch.undo(): that would also undo conftest's autouse patch that
    # keeps the error path below from tearing down the process group later tests share
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="harness"):
        patch.setattr(checkpoint_io, "load", load)
        _eval(capsys, root / "run", "--split", "val", "--max-tokens", 64)
    warned = [r.getMessage() for r in caplog.records if "fingerprint" in r.getMessage()]
    assert len(warned) == 1 and "out/code: data fingerprint" in warned[0]
    assert any("trained with the shares web 0.5, code 0.5; the mixture's loss uses the run "
               "config's web 0.7, code 0.3" in r.getMessage() for r in caplog.records)
    (root / "out" / "code").rename(root / "code_away")
    try:
        assert main(["eval", str(root / "run"), "--split", "val"]) == 2
        assert "no token shards for data.mix source(s) code" in capsys.readouterr().err
    finally:
        (root / "code_away").rename(root / "out" / "code")
