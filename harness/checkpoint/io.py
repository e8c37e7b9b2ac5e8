"""A trained model out of a run directory or a step directory, in a plain process on the CPU.

No DeepSpeed engine and no process group: `harness eval`, `sample` and `export` run anywhere,
whatever ZeRO stage and world size the checkpoint was saved at.

  - RUN_DIR: its newest complete checkpoint (checkpoint.dir from RUN_DIR/config.yaml, default
    RUN_DIR/checkpoints); a step directory: that one, with the config of the run around it.
  - The checkpoint is verified first (meta.json's sizes and SHA-256 checksums, as a resume
    does): a damaged or half-written one is refused with one line, never half-loaded.
  - Weights: ZeRO 0-2 keep the whole module in ds/mp_rank_00_model_states.pt; when those are
    full fp32 they are used as they are (the very weights training evaluated). ZeRO 3 keeps
    only placeholders there, and bf16/fp16 runs keep low-precision copies: then DeepSpeed's
    zero_to_fp32 rebuilds the fp32 master weights from the per-rank optimizer files, at any
    number of saving ranks.
  - Tensor parallelism (meta.json's tensor_parallel_size): each tensor-parallel rank's file
    (mp_rank_NN) holds its shards; they are read as above and joined as AutoTP cut them
    (harness.parallel.tensor_parallel.merge_shards). fp32 and bf16 at ZeRO 0-1 give fp32 masters;
    where only zero_to_fp32 could (ZeRO 2 in bf16, fp16 at ZeRO 1-2), the trained
    low-precision weights are upcast.
  - The tokenizer is the run's own: data.tokenizer_model, else DATA_OUT_DIR/tokenizer.model.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from harness.checkpoint.sums import META, _Group, _verify, complete_checkpoints
from harness.common.errors import HarnessError
from harness.config import Config, load_config
from harness.data.shards import TOKENIZER_FILE

log = logging.getLogger("harness")
RUN_CONFIG = "config.yaml"
TAG = "ds"  # harness.checkpoint.checkpointer saves the engine under step/ds/
MODEL_STATES = "mp_rank_00_model_states.pt"
BF16_OPTIM = "bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"


@dataclass
class Loaded:
    model: nn.Module  # eval mode, fp32, CPU
    cfg: Config  # the run's config (model section as trained)
    run_dir: Path
    step_dir: Path
    meta: dict[str, Any]  # the checkpoint's meta.json

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, verified step directory) for a run or a step directory."""
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path} does not exist: give a run directory (train.run_dir) or one "
                           f"of its checkpoints (RUN_DIR/checkpoints/stepN)")
    if (path / RUN_CONFIG).is_file():
        run_dir = path
        cfg = load_config_of(run_dir)
        root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        found = complete_checkpoints(root)
        if not found:
            raise HarnessError(f"{run_dir} has no complete checkpoint in {root}: train it (the "
                               f"same `harness train` resumes it) or name a step directory")
        step_dir = found[-1]
    else:
        step_dir = path
        run_dir = _run_dir_of(step_dir)
    if not (step_dir / META).is_file():
        raise HarnessError(f"{step_dir} is not a complete checkpoint (no {META}: a save that was "
                           f"cut short, or not a step directory): name RUN_DIR or an intact "
                           f"RUN_DIR/checkpoints/stepN")
    problem, _ = _verify(step_dir, _Group())
    if problem is not None:
        raise HarnessError(f"{step_dir} is corrupt or incomplete ({problem}): name an intact "
                           f"checkpoint (RUN_DIR takes the newest complete one)")
    return run_dir, step_dir


def _run_dir_of(step_dir: Path) -> Path:
    for candidate in (step_dir.parent.parent, step_dir.parent):
        if (candidate / RUN_CONFIG).is_file():
            return candidate
    raise HarnessError(f"{step_dir}: no {RUN_CONFIG} in the run directory around it (looked in "
                       f"{step_dir.parent.parent} and {step_dir.parent}): give the run "
                       f"directory instead")


def load_config_of(run_dir: Path) -> Config:
    """The run's resolved config, as `harness train` wrote it."""
    return load_config(str(run_dir / RUN_CONFIG))


def tokenizer_path(cfg: Config, run_dir: Path) -> Path:
    """The sentencepiece model the run was trained with."""
    if cfg.data.tokenizer_model:
        return Path(cfg.data.tokenizer_model)
    path = Path(cfg.data.out_dir) / TOKENIZER_FILE
    if not path.is_file() and not path.is_absolute():  # a relative out_dir, seen from the run
        beside = run_dir.parent / path
        path = beside if beside.is_file() else path
    if not path.is_file():
        raise HarnessError(f"{path}: the run's tokenizer is missing (data.out_dir in "
                           f"{run_dir / RUN_CONFIG}); run from the directory the run was "
                           f"trained in, or restore {TOKENIZER_FILE} there")
    return path


def load_tokenizer(cfg: Config, run_dir: Path):
    from harness.data.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path(cfg, run_dir))


