"""The typed config: one dataclass per component, loaded from a YAML preset plus dotlist overrides.

Loading refuses, before any model is built and each as one HarnessError line naming the key:
unknown keys (with the nearest real ones), wrong types, a section set to a single value, YAML
that is not a mapping, unresolvable `${...}` interpolations, and values YAML would silently
fold across lines (harness/config/input.py reads and checks the raw input). Every section's own `validate()`
then range-checks its keys (finite numbers, bounds); the top-level `validate()` keeps the
checks that span sections.
`harness config` prints the resolved config, every key included.

The package holds one module per section (model, train, data, monitor, checkpoint, slurm,
wandb), the root schema that lists them (schema.py) and the raw-input checks (input.py). It is
the bottom layer: it imports nothing from the harness but harness.common.errors.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.common.errors import HarnessError, check_line
from harness.config.checkpoint import CheckpointConfig
from harness.config.data import DataConfig
from harness.config.input import (check_raw, explain, parse_override, preset_names, read_yaml,
                                  resolve_source, short)
from harness.config.model import ModelConfig, ffn_hidden
from harness.config.monitor import MonitorConfig
from harness.config.schema import Config
from harness.config.slurm import SlurmConfig
from harness.config.train import (ActivationCheckpointingConfig, ClipConfig, Fp16Config,
                                  OptimConfig, ParallelConfig, TrainConfig, ZeroConfig)
from harness.config.wandb import WandbConfig

# callers import the sections and the presets from here
__all__ = ["Config", "load_config", "to_yaml", "to_dict", "validate", "preset_names",
           "ModelConfig", "OptimConfig", "TrainConfig", "ClipConfig", "Fp16Config", "ZeroConfig",
           "ActivationCheckpointingConfig", "ParallelConfig", "DataConfig", "CheckpointConfig",
           "MonitorConfig", "SlurmConfig", "WandbConfig", "ffn_hidden"]


def load_config(source: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Preset name or YAML path, then `key=value` overrides; returns a validated Config."""
    merged = OmegaConf.structured(Config)
    path = resolve_source(source)
    raw = check_raw(read_yaml(path), str(path))
    try:
        merged = OmegaConf.merge(merged, OmegaConf.create(raw))
    except OmegaConfBaseException as err:
        raise explain(err, str(path), raw) from None
    for item in overrides or []:
        where = f"override '{short(item)}'"
        nested = check_raw(parse_override(item), where)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(nested))
        except OmegaConfBaseException as err:
            raise explain(err, where, nested) from None
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise explain(err, f"{path} + overrides" if overrides else str(path), raw) from None
    validate(cfg)
    t = cfg.train
    if t.grad_accum_dtype is None and t.precision != "fp32":  # what null means (TrainConfig)
        t.grad_accum_dtype = "fp32" if cfg.zero.stage >= 1 else t.precision
    if cfg.monitor.trend_after is None:  # the update norm rises by design until the LR peaks
        cfg.monitor.trend_after = cfg.optim.warmup_steps
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML that load_config reads back to the same Config. Lines are
    never wrapped: a long value stays on one line (a wrapped one would be refused as folded)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    try:
        from omegaconf._utils import get_omega_conf_dumper
    except ImportError:  # a future OmegaConf without it: its own dump, which may wrap
        return OmegaConf.to_yaml(OmegaConf.structured(cfg))
    return yaml.dump(container, default_flow_style=False, allow_unicode=True, sort_keys=False,
                     width=2**31 - 1, Dumper=get_omega_conf_dumper())


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


# ---- checks that span sections -------------------------------------------------------
def validate(cfg: Config) -> None:
    """Every section checks its own keys; then the combinations that span sections, each with
    the key that is wrong and how to fix it."""
    for f in fields(cfg):
        getattr(cfg, f.name).validate()
    _check_strings(cfg)
    _check_wandb_wait(cfg)
    m, o, t, ac = cfg.model, cfg.optim, cfg.train, cfg.activation_checkpointing
    if not o.warmup_steps <= t.max_steps:
        raise HarnessError(f"optim.warmup_steps={o.warmup_steps} must be between 0 and "
                           f"train.max_steps={t.max_steps}")
    if t.precision == "fp16" and cfg.clip.value is not None:
        raise HarnessError("clip.value cannot be combined with train.precision=fp16 (elementwise "
                           "clipping needs zero.stage=0, fp16 needs zero.stage>=1): use "
                           "train.precision=bf16, or clip.value=null")
    # DeepSpeed 0.19.8's ZeRO-0 fp16 optimizers (FP16_Optimizer with FusedAdam,
    # FP16_UnfusedOptimizer with torch_adam: engine._configure_fp16_optimizer) never read
    # fp16.hysteresis (each overflow halves the scale) and floor the scale at its minimum
    # instead of stopping; ZeRO 1-3 use its DynamicLossScaler, which does both (docs/gpu.md)
    if cfg.zero.stage == 0 and t.precision == "fp16":
        raise HarnessError("zero.stage=0 with train.precision=fp16 is refused (DeepSpeed's ZeRO-0 "
                           "fp16 optimizers ignore fp16.hysteresis): use zero.stage=1 (the same "
                           "gradient memory as stage 0)")
    # DeepSpeed 0.19.8 sums low-precision gradients in fp32 only inside its ZeRO optimizers
    if cfg.zero.stage == 0 and t.precision != "fp32" and t.grad_accum_dtype == "fp32":
        raise HarnessError(
            f"zero.stage=0 with train.precision={t.precision} cannot accumulate gradients in "
            f"fp32 (DeepSpeed does that only with ZeRO): use zero.stage=1 (same gradient "
            f"memory at stage 0 and 1), or train.grad_accum_dtype={t.precision} (or null, "
            f"which means it at stage 0)")
    if cfg.clip.value is not None and cfg.zero.stage != 0:
        raise HarnessError("clip.value (elementwise clipping) needs zero.stage=0: ZeRO shards "
                           "the gradients")
    # DeepSpeed's ZeRO-3 parameter hooks are compiler-disabled: torch.compile of a block breaks
    # at every submodule (harness/train/compile.py), its graphs a few ops each
    if t.compile and cfg.zero.stage == 3:
        raise HarnessError("train.compile cannot be combined with zero.stage=3 (DeepSpeed's "
                           "ZeRO-3 parameter hooks break the compiled graph at every layer, 12-19 "
                           "breaks per block): use zero.stage 0-2, or train.compile=false")
    key = "activation_checkpointing"
    if ac.number_checkpoints is not None and ac.number_checkpoints > m.n_layer:
        raise HarnessError(f"{key}.number_checkpoints={ac.number_checkpoints} must be between "
                           f"1 and model.n_layer={m.n_layer}")
    _check_tensor_parallel(cfg)
    if ac.policy == "every_k" and ac.every_k > m.n_layer:
        raise HarnessError(f"{key}.every_k={ac.every_k} exceeds model.n_layer={m.n_layer}: "
                           f"nothing is checkpointed")


