"""No rank waits in a collective for rank 0's data preparation (harness.train.run.open_shards): one
process prepares missing shards itself; several ranks refuse together, with one line that
names `harness prepare-data` (the sbatch script runs it before its job step)."""
import re
import subprocess
from types import SimpleNamespace

import pytest
from engine_utils import child_env, torchrun

import harness.train.run as run_mod
from harness.common.errors import HarnessError
from harness.config import load_config


class RecordingComm:
    """Stands in for harness.parallel.collectives.Collectives: records broadcasts, rank 0's
    value."""

    def __init__(self):
        self.broadcasts = []

    def broadcast_object(self, obj, src=0):
        self.broadcasts.append(obj)
        return obj


def _built(world_size):
    return SimpleNamespace(comm=RecordingComm(),
                           dist=SimpleNamespace(rank=0, world_size=world_size))


def _cfg(out_dir):
    return load_config("tiny", [f"data.out_dir={out_dir}", "data.max_bytes=200000"])


def test_several_ranks_refuse_missing_shards(tmp_path, monkeypatch):
    prepared = []
    monkeypatch.setattr(run_mod, "prepare_data", lambda *a, **kw: prepared.append(a))
    built = _built(4)
    with pytest.raises(HarnessError, match=r"data.out_dir=.*/none holds no token shards, and 4 "
                                           r"ranks cannot wait .*`harness prepare-data` with the "
                                           r"same --config and overrides") as err:
        run_mod.open_shards(_cfg(tmp_path / "none"), built)
    assert "\n" not in str(err.value)
    assert prepared == [] and built.comm.broadcasts == [False]  # decided together


def test_one_process_prepares_on_first_use(tmp_path, shards_dir):
    built = _built(1)
    shards = run_mod.open_shards(_cfg(tmp_path / "fresh"), built)
    assert (tmp_path / "fresh" / "manifest.json").is_file() and shards.vocab_size == 512
    assert built.comm.broadcasts == [False]  # the same collective at every world size
    built = _built(4)
    assert run_mod.open_shards(_cfg(shards_dir), built).fingerprint
    assert built.comm.broadcasts == [True]


def test_shards_of_other_sources_are_refused_by_every_rank_together(tmp_path, shards_dir):
    """Rank 0 compares the shards with the configured sources and tokenizer (reading the
    sources only when their paths, sizes or times changed) and broadcasts its verdict."""
    text = tmp_path / "mine.txt"
    text.write_text("my own corpus\n" * 500)
    cfg = load_config("tiny", [f"data.out_dir={shards_dir}", f"data.sources=[{text}]"])
    built = _built(4)
    with pytest.raises(HarnessError, match=rf"data.sources=\[{text}\] but data.out_dir="
                                           rf"{shards_dir} holds shards of the built-in corpus"):
        run_mod.open_shards(cfg, built)
    assert len(built.comm.broadcasts) == 1
    assert "holds shards of the built-in corpus" in built.comm.broadcasts[0]
    # the other ranks raise what rank 0 found, without looking themselves
    other = SimpleNamespace(comm=built.comm, dist=SimpleNamespace(rank=1, world_size=4))
    built.comm.broadcasts.clear()
    real = built.comm.broadcast_object
    built.comm.broadcast_object = lambda obj, src=0: real("rank 0's verdict")
    with pytest.raises(HarnessError, match="rank 0's verdict"):
        run_mod.open_shards(cfg, other)
    assert built.comm.broadcasts == ["rank 0's verdict"]


@pytest.mark.slow
def test_two_ranks_without_shards_exit_2_with_one_line_each(tmp_path):
    cmd = [*torchrun(2, "-m", "harness.cli"), "train",
           f"train.run_dir={tmp_path / 'run'}", f"data.out_dir={tmp_path / 'none'}",
           "model.n_layer=1", "model.d_model=32", "model.n_head=2"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    # torchrun ends the other rank as soon as one exits: it may not get to print its line
    assert proc.returncode != 0 and 1 <= len(errors) <= 2, proc.stderr[-3000:]
    assert all("holds no token shards" in ln and "harness prepare-data" in ln for ln in errors)
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr)  # torchrun's summary: exit 2, no crash
    assert not (tmp_path / "none").exists()
