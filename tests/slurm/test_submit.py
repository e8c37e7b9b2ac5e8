"""`harness submit` freezes a config the job can read from its own --chdir=RUN_DIR: every path
in it absolute, resolved where submit ran."""
import dataclasses
import re
import subprocess
import sys

import pytest
from engine_utils import child_env

import harness.slurm.submit as submit_mod
from harness.config import Config, load_config
from harness.slurm.submit import PATH_KEYS, RELATIVE_TO_RUN_DIR

RELATIVE = ["train.run_dir=run", "data.sources=[corpus,~/more.jsonl]", "data.out_dir=shards",
            "data.tokenizer_model=tok/sp.model", "checkpoint.dir=ckpts",
            "checkpoint.resume=old/step00000003", "wandb.dir=wb"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A cwd with the files config validation looks for, and a HOME for ~."""
    (tmp_path / "old" / "step00000003").mkdir(parents=True)
    (tmp_path / "old" / "step00000003" / "meta.json").write_text("{}")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_path_in_the_frozen_config_is_absolute(workdir, monkeypatch):
    monkeypatch.setattr(submit_mod, "submit", lambda path: "12345")  # no cluster needed
    assert submit_mod.submit_job(load_config("tiny", RELATIVE)) == 0
    frozen = load_config(str(workdir / "run" / "job_config.yaml"))
    assert frozen.train.run_dir == str(workdir / "run")
    assert frozen.data.sources == [str(workdir / "corpus"), str(workdir / "home" / "more.jsonl")]
    assert frozen.data.out_dir == str(workdir / "shards")
    assert frozen.data.tokenizer_model == str(workdir / "tok" / "sp.model")
    assert frozen.checkpoint.dir == str(workdir / "ckpts")
    assert frozen.checkpoint.resume == str(workdir / "old" / "step00000003")
    assert frozen.wandb.dir == str(workdir / "wb")
    assert frozen.slurm.output == "slurm-%j.out"  # meant relative to the run directory


def test_keywords_and_unset_paths_stay_as_they_are(workdir):
    for resume in ("auto", "never"):
        cfg = submit_mod.absolute_paths(load_config("tiny", [f"checkpoint.resume={resume}"]))
        assert cfg.checkpoint.resume == resume
    cfg = submit_mod.absolute_paths(load_config("tiny"))
    assert cfg.data.sources == [] and cfg.wandb.dir is None and cfg.checkpoint.dir is None


def test_dry_run_script_uses_absolute_paths(workdir):
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "submit", "--config", "tiny",
                           *RELATIVE, "--dry-run"], cwd=workdir, env=child_env(HOME=str(workdir)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert f"#SBATCH --chdir={workdir}/run\n" in script
    assert f"DATA_DIR={workdir}/shards\n" in script  # prepared in the script when missing
    assert f"prepare-data --config {workdir}/run/job_config.yaml" in script
    assert f"train --config {workdir}/run/job_config.yaml" in script
    assert not (workdir / "run").exists()  # a dry run writes nothing


def _leaf_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        kind = f.type if not isinstance(f.type, str) else None
        if dataclasses.is_dataclass(kind) or (f.default_factory is not dataclasses.MISSING
                                              and dataclasses.is_dataclass(f.default_factory)):
            yield from _leaf_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_path_like_key_is_handled():
    """A new key naming a file or directory must be made absolute too (or be declared relative
    to the run directory): this fails until submit.PATH_KEYS says which."""
    keys = set(_leaf_keys(Config))
    assert set(PATH_KEYS) | set(RELATIVE_TO_RUN_DIR) <= keys
    not_paths = {"model.d_model"}  # a width, not a model file
    path_like = {k for k in keys - not_paths
                 if re.search(r"(^|_)(dir|path|file|files|sources|model|output|resume)$",
                              k.split(".")[-1])}
    assert path_like == set(PATH_KEYS) | set(RELATIVE_TO_RUN_DIR), path_like