def load(path: str | Path) -> Loaded:
    """The model of a run or checkpoint, fp32 on the CPU in eval mode."""
    from harness.model import build_model

    run_dir, step_dir = find_checkpoint(path)
    cfg = load_config_of(run_dir)
    meta = json.loads((step_dir / META).read_text())
    torch.manual_seed(0)  # the random initial weights are all overwritten below
    model = build_model(cfg.model).float()
    state = state_dict(step_dir)
    _load_strict(model, state, step_dir)
    model.eval()
    return Loaded(model, cfg, run_dir, step_dir, meta)


def state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights by our parameter names, from any ZeRO stage and saving world size; at
    tensor parallelism each rank's shards (ds/mp_rank_NN_*) joined as AutoTP cut them."""
    tp = int(json.loads((step_dir / META).read_text()).get("tensor_parallel_size", 1))
    if tp == 1:
        return _mp_state_dict(step_dir, 0, tp)
    from harness.parallel.tensor_parallel import merge_shards

    return merge_shards([_mp_state_dict(step_dir, r, tp) for r in range(tp)])


def _mp_state_dict(step_dir: Path, mp: int, tp: int) -> dict[str, torch.Tensor]:
    """Tensor-parallel rank `mp`'s weights (all of them at tp 1), fp32."""
    ds_dir = step_dir / TAG
    name = MODEL_STATES.replace("00", f"{mp:02d}")
    files = [ds_dir / name, ds_dir / f"zero_pp_rank_0_{name}"]
    states_file = next((f for f in files if f.is_file()), None)
    if states_file is None:
        raise HarnessError(f"{ds_dir}: no {name}: not a harness checkpoint")
    saved = torch.load(states_file, map_location="cpu", weights_only=False)
    stage = int(((saved.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    module = saved.get("module") or {}
    if stage < 3 and module and all(t.dtype == torch.float32 for t in module.values()):
        return {k: v for k, v in module.items()}
    # bf16 at ZeRO 0-2 (BF16_Optimizer, ZeRO 1-2's optimizer) saves flat fp32 partitions that
    # zero_to_fp32 cannot read; ZeRO 3 names its files the same way, but zero_to_fp32 reads them
    bf16_files = sorted(ds_dir.glob(BF16_OPTIM.replace("00", f"{mp:02d}")), key=_rank_of)
    if bf16_files and stage < 3:
        return _bf16_fp32(bf16_files, saved)
    if stage == 0 or tp > 1:
        # ZeRO 0 keeps no fp32 master copy outside the optimizer; zero_to_fp32 reads one
        # tensor-parallel rank only: the trained low-precision weights, upcast
        log.info("%s: %s weights upcast to fp32 (no fp32 master copy read)", states_file.name,
                 next(iter(module.values())).dtype if module else "low-precision")
        return {k: v.float() for k, v in module.items()}
    return _zero_fp32(step_dir)


def _rank_of(path: Path) -> int:
    return int(path.name.split("_pp_rank_")[1].split("_")[0])


def _bf16_fp32(files: list[Path], saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a BF16_Optimizer checkpoint: per parameter group, each rank
    holds one contiguous partition of the flattened group (padded at its end only); joined
    in rank order and cut by the saved parameter shapes, in order, they are the parameters
    (the universal checkpoint's reading of the same files)."""
    parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
             ["single_partition_of_fp32_groups"] for f in files]
    out: dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(saved["param_shapes"]):
        flat = torch.cat([p[g] for p in parts])
        offset = 0
        for name, shape in shapes.items():
            n = int(torch.Size(shape).numel())
            out[name] = flat[offset:offset + n].view(shape).clone()
            offset += n
    for name, source in (saved.get("shared_params") or {}).items():  # the tied head
        out[name] = out[source]
    return out


def _zero_fp32(step_dir: Path) -> dict[str, torch.Tensor]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # file work: no device, no process group
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # it prints per-parameter progress
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=TAG)
    log.debug("zero_to_fp32 %s:\n%s", step_dir, chatter.getvalue())
    return {k: v.float() for k, v in state.items()}


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    wrong = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or wrong:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
                if unexpected else f"shape of {wrong[:3]}")
        raise HarnessError(f"{where}: the weights do not fit the model of the run's "
                           f"config.yaml ({what}): the config was changed after training?")
    with torch.no_grad():
        for name, tensor in ours.items():
            tensor.copy_(state[name])


def describe(loaded: Loaded) -> dict[str, Any]:
    """Where the weights came from, for JSON outputs."""
    return {"checkpoint": str(loaded.step_dir), "step": loaded.step,
            "arch": loaded.cfg.model.arch}


def final_metrics(run_dir: Path, step: Optional[int] = None) -> dict[str, Any]:
    """The last value of each metric in RUN_DIR/metrics.jsonl up to `step` (events skipped)."""
    from harness.common.jsonl import read_lines

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    last: dict[str, Any] = {}
    for record in read_lines(path):
        if "event" in record or (step is not None and record.get("step", 0) > step):
            continue
        last.update(record)
    return last
