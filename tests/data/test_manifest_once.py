"""A training start parses data.out_dir's manifest once per process (issue 30, item 6), though
run_dir.check_paths, out_dir.check_prepared_from and TokenShards.open all read it: the parse is
kept while the file is the same (device, inode, size, mtime), and a rewritten manifest is
parsed again."""
import json
import os

import pytest
from trained_runs import BASE

import harness.data.shards as shards
from harness.config import load_config
from harness.train.run import make_trainer


class CountingJson:
    def __init__(self):
        self.loads_calls = 0

    def loads(self, text):
        self.loads_calls += 1
        return json.loads(text)

    def __getattr__(self, name):
        return getattr(json, name)


@pytest.fixture
def counting(monkeypatch):
    counter = CountingJson()
    monkeypatch.setattr(shards, "json", counter)
    monkeypatch.setattr(shards, "_last_parsed", None)
    return counter


def test_a_training_start_parses_the_manifest_once(counting, shards_dir, tmp_path):
    cfg = load_config("tiny", [*BASE, f"data.out_dir={shards_dir}", "data.eval_every=1",
                               f"train.run_dir={tmp_path / 'run'}"])
    trainer, _ = make_trainer(cfg)
    assert counting.loads_calls == 1
    assert trainer.data.sequences.path.parent == shards_dir


def test_a_rewritten_manifest_is_parsed_again(counting, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    manifest = {"format_version": shards.FORMAT_VERSION, "n": 1}
    (d / shards.MANIFEST).write_text(json.dumps(manifest))
    assert shards.read_manifest(d) is shards.read_manifest(d)
    assert counting.loads_calls == 1
    tmp = d / "new.json"
    tmp.write_text(json.dumps({**manifest, "n": 2}))
    os.replace(tmp, d / shards.MANIFEST)  # as prepare-data writes it: another inode
    assert shards.read_manifest(d)["n"] == 2 and counting.loads_calls == 2
