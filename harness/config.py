"""The typed config: one dataclass per component, loaded from a YAML preset plus dotlist overrides.

Loading refuses, before any model is built and each as one HarnessError line naming the key:
unknown keys (with the nearest real ones), wrong types, a section set to a single value, YAML
that is not a mapping, unresolvable `${...}` interpolations, and values YAML would silently
fold across lines (harness/config_input.py reads and checks the raw input). Every section's own `validate()` then range-checks its keys (finite
numbers, bounds); the top-level `validate()` keeps the checks that span sections.
`harness config` prints the resolved config, every key included.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.callbacks.wandb_logger import WandbConfig
from harness.checkpoint import CheckpointConfig
# preset_names is re-exported: callers ask the config module for the presets
from harness.config_input import (check_raw, explain, parse_override, preset_names,  # noqa: F401
                                  read_yaml, resolve_source, short)
from harness.data.config import DataConfig
from harness.errors import HarnessError, check_line, check_number
from harness.monitor.config import MonitorConfig
from harness.slurm import SlurmConfig

ARCHS = ("gpt2", "llama")
AC_POLICIES = ("none", "every_layer", "every_k", "count", "sqrt", "attention", "mlp")
PRECISIONS = ("fp32", "bf16", "fp16")
MAX_COUNT = 2**31 - 1  # batch sizes, steps and other counts (DeepSpeed and torch use int32)
MAX_SEED = 2**32 - 1  # numpy's RandomState takes seeds below 2**32


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
    # gpt2: harness/model.py (LayerNorm, learned positions, GELU MLP, tied head); llama:
    # harness/llama.py (RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases:
    # model.bias is unused there)
    arch: str = "gpt2"
    n_kv_head: Optional[int] = None  # llama: key/value heads (null = n_head); divides n_head
    rope_theta: float = 10000.0  # llama: rotary base
    tie_embeddings: bool = True  # llama: the output head shares the token embedding
    # llama: SwiGLU hidden width; null = int(8 d / 3) rounded up to a multiple of 256 (Llama's)
    ffn_hidden: Optional[int] = None
    # LayerNorm (gpt2) / RMSNorm (llama) over each head's queries and keys before attention
    # (Wortsman et al. 2023; OLMo 2): bounds the attention logits' growth
    qk_norm: bool = False
    # a Hugging Face directory from `harness export --to hf` (or a GPT-2 / Llama checkpoint of
    # this shape): the initial weights of a new run; a run that resumes ignores it
    init_from: Optional[str] = None

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise HarnessError(f"model.arch={self.arch!r} is not one of {', '.join(ARCHS)}")
        for key, high in (("n_layer", 4096), ("n_head", 4096), ("d_model", 2**20),
                          ("block_size", 2**24), ("vocab_size", 2**24)):
            check_number(f"model.{key}", getattr(self, key), 1, high, integer=True)
        if self.d_model % self.n_head:
            raise HarnessError(f"model.d_model={self.d_model} must be divisible by "
                               f"model.n_head={self.n_head}")
        check_number("model.dropout", self.dropout, 0, 1, high_open=True, fix="e.g. 0.0 or 0.1")
        check_number("model.init_std", self.init_std, 0, 1, low_open=True, fix="e.g. 0.02")
        check_number("model.n_kv_head", self.n_kv_head, 1, 4096, integer=True, none_ok=True,
                     fix="null uses model.n_head")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise HarnessError(f"model.n_kv_head={self.n_kv_head} must divide "
                               f"model.n_head={self.n_head}")
        check_number("model.rope_theta", self.rope_theta, 0, 1e12, low_open=True,
                     fix="e.g. 10000.0")
        check_number("model.ffn_hidden", self.ffn_hidden, 1, 2**22, integer=True, none_ok=True,
                     fix="null uses int(8 d / 3) rounded up to a multiple of 256")
        if self.init_from is not None:
            check_line("model.init_from", self.init_from,
                       fix="set it to a Hugging Face model directory, or null")
        if self.arch == "gpt2":
            for key, unset in (("n_kv_head", None), ("ffn_hidden", None),
                               ("tie_embeddings", True)):
                if getattr(self, key) != unset:
                    raise HarnessError(f"model.{key}={getattr(self, key)} needs model.arch=llama "
                                       f"(gpt2 has no such setting): set model.arch=llama or "
                                       f"remove model.{key}")


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

    def validate(self) -> None:
        check_number("optim.lr", self.lr, 0, 1, low_open=True, fix="e.g. optim.lr=3e-4")
        check_number("optim.min_lr_ratio", self.min_lr_ratio, 0, 1, fix="e.g. 0.1")
        check_number("optim.warmup_steps", self.warmup_steps, 0, MAX_COUNT, integer=True)
        check_number("optim.weight_decay", self.weight_decay, 0, fix="e.g. 0.1; 0 turns it off")
        if self.lr * self.weight_decay >= 1:
            raise HarnessError(f"optim.weight_decay={self.weight_decay} x optim.lr={self.lr} "
                               f"must be < 1 (AdamW scales the weights by 1 - lr x weight_decay "
                               f"every step): lower optim.weight_decay, e.g. 0.1")
        for key, usual in (("beta1", 0.9), ("beta2", 0.95)):
            check_number(f"optim.{key}", getattr(self, key), 0, 1, high_open=True,
                         fix=f"e.g. {usual}")
        check_number("optim.eps", self.eps, 0, 1, low_open=True, high_open=True, fix="e.g. 1e-8")
        check_number("optim.base_global_batch", self.base_global_batch, 0, MAX_COUNT,
                     integer=True)
        if self.lr_scaling and self.base_global_batch < 1:
            raise HarnessError("optim.lr_scaling needs optim.base_global_batch > 0 "
                               "(the batch size optim.lr was tuned for)")


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
    # a train.run_dir that holds another run, or files of the user's: move the old run's files
    # to RUN_DIR/replaced-TIME/ (nothing deleted) and start anew; refused otherwise
    overwrite: bool = False
    # PaLM's z-loss: z_loss x mean log(Z)^2 added to the training loss (1e-4 in PaLM and
    # OLMo 2); train/z_loss logs mean log(Z)^2 every step, whatever the coefficient
    z_loss: float = 0.0
    # cross-entropy over this many tokens at a time, gradients made in the forward, so the
    # micro-batch's fp32 logits (tokens x vocab x 4 B) are never all held; 0 = full logits
    loss_chunk_tokens: int = 0
    # torch.compile of the model through DeepSpeed's engine.compile()
    compile: bool = False

    def validate(self) -> None:
        for key in ("global_batch_size", "micro_batch_size", "grad_accum_steps"):
            check_number(f"train.{key}", getattr(self, key), 1, MAX_COUNT, integer=True,
                         none_ok=True)
        check_number("train.max_steps", self.max_steps, 1, MAX_COUNT, integer=True)
        check_number("train.seed", self.seed, 0, MAX_SEED, integer=True)
        check_number("train.log_every", self.log_every, 1, MAX_COUNT, integer=True)
        check_line("train.run_dir", self.run_dir, fix="set train.run_dir to a directory path")
        if not self.run_dir.strip():
            raise HarnessError(f"train.run_dir={self.run_dir!r} is blank: set it to a "
                               f"directory path, e.g. runs/mine")
        if self.precision not in PRECISIONS:
            raise HarnessError(f"train.precision='{self.precision}' is not one of "
                               f"{', '.join(PRECISIONS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise HarnessError(f"train.device='{self.device}' must be auto, cpu or cuda")
        check_number("train.z_loss", self.z_loss, 0, 1, fix="e.g. 1e-4; 0 turns it off")
        check_number("train.loss_chunk_tokens", self.loss_chunk_tokens, 0, 2**24, integer=True,
                     fix="e.g. 4096; 0 computes the full logits")
        for key in ("grad_accum_dtype", "reduce_dtype"):
            value = getattr(self, key)
            if not (value in ("fp32", self.precision)
                    or self.precision == "fp32" and value in PRECISIONS):
                raise HarnessError(f"train.{key}={value} must be fp32 or train.precision "
                                   f"({self.precision})")


@dataclass
class ClipConfig:
    max_norm: float = 1.0  # global L2 norm; 0 disables norm clipping
    value: Optional[float] = None  # elementwise clamp of the accumulated gradient (ZeRO 0)

    def validate(self) -> None:
        check_number("clip.max_norm", self.max_norm, 0, fix="e.g. 1.0; 0 disables clipping")
        check_number("clip.value", self.value, 0, low_open=True, none_ok=True,
                     fix="null turns elementwise clipping off")


@dataclass
class Fp16Config:
    initial_scale_power: int = 16  # the loss scale starts at 2**initial_scale_power
    loss_scale_window: int = 1000  # steps without overflow before the scale doubles
    hysteresis: int = 2  # overflows tolerated before the scale halves
    min_loss_scale: float = 1.0

    def validate(self) -> None:
        # each power too many costs one skipped step while the scale halves down
        check_number("fp16.initial_scale_power", self.initial_scale_power, 0, 32, integer=True,
                     fix="DeepSpeed's default is 16")
        check_number("fp16.loss_scale_window", self.loss_scale_window, 1, MAX_COUNT,
                     integer=True, fix="e.g. 1000")
        check_number("fp16.hysteresis", self.hysteresis, 1, MAX_COUNT, integer=True,
                     fix="e.g. 2")
        check_number("fp16.min_loss_scale", self.min_loss_scale, 0, 2.0**self.initial_scale_power,
                     low_open=True, fix="at most the initial scale 2**fp16.initial_scale_power; "
                                        "e.g. 1")


@dataclass
class ZeroConfig:
    stage: int = 0
    offload_optimizer: bool = False  # optimizer states and step on the CPU (stage >= 1)
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000  # elements per gradient bucket (stage >= 1)

    def validate(self) -> None:
        if isinstance(self.stage, bool) or self.stage not in (0, 1, 2, 3):
            raise HarnessError(f"zero.stage={self.stage} must be 0, 1, 2 or 3")
        check_number("zero.reduce_bucket_size", self.reduce_bucket_size, 1, 10**10,
                     integer=True, fix="e.g. 50000000 (elements per bucket)")
        if self.offload_optimizer and self.stage < 1:
            raise HarnessError("zero.offload_optimizer needs zero.stage >= 1")


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

    def validate(self) -> None:
        key = "activation_checkpointing"
        if self.policy not in AC_POLICIES:
            raise HarnessError(f"{key}.policy='{self.policy}' is not one of "
                               f"{', '.join(AC_POLICIES)}")
        check_number(f"{key}.every_k", self.every_k, 1, MAX_COUNT, integer=True)
        check_number(f"{key}.number_checkpoints", self.number_checkpoints, 1, MAX_COUNT,
                     integer=True, none_ok=True)
        if self.policy == "count" and self.number_checkpoints is None:
            raise HarnessError(f"{key}.policy=count needs {key}.number_checkpoints "
                               f"(or use policy=sqrt)")
        if self.number_checkpoints is not None and self.policy != "count":
            raise HarnessError(f"{key}.number_checkpoints is only used with {key}.policy=count")
        for flag in ("partition_activations", "cpu_checkpointing",
                     "contiguous_memory_optimization", "synchronize_checkpoint_boundary",
                     "profile"):
            if self.policy == "none" and getattr(self, flag):
                raise HarnessError(f"{key}.{flag} does nothing with {key}.policy=none: "
                                   f"choose a policy")
        # DeepSpeed crashes in the backward recompute on this combination
        if self.cpu_checkpointing and not self.partition_activations:
            raise HarnessError(f"{key}.cpu_checkpointing needs {key}.partition_activations=true")


@dataclass
class ParallelConfig:
    # tensor parallelism: DeepSpeed's AutoTP shards attention (heads) and the MLP across this
    # many consecutive ranks; world = tensor_parallel_size x data-parallel size (harness/plan.py)
    tensor_parallel_size: int = 1
    # the older name of tensor_parallel_size (Megatron's): either may be set, not both apart
    model_parallel_size: int = 1
    # the longest a collective waits for the other ranks before this rank gives up on them
    # (harness/peers.py names the rank that went away). The longest legitimate wait is a
    # checkpoint save and its verification, or a resume's reshard, on a slow filesystem:
    # 10 minutes is DeepSpeed's and NCCL's own default; raise it for checkpoints of many GB
    collective_timeout_s: float = 600.0

    def validate(self) -> None:
        for key in ("tensor_parallel_size", "model_parallel_size"):
            check_number(f"parallel.{key}", getattr(self, key), 1, 4096, integer=True,
                         fix="e.g. 2 (ranks per tensor-parallel group); 1 turns it off")
        check_number("parallel.collective_timeout_s", self.collective_timeout_s, 5, 86400,
                     fix="seconds a collective waits for the other ranks, e.g. 600; more than "
                         "the longest checkpoint save on your filesystem")
        if 1 != self.model_parallel_size != self.tensor_parallel_size != 1:
            raise HarnessError(f"parallel.model_parallel_size={self.model_parallel_size} and "
                               f"parallel.tensor_parallel_size={self.tensor_parallel_size} "
                               f"differ: set only parallel.tensor_parallel_size")

    @property
    def tp_size(self) -> int:
        """Ranks per tensor-parallel group, from either key."""
        return max(self.tensor_parallel_size, self.model_parallel_size)


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
    m, o, t, ac = cfg.model, cfg.optim, cfg.train, cfg.activation_checkpointing
    if not o.warmup_steps <= t.max_steps:
        raise HarnessError(f"optim.warmup_steps={o.warmup_steps} must be between 0 and "
                           f"train.max_steps={t.max_steps}")
    # DeepSpeed 0.19.8 sums low-precision gradients in fp32 only inside its ZeRO optimizers
    if cfg.zero.stage == 0 and t.precision != "fp32" and t.grad_accum_dtype == "fp32":
        raise HarnessError(
            f"zero.stage=0 with train.precision={t.precision} cannot accumulate gradients in "
            f"fp32 (DeepSpeed does that only with ZeRO): use zero.stage=1 (same gradient "
            f"memory at stage 0 and 1), or train.grad_accum_dtype={t.precision}")
    if cfg.clip.value is not None and cfg.zero.stage != 0:
        raise HarnessError("clip.value (elementwise clipping) needs zero.stage=0: ZeRO shards "
                           "the gradients")
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
        from harness.llama import ffn_hidden  # (harness.llama imports this module)

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
