"""The typed config: one dataclass per component, loaded from a YAML preset plus dotlist overrides.

OmegaConf's structured mode rejects unknown keys and wrong types; `validate()` rejects
impossible combinations. Both happen before any model is built and surface as HarnessError.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.callbacks.wandb_logger import WandbConfig
from harness.checkpoint import CheckpointConfig
from harness.data.config import DataConfig
from harness.errors import HarnessError
from harness.monitor.config import MonitorConfig
from harness.slurm import SlurmConfig

PRESET_DIR = Path(__file__).parent / "presets"

AC_POLICIES = ("none", "every_layer", "every_k", "count", "sqrt", "attention", "mlp")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    block_size: int = 64  # sequence length
    vocab_size: int = 256
    dropout: float = 0.0
    bias: bool = True
    init_std: float = 0.02


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak LR at `base_global_batch` when lr_scaling is on
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # linear scaling rule (Goyal et al.): lr * global_batch / base_global_batch
    lr_scaling: bool = False
    base_global_batch: int = 0
    # None: torch.optim.AdamW everywhere (fused kernel on GPU): nothing is JIT-compiled at
    # start; false asks for DeepSpeed's FusedAdam, built on first use on every node (nvcc)
    torch_adam: Optional[bool] = None


@dataclass
class TrainConfig:
    # any two of the three determine the third, given the data-parallel world size
    global_batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    grad_accum_steps: Optional[int] = None
    max_steps: int = 100
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 | fp16 (dynamic loss scale)
    run_dir: str = "runs/default"
    log_every: int = 10  # console line cadence when stdout is not a terminal
    device: str = "auto"  # auto | cpu | cuda
    # under bf16/fp16: the dtype micro-batch gradients are summed in, and the dtype of the
    # gradient all-reduce; fp32 as in Megatron, torchtitan and OLMo-core, or the precision's own
    grad_accum_dtype: str = "fp32"
    reduce_dtype: str = "fp32"


@dataclass
class ClipConfig:
    max_norm: float = 1.0  # global L2 norm; 0 disables norm clipping
    value: Optional[float] = None  # elementwise clamp of the accumulated gradient (ZeRO 0)


@dataclass
class Fp16Config:
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0


@dataclass
class ZeroConfig:
    stage: int = 0
    offload_optimizer: bool = False  # optimizer states and step on the CPU (stage >= 1)
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000


@dataclass
class ActivationCheckpointingConfig:
    # none | every_layer | every_k (every k-th block) | count (number_checkpoints segments)
    # | sqrt (round(sqrt(n_layer)) segments) | attention | mlp (only that sub-block)
    policy: str = "none"
    every_k: int = 2
    number_checkpoints: Optional[int] = None
    partition_activations: bool = False
    cpu_checkpointing: bool = False
    contiguous_memory_optimization: bool = False
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False


@dataclass
class ParallelConfig:
    # tensor parallelism is not implemented; kept so partition_activations can be judged
    model_parallel_size: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    fp16: Fp16Config = field(default_factory=Fp16Config)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve_source(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise HarnessError(f"config file {name_or_path} not found: pass a preset "
                               f"({', '.join(preset_names())}) or an existing YAML file")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise HarnessError(f"unknown preset '{name_or_path}': choose one of "
                           f"{', '.join(preset_names())} or pass a YAML file")
    return preset


def _explain(err: OmegaConfBaseException, where: str) -> HarnessError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return HarnessError(f"{where}: unknown key '{key}': check the spelling "
                            f"(`harness ds-config --show-config` lists every key)")
    return HarnessError(f"{where}: bad value for '{key}': {msg}")


def load_config(source: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Preset name or YAML path, then `key=value` overrides; returns a validated Config."""
    schema = OmegaConf.structured(Config)
    path = _resolve_source(source)
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: one line, not a traceback
        raise HarnessError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    try:
        merged = OmegaConf.merge(schema, file_cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, str(path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise HarnessError(f"override '{item}' is not key=value (e.g. train.micro_batch_size=4)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    if cfg.monitor.trend_after is None:  # the update norm rises by design until the LR peaks
        cfg.monitor.trend_after = cfg.optim.warmup_steps
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise HarnessError(message)


def validate(cfg: Config) -> None:
    """Impossible combinations, each with the key that is wrong and how to fix it."""
    m, o, t, ac = cfg.model, cfg.optim, cfg.train, cfg.activation_checkpointing
    for key in ("n_layer", "n_head", "d_model", "block_size", "vocab_size"):
        _require(getattr(m, key) > 0, f"model.{key} must be > 0")
    _require(m.d_model % m.n_head == 0,
             f"model.d_model={m.d_model} must be divisible by model.n_head={m.n_head}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)")
    _require(o.lr > 0, "optim.lr must be > 0")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
    _require(t.max_steps > 0, "train.max_steps must be > 0")
    _require(0 <= o.warmup_steps <= t.max_steps,
             f"optim.warmup_steps={o.warmup_steps} must be between 0 and train.max_steps={t.max_steps}")
    _require(not o.lr_scaling or o.base_global_batch > 0,
             "optim.lr_scaling needs optim.base_global_batch > 0 (the batch size optim.lr was tuned for)")
    _require(t.precision in PRECISIONS,
             f"train.precision='{t.precision}' is not one of {', '.join(PRECISIONS)}")
    _require(t.device in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda")
    _validate_dtypes(t, cfg.zero.stage)
    _require(cfg.clip.max_norm >= 0, "clip.max_norm must be >= 0 (0 disables clipping)")
    _require(cfg.clip.value is None or cfg.clip.value > 0, "clip.value must be > 0 or null")
    _require(cfg.clip.value is None or cfg.zero.stage == 0,
             "clip.value (elementwise clipping) needs zero.stage=0: ZeRO shards the gradients")
    _require(cfg.zero.stage in (0, 1, 2, 3), f"zero.stage={cfg.zero.stage} must be 0, 1, 2 or 3")
    _require(not cfg.zero.offload_optimizer or cfg.zero.stage >= 1,
             "zero.offload_optimizer needs zero.stage >= 1")
    _require(cfg.parallel.model_parallel_size == 1,
             "parallel.model_parallel_size must be 1: tensor parallelism is not implemented")
    _validate_checkpointing(ac, m.n_layer)
    for section in (cfg.data, cfg.checkpoint, cfg.monitor, cfg.slurm, cfg.wandb):
        section.validate()  # each component checks its own keys


def _validate_dtypes(t: TrainConfig, stage: int) -> None:
    for key in ("grad_accum_dtype", "reduce_dtype"):
        value = getattr(t, key)
        _require(value in ("fp32", t.precision) or t.precision == "fp32" and value in PRECISIONS,
                 f"train.{key}={value} must be fp32 or train.precision ({t.precision})")
    # DeepSpeed 0.19.8 sums low-precision gradients in fp32 only inside its ZeRO optimizers
    _require(not (stage == 0 and t.precision != "fp32" and t.grad_accum_dtype == "fp32"),
             f"zero.stage=0 with train.precision={t.precision} cannot accumulate gradients in "
             f"fp32 (DeepSpeed does that only with ZeRO): use zero.stage=1 (same gradient "
             f"memory at stage 0 and 1), or train.grad_accum_dtype={t.precision}")


def _validate_checkpointing(ac: ActivationCheckpointingConfig, n_layer: int) -> None:
    key = "activation_checkpointing"
    _require(ac.policy in AC_POLICIES,
             f"{key}.policy='{ac.policy}' is not one of {', '.join(AC_POLICIES)}")
    _require(ac.every_k >= 1, f"{key}.every_k must be >= 1")
    if ac.policy == "count":
        _require(ac.number_checkpoints is not None,
                 f"{key}.policy=count needs {key}.number_checkpoints (or use policy=sqrt)")
    if ac.number_checkpoints is not None:
        _require(1 <= ac.number_checkpoints <= n_layer,
                 f"{key}.number_checkpoints={ac.number_checkpoints} must be between 1 and "
                 f"model.n_layer={n_layer}")
        _require(ac.policy == "count",
                 f"{key}.number_checkpoints is only used with {key}.policy=count")
    off = ac.policy == "none"
    for flag in ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
                 "synchronize_checkpoint_boundary", "profile"):
        _require(not (off and getattr(ac, flag)),
                 f"{key}.{flag} does nothing with {key}.policy=none: choose a policy")
    # DeepSpeed crashes in the backward recompute on this combination
    _require(not ac.cpu_checkpointing or ac.partition_activations,
             f"{key}.cpu_checkpointing needs {key}.partition_activations=true")
