"""`harness eval`, `sample`, `export` and model.init_from on bad inputs (issue 15): a checkpoint
that does not exist, is incomplete or damaged; an export directory that is not empty; a model
the target architecture cannot express; an init_from directory of another shape. The trained
runs are checkpoints.py's templates (a finished 3-step ZeRO 0 run), copied per case.
"""
from __future__ import annotations

import json
from pathlib import Path

from bad_inputs import Case
from bad_inputs.checkpoints import CK, MS, _copy, flip

STEP3 = f"{CK}/step00000003"


def _run(tmp: Path) -> None:
    _copy(tmp, 0)


def _edit_config(key: str, value: str):
    def do(tmp: Path) -> None:
        _copy(tmp, 0)
        path = tmp / "run" / "config.yaml"
        path.write_text(path.read_text().replace(f"  {key}: ", f"  {key}: {value} #", 1))
    return do


def _damaged(tmp: Path) -> None:
    _copy(tmp, 0)
    flip(MS)(tmp / STEP3)


def _incomplete(tmp: Path) -> None:
    _copy(tmp, 0)
    (tmp / STEP3 / "meta.json").unlink()


def _nothing_beside(tmp: Path) -> None:
    """No half-written export, no temporary directory left."""
    assert sorted(p.name for p in tmp.iterdir()) == ["run", "shards", "some_file"]


def _full_out(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "mine.txt").write_text("keep me\n")


def _hf_dir(tmp: Path, **config) -> None:
    (tmp / "hf").mkdir()
    base = {"model_type": "gpt2", "vocab_size": 512, "n_layer": 4, "n_embd": 128, "n_head": 4,
            "n_positions": 128}
    (tmp / "hf" / "config.json").write_text(json.dumps({**base, **config}))


def _file_in_the_way(tmp: Path) -> None:
    _copy(tmp, 0)
    (tmp / "some_file").write_text("mine\n")


TRAIN = ["train", "--config", "tiny", "train.run_dir={tmp}/new", "data.out_dir={tmp}/data",
         "wandb.mode=disabled"]
EVAL_TEXT = ["--data", "{tmp}/run/config.yaml"]

CASES = [
    Case("eval-missing-run", ["eval", "{tmp}/nope", "--data", "{tmp}"], ("nope", "does not exist")),
    Case("sample-missing-run", ["sample", "{tmp}/nope"], ("does not exist",)),
    Case("export-missing-run", ["export", "{tmp}/nope", "--to", "hf", "{tmp}/out"],
         ("does not exist",)),
    Case("export-not-empty", ["export", "{tmp}/nope", "--to", "hf", "{tmp}/out"],
         ("out", "not an empty directory"), setup=_full_out, unchanged=("out/mine.txt",)),
    Case("export-unknown-target", ["export", "{tmp}/run", "--to", "onnx", "{tmp}/out"],
         ("onnx", "hf")),
    Case("export-incomplete-checkpoint", ["export", "{tmp}/" + STEP3, "--to", "hf", "{tmp}/out"],
         ("step00000003", "not a complete checkpoint"), setup=_incomplete, slow=True),
    Case("export-damaged-checkpoint", ["export", "{tmp}/run", "--to", "hf", "{tmp}/out"],
         ("step00000003", "corrupt", MS), setup=_damaged, slow=True,
         check=lambda tmp, out, err: not (tmp / "out").exists() or None),
    Case("eval-damaged-checkpoint", ["eval", "{tmp}/run", "--data", "{tmp}/run/config.yaml"],
         ("corrupt",), setup=_damaged, slow=True),
    Case("export-qk-norm", ["export", "{tmp}/run", "--to", "hf", "{tmp}/out"],
         ("model.qk_norm=true", "GPT2LMHeadModel"), setup=_edit_config("qk_norm", "true"),
         slow=True),
    Case("export-gpt2-without-bias", ["export", "{tmp}/run", "--to", "hf", "{tmp}/out"],
         ("model.bias=false", "GPT2LMHeadModel"), setup=_edit_config("bias", "false"),
         slow=True),
    Case("eval-no-such-data", ["eval", "{tmp}/run", "--data", "{tmp}/missing.txt"],
         ("--data", "missing.txt"), setup=_run, slow=True),
    Case("eval-max-tokens-zero", ["eval", "{tmp}/run", "--data", "{tmp}", "--max-tokens", "0"],
         ("--max-tokens",)),
    # issue 24: an OUT_DIR under a file went the "unexpected error" way (exit 1)
    Case("export-under-a-file", ["export", "{tmp}/run", "--to", "hf", "{tmp}/some_file/hf"],
         ("some_file", "is a file, not a directory", "--to hf"), setup=_file_in_the_way,
         unchanged=("some_file", f"{STEP3}/meta.json"), slow=True,
         check=lambda tmp, out, err: _nothing_beside(tmp)),
    # --stride 0 ran silently at block_size: refused before the checkpoint is read
    Case("eval-stride-zero", ["eval", "{tmp}/run", *EVAL_TEXT, "--stride", "0"],
         ("--stride 0", ">= 1")),
    Case("eval-stride-negative", ["eval", "{tmp}/run", *EVAL_TEXT, "--stride=-4"],
         ("--stride -4", ">= 1")),
    Case("eval-stride-over-block", ["eval", "{tmp}/run", *EVAL_TEXT, "--stride", "33"],
         ("--stride 33", "block_size (32)"), setup=_run, slow=True),
    Case("eval-split-val-stride-zero", ["eval", "{tmp}/run", "--split", "val", "--stride", "0"],
         ("--stride 0", ">= 1")),
    Case("eval-split-and-data", ["eval", "{tmp}/run", "--split", "val", *EVAL_TEXT],
         ("--data", "--split", "not allowed")),
    Case("eval-split-unknown", ["eval", "{tmp}/run", "--split", "test"],
         ("--split", "'test'", "val")),
    Case("eval-neither-data-nor-split", ["eval", "{tmp}/run"], ("--data", "--split")),
    Case("eval-split-shards-gone", ["eval", "{tmp}/run", "--split", "val"],
         ("--split", "data.out_dir=gone", "--data"), setup=_edit_config("out_dir", "gone"),
         slow=True),
    Case("sample-negative-temperature", ["sample", "{tmp}/run", "--temperature", "-1"],
         ("--temperature",)),
    Case("init-from-no-config", [*TRAIN, "model.init_from={tmp}"],
         ("model.init_from", "no config.json")),
    Case("init-from-other-depth", [*TRAIN, "model.init_from={tmp}/hf", "model.n_layer=2"],
         ("model.init_from", "n_layer 4 vs model.n_layer=2"), setup=_hf_dir),
    Case("init-from-other-arch", [*TRAIN, "model.init_from={tmp}/hf", "model.arch=llama",
                                  "model.bias=false"],
         ("model.init_from", "model_type 'gpt2'"), setup=_hf_dir),
]