def _check_tensor_parallel(cfg: Config) -> None:
    """What DeepSpeed's AutoTP cannot shard, or the harness has not tested, refused."""
    tp, m = cfg.parallel.tp_size, cfg.model
    if tp == 1:
        return
    name = ("tensor_parallel_size" if cfg.parallel.tensor_parallel_size != 1
            else "model_parallel_size")
    key = f"parallel.{name}={tp}"
    if m.n_head % tp:
        raise HarnessError(f"{key} must divide model.n_head={m.n_head} (each rank holds whole "
                           f"attention heads)")
    per_node = cfg.slurm.tasks_per_node
    if cfg.slurm.nodes > 1 and per_node % tp:
        # srun numbers ranks node by node (block distribution) and a group is tp consecutive
        # ranks: a group that crosses nodes would all-reduce every layer over the network
        raise HarnessError(f"{key} must divide the ranks per node ({per_node}, "
                           f"slurm.gpus_per_node) so each tensor-parallel group stays on one "
                           f"node")
    for line in cfg.slurm.extra_sbatch:
        if line.startswith("--distribution=") and not line.split("=", 1)[1].startswith("block"):
            raise HarnessError(f"slurm.extra_sbatch entry {line!r} numbers ranks across nodes, "
                               f"so {key}'s groups would span nodes: drop it (srun's default "
                               f"block distribution keeps each group on one node)")
    if cfg.zero.stage == 3:
        raise HarnessError(f"{key} needs zero.stage 0, 1 or 2 (DeepSpeed's AutoTP does not "
                           f"train with ZeRO 3)")
    # llama: wk/wv and w1/w3 are cut in tp equal parts, so each rank holds whole key/value
    # heads (with the query heads that share them) and an equal share of SwiGLU's columns
    if m.arch == "llama":
        kv = m.n_kv_head or m.n_head
        if kv % tp:
            raise HarnessError(f"{key} must divide model.n_kv_head={kv} (each rank holds whole "
                               f"key/value heads): choose a model.n_kv_head that {tp} divides")
        if ffn_hidden(m) % tp:
            raise HarnessError(f"{key} must divide model.ffn_hidden={ffn_hidden(m)} (each rank "
                               f"holds an equal share of the SwiGLU columns)")
    if m.qk_norm:
        # the per-head norm weights are shared by every rank's heads: their gradients would
        # need an all-reduce over the tensor-parallel group, which AutoTP does not do
        raise HarnessError(f"{key} cannot be combined with model.qk_norm (its norms act on "
                           f"sharded heads; not yet supported): set model.qk_norm=false")
    if cfg.train.compile:
        raise HarnessError(f"{key} cannot be combined with train.compile (not yet tested "
                           f"with AutoTP): set train.compile=false")


def _check_strings(cfg: Config) -> None:
    """Every string value in every section, list items included, is one printable line:
    a newline or control character in a path, name or pattern is never meant."""
    for section in fields(cfg):
        obj = getattr(cfg, section.name)
        for f in fields(obj):
            value = getattr(obj, f.name)
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, str):
                    suffix = f"[{i}]" if isinstance(value, list) else ""
                    check_line(f"{section.name}.{f.name}{suffix}", item, empty_ok=True)


def _check_wandb_wait(cfg: Config) -> None:
    """Rank 0 waits for the W&B server (up to wandb.init_timeout_s, then starts offline) while
    the other ranks already sit in the first step's collective: the wait must end well inside
    that collective's timeout."""
    wait, limit = cfg.wandb.init_timeout_s, cfg.parallel.collective_timeout_s
    if cfg.wandb.resolved_mode() == "online" and wait > limit / 2:
        raise HarnessError(f"wandb.init_timeout_s={wait:g} must be at most half of "
                           f"parallel.collective_timeout_s={limit:g}: the other ranks wait in "
                           f"their first collective while rank 0 waits for W&B (and then starts "
                           f"offline); lower wandb.init_timeout_s or raise "
                           f"parallel.collective_timeout_s")
