"""optim.*, train.*, clip.*, fp16.*, zero.*, activation_checkpointing.*, parallel.*: how the
model is trained, each section with its own range checks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from harness.common.errors import HarnessError, check_line, check_number

AC_POLICIES = ("none", "every_layer", "every_k", "count", "sqrt", "attention", "mlp")
PRECISIONS = ("fp32", "bf16", "fp16")
MAX_COUNT = 2**31 - 1  # batch sizes, steps and other counts (DeepSpeed and torch use int32)
MAX_SEED = 2**32 - 1  # numpy's RandomState takes seeds below 2**32


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
    # None: torch.optim.AdamW everywhere (its fused kernel on a GPU, and on the CPU under
    # zero.offload_optimizer): nothing is JIT-compiled at start; false asks for DeepSpeed's
    # FusedAdam (CPU Adam under offload), built on first use on every node (nvcc)
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
    # gradient all-reduce; fp32 as in Megatron, torchtitan and OLMo-core, or the precision's own.
    # grad_accum_dtype null: fp32 at zero.stage >= 1, the precision's own at stage 0 (DeepSpeed
    # 0.19.8 sums low-precision gradients in fp32 only inside its ZeRO optimizers), resolved by
    # load_config, so that train.precision=bf16 works on every preset as given
    grad_accum_dtype: Optional[str] = None
    reduce_dtype: str = "fp32"
    # a train.run_dir that holds a run this config cannot continue (another config, another
    # model, checkpoint.resume=never) or files of the user's: move the old run's files to
    # RUN_DIR/replaced-TIME/ (nothing deleted) and start anew; a run it continues is continued
    overwrite: bool = False
    # PaLM's z-loss: z_loss x mean log(Z)^2 added to the training loss (1e-4 in PaLM and
    # OLMo 2); train/z_loss logs mean log(Z)^2 every step, whatever the coefficient
    z_loss: float = 0.0
    # cross-entropy over this many tokens at a time, gradients made in the forward, so the
    # micro-batch's fp32 logits (tokens x vocab x 4 B) are never all held; 0 = full logits
    loss_chunk_tokens: int = 0
    # torch.compile of the model (DeepSpeed's engine.compile()) and of each transformer block,
    # so checkpointed blocks run compiled too (harness/train/compile.py); ZeRO 0-2
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
            if value is None and key == "grad_accum_dtype":
                continue
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
    # gradient reduction overlapped with the backward (stage >= 1); null: on on a GPU, off on
    # a CPU (harness.train.ds_config.overlap_comm); ZeRO 1/2 then hold two reduce buckets
    overlap_comm: Optional[bool] = None
    reduce_bucket_size: int = 50_000_000  # elements per gradient bucket (stage >= 1)

    def validate(self) -> None:
        if isinstance(self.stage, bool) or self.stage not in (0, 1, 2, 3):
            raise HarnessError(f"zero.stage={self.stage} must be 0, 1, 2 or 3")
        if not isinstance(self.overlap_comm, (bool, type(None))):
            raise HarnessError(f"zero.overlap_comm={self.overlap_comm!r} must be true, false or "
                               f"null (null: on on a GPU, off on a CPU)")
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
    # many consecutive ranks; world = tensor_parallel_size x data-parallel size
    # (harness/parallel/batch.py)
    tensor_parallel_size: int = 1
    # the older name of tensor_parallel_size (Megatron's): either may be set, not both apart
    model_parallel_size: int = 1
    # the longest a collective waits for the other ranks before this rank gives up on them
    # (harness/parallel/peers.py names the rank that went away). The longest legitimate wait is a
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
