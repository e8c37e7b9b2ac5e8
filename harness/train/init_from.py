"""model.init_from=HF_DIR: a new run starts from the weights of a Hugging Face directory
(`harness export --to hf`, or a GPT-2 / Llama checkpoint of the same shape).

Called by harness.train.engine.build on the freshly built model, before DeepSpeed wraps it (so
ZeRO 3 partitions, and bf16 casts, the loaded values). A run that resumes a checkpoint ignores
it: the checkpoint holds the trained weights, and the directory may be long gone by a requeue.
Reads config.json and the weights with safetensors (or torch for pytorch_model.bin): no
transformers needed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from harness.checkpoint.resume import resumed_run_dir
from harness.common.errors import HarnessError
from harness.config import Config
from harness.model.hf_format import from_hf, shape_mismatch

log = logging.getLogger("harness")
KEY = "model.init_from"


def maybe_init(model: nn.Module, cfg: Config) -> None:
    """Load cfg.model.init_from into `model` unless this start resumes a checkpoint."""
    if not cfg.model.init_from:
        return
    if resumed_run_dir(cfg) is not None:
        log.info("%s=%s ignored: this run resumes its checkpoint", KEY, cfg.model.init_from)
        return
    load_into(model, cfg)
    log.info("initial weights from %s", cfg.model.init_from)


def load_into(model: nn.Module, cfg: Config) -> None:
    where = cfg.model.init_from
    hf_cfg = read_config(Path(where))
    mismatch = shape_mismatch(hf_cfg, cfg.model)
    if mismatch is not None:
        raise HarnessError(f"{KEY}={where} does not fit this model ({mismatch}): set the model "
                           f"section to the directory's shape, or init from another directory")
    if cfg.model.arch == "gpt2" and hf_cfg.get("activation_function", "gelu") != "gelu":
        log.warning("%s=%s uses activation %r; our GPT uses the exact GELU: the loaded model "
                    "computes a slightly different function", KEY, where,
                    hf_cfg.get("activation_function"))
    state = from_hf(read_weights(Path(where)), cfg.model, where)
    ours = model.state_dict()
    for name, tensor in ours.items():
        if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
            got = tuple(state[name].shape) if name in state else "nothing"
            raise HarnessError(f"{KEY}={where}: {name} is {got}, the model wants "
                               f"{tuple(tensor.shape)}: set the model section to its shape")
    with torch.no_grad():
        for name, tensor in ours.items():
            tensor.copy_(state[name])


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise HarnessError(f"{KEY}={path}: no config.json there: point it at a directory "
                           f"written by `harness export --to hf` (or a Hugging Face model)")
    try:
        hf_cfg = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise HarnessError(f"{KEY}={path}: config.json is unreadable "
                           f"({type(err).__name__}): re-export the model") from None
    if not isinstance(hf_cfg, dict):
        raise HarnessError(f"{KEY}={path}: config.json is not a JSON object: re-export it")
    return hf_cfg


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, its sharded form (model.safetensors.index.json), or
    pytorch_model.bin."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise HarnessError(f"{KEY}={path}: no model.safetensors (or pytorch_model.bin) there: "
                       f"export the weights with `harness export --to hf`")
