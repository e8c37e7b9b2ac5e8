"""The large presets name the data they need: with data.sources empty they refuse the built-in
toy corpus in prepare-data, train and submit alike (one line naming data.sources and
data.allow_toy_corpus), unless data.allow_toy_corpus=true; shards of the built-in corpus are
taken as they are, whatever slice of it they hold, by prepare-data as by train. In-process;
the built-in shards are the session's `shards_dir` (a 300 kB slice, vocab 512)."""
from __future__ import annotations

import json
import logging

import pytest

from harness import cli
from harness.common.errors import HarnessError
from harness.config import load_config
from harness.data import prepare as prep
from harness.data.out_dir import check_prepared_from, check_toy_corpus
from harness.slurm.submit import submit_job
from harness.train.run_dir import check_paths

LARGE = ("gpt2-small", "gpt2-medium", "gpt-1.3b", "llama-1b")
TOY = r"^data.sources is empty, .*built-in toy corpus.*data.allow_toy_corpus=true"


def _on(preset, out_dir, tmp_path, *extra):
    """The preset pointed at out_dir with the built-in shards' tokenizer settings."""
    return load_config(preset, [f"data.out_dir={out_dir}", "data.vocab_size=512",
                                f"train.run_dir={tmp_path}/run", *extra])


@pytest.mark.parametrize("preset", LARGE)
def test_large_presets_name_their_data(preset):
    cfg = load_config(preset)
    d = cfg.data
    assert d.sources == [] and d.allow_toy_corpus is False
    assert 32000 <= d.vocab_size <= cfg.model.vocab_size and d.out_dir != "data/stdlib"
    assert load_config("tiny").data.allow_toy_corpus  # the toy presets are the toy corpus's


@pytest.mark.parametrize("preset", ["gpt2-small", "llama-1b"])
def test_prepare_data_refuses_the_toy_corpus_and_writes_nothing(preset, tmp_path, capsys):
    code = cli.main(["prepare-data", "--config", preset, f"data.out_dir={tmp_path}/out"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "data.sources=[corpus/,more.jsonl]" in err and "data.allow_toy_corpus=true" in err
    assert list(tmp_path.iterdir()) == []


def test_train_and_submit_refuse_the_built_in_shards_by_the_same_rule(shards_dir, tmp_path):
    cfg = _on("gpt2-small", shards_dir, tmp_path)
    for check in (lambda: check_paths(cfg),  # harness train, before any engine is built
                  lambda: check_prepared_from(cfg.data, shards_dir),  # train's rank 0
                  lambda: submit_job(cfg, dry_run=True),
                  lambda: prep.prepare_data(cfg.data, progress=False)):
        with pytest.raises(HarnessError, match=TOY):
            check()
    assert not (tmp_path / "run").exists()


def test_submit_refuses_before_the_shards_exist(tmp_path, capsys):
    code = cli.main(["submit", "--dry-run", "--config", "llama-1b",
                     f"data.out_dir={tmp_path}/none", f"train.run_dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert code == 2 and "data.allow_toy_corpus=true" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_asked_for_the_toy_corpus_is_used_as_prepared(shards_dir, tmp_path, caplog, capsys):
    """allow_toy_corpus=true: all three go on; prepare-data with another data.max_bytes than
    the slice was prepared with takes the shards as they are (as train does), says so, and
    rewrites nothing."""
    cfg = _on("gpt2-small", shards_dir, tmp_path, "data.allow_toy_corpus=true",
              "data.max_bytes=123456")
    before = (shards_dir / "manifest.json").read_text()
    with caplog.at_level(logging.INFO, logger="harness"):
        check_paths(cfg)
        check_prepared_from(cfg.data, shards_dir)
        assert submit_job(cfg, dry_run=True) == 0
        assert prep.main(cfg.data) == 0
    assert "is up to date" in capsys.readouterr().out
    assert (shards_dir / "manifest.json").read_text() == before
    notes = [r.getMessage() for r in caplog.records if "used as it is" in r.getMessage()]
    assert notes and all("data.max_bytes=300000; this config says 123456" in n for n in notes)


def test_shards_of_the_users_own_sources_are_not_the_toy_corpus(tmp_path):
    """data.sources empty but data.out_dir holds shards prepared from other sources: trained
    on as prepared (the documented `prepare-data data.sources=...` then `train
    data.out_dir=...` flow), not refused as the toy corpus."""
    (tmp_path / "a.txt").write_text("".join(f"w{i % 89} l{i % 11}\n" for i in range(3000)))
    out = prep.prepare_data(load_config("tiny", [f"data.sources=[{tmp_path}/a.txt]",
                                                 f"data.out_dir={tmp_path}/mine",
                                                 "data.vocab_size=300"]).data, progress=False)
    cfg = _on("llama-1b", out, tmp_path)
    check_toy_corpus(cfg.data, out)
    check_prepared_from(cfg.data, out)
    assert json.loads((out / "manifest.json").read_text())["sources_given"]
