"""Step time per rank from the shapes, the layout and the hardware: `harness plan`'s throughput
model (issue 27). Pure arithmetic, no torch, no timing on this machine: the same inputs give the
same seconds on every run. Calibrated on published runs (bench/bench_throughput_model.py,
bench/data/published_throughput.yaml); the three constants below are its fit.

One optimizer step = `grad_accum` micro-steps of M = micro batch x sequence tokens, then the
gradient exchange that waits for the last backward, the optimizer step and the norm pass:

compute (per micro-step): every GEMM of a layer, forward and its two backward GEMMs, at
    2 M N K FLOPs and an achievable fraction of the dense peak that depends on the shape:
        time = 2 M N K / (peak x E_MAX) x (1 + SHAPE_DIM x (1/M + 1/N + 1/K))
    (a large GEMM approaches E_MAX; a dimension near SHAPE_DIM - small d_model, small micro
    batch, a dimension cut by tensor parallelism - costs as much again: tile quantisation,
    operand traffic and launch latency grow relative to the arithmetic). Attention runs as
    FlashAttention: causal, so half of the 12 L d T FLOPs per token the MFU convention counts,
    at the GPU's attention_fraction of peak (hardware.yaml: FlashAttention-2's measured share
    on A100 and on Hopper). Recompute (the checkpointing policy's share of extra FLOPs,
    harness.plan.planner.recompute_share) adds its share of all of this.
memory-bound (per micro-step): norms, residual adds, activation functions, dropout and bias
    passes, ELEMENTWISE_BYTES x d_model bytes per token per layer, and the loss's passes over
    the logits, LOGIT_BYTES per logit, at HBM_FRACTION of the memory bandwidth.
tensor parallelism (per micro-step): 4 ring all-reduces of M x d_model activations per layer
    (2 forward, 2 backward; 2 more per recomputed layer), 2 (tp-1)/tp of the bytes each way, over
    the intra-node link, not overlapped (DeepSpeed AutoTP and Megatron-LM 2021 run them in line).
ZeRO (per step, ring collectives over the data-parallel group, at COMM_EFF of the link's one-way
    bandwidth; once the group leaves a node, the NICs its members on a node share, up to the
    intra-node link: data_parallel_bandwidth):
    0: all-reduce of the gradients, 2 (dp-1)/dp x bytes, after the last backward (DeepSpeed's
       engine reduces at the accumulation boundary): exposed.
    1: reduce-scatter of the gradients in the last micro-step's backward (DeepSpeed 0.19.8's
       stage_1_and_2.py reduces from the backward hooks at the accumulation boundary when
       overlap_comm is on; only what exceeds that backward is exposed; after it without) +
       all-gather of the updated parameters after the step, (dp-1)/dp each.
    2: reduce-scatter after EVERY micro-step's backward, overlapped with that backward
       (overlap_comm: only what exceeds the backward is exposed) + the all-gather after the step.
    3: per micro-step, all-gather of the parameters for the forward and again for the backward,
       reduce-scatter of the gradients, prefetched under the micro-step's compute: what exceeds
       the compute, plus the first layer's gather, is exposed.
optimizer (per step): Adam on this rank's shard, OPTIMIZER_BYTES per parameter (fp32 master,
    m, v read and written, the gradient read, the 16-bit copy written), and the norm pass
    (the gradient clipping's and the monitor's reads of the gradients), NORM_BYTES per
    parameter: memory-bound.
host (per micro-step): a fixed cost the caller states (launches, DeepSpeed's hooks, the
    harness's monitor): 0 for the published runs, harness.plan.speed.MICRO_STEP_OVERHEAD_S for
    the harness.

The limiter is the largest of compute, memory traffic, intra-node communication, inter-node
communication and host time. Not modelled: pipeline parallelism, data loading, evaluation and
checkpoint saves, stragglers, thermal or power limits.
"""
from __future__ import annotations

from dataclasses import dataclass

# The fit (bench/bench_throughput_model.py on the FIT points of
# bench/data/published_throughput.yaml; rerun it after changing any fixed constant below or
# the data, and copy its result here and into HELD_OUT_ERROR).
E_MAX = 0.57  # fraction of the dense peak a large 16-bit GEMM sustains
SHAPE_DIM = 144.0  # GEMM dimension (elements) at which the shape doubles a GEMM's time
COMM_EFF = 1.00  # fraction of a link's one-way bandwidth a ring collective achieves (the
# grid's top: the FIT runs show no loss against the data-sheet rates)
# |error| of tokens/s per GPU on the 7 HELD-OUT points with the constants above: median, max.
# One E_MAX serves A100 and Hopper: A100 runs are predicted 2-17% low, and the power-limited
# H100s of the data ~30% high (bench/bench_throughput_model.py prints every point).
HELD_OUT_ERROR = (0.158, 0.335)
# Fixed (not fitted), with the reason
HBM_FRACTION = 0.80  # a streaming kernel's share of HBM bandwidth (STREAM-like copies)
ELEMENTWISE_BYTES = 100  # x d_model per token per layer: ~18 d-wide 16-bit reads/writes forward
# (2 norms, 2 residual adds, bias, GELU on 4d, dropout masks), about twice that backward
LOGIT_BYTES = 8  # per logit: 16-bit logits written and read, their gradient written and read
OPTIMIZER_BYTES = 30  # per parameter: fp32 master, m, v read + written (24), gradient read (4),
# 16-bit parameter written (2)
NORM_BYTES = 4  # per parameter: the gradients read once more for the global norm
COLLECTIVE_LATENCY_S = 10e-6  # per tensor-parallel all-reduce: NCCL's small-message floor


@dataclass(frozen=True)
class Gemm:
    """One forward GEMM of a layer: K (input features) x N (output features); `split` says
    which one tensor parallelism cuts ("n": column-parallel, "k": row-parallel, "": none)."""
    k: int
    n: int
    split: str = ""

    def on_rank(self, tp: int) -> tuple[int, int]:
        return (self.k // tp if self.split == "k" else self.k,
                self.n // tp if self.split == "n" else self.n)


@dataclass(frozen=True)
class Workload:
    """One training step as a rank sees it. n_params: all parameters (ZeRO's bytes and the
    optimizer's); rank_params: those one tensor-parallel rank holds (n_params when tp is 1);
    model_flops_per_token: the MFU convention's F (6N + 12 L d T)."""
    n_layer: int
    d_model: int
    seq: int
    vocab: int
    layer_gemms: tuple[Gemm, ...]
    head: Gemm
    n_params: int
    rank_params: int
    model_flops_per_token: float
    micro_batch: int
    grad_accum: int
    dp: int
    tp: int = 1
    gpus_per_node: int = 8
    zero_stage: int = 0
    recompute: float = 0.0  # extra FLOPs over the model's, as a share (planner.recompute_share)
    precision: str = "bf16"
    host_s: float = 0.0  # fixed host cost per micro-step
    grad_bytes: int = 2  # per gradient element in the collectives
    overlap: bool = True  # ZeRO 2/3 reduce (and gather) on their own stream (zero.overlap_comm)

    @property
    def world(self) -> int:
        return self.dp * self.tp


@dataclass(frozen=True)
class Constants:
    """The fitted constants (the bench varies them; everything else uses the defaults)."""
    e_max: float = E_MAX
    shape_dim: float = SHAPE_DIM
    comm_eff: float = COMM_EFF


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step by term (each already summed over the micro-steps)."""
    gemm: float
    attention: float
    recompute: float
    elementwise: float
    optimizer: float
    norm: float
    tp_comm: float
    dp_comm_intra: float
    dp_comm_inter: float
    host: float
    tokens: int  # per step, all ranks
    world: int
    model_flops_per_token: float
    peak: float

    @property
    def total(self) -> float:
        return (self.gemm + self.attention + self.recompute + self.elementwise + self.optimizer
                + self.norm + self.tp_comm + self.dp_comm_intra + self.dp_comm_inter + self.host)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens / self.total / self.world

    @property
    def mfu(self) -> float:
        return self.model_flops_per_token * self.tokens_per_s_per_gpu / self.peak

    @property
    def limiter(self) -> str:
        groups = {"compute": self.gemm + self.attention + self.recompute,
                  "memory": self.elementwise + self.optimizer + self.norm,
                  "intra-node comm": self.tp_comm + self.dp_comm_intra,
                  "inter-node comm": self.dp_comm_inter, "host": self.host}
        return max(groups, key=lambda k: groups[k])


def gemm_seconds(m: int, k: int, n: int, peak: float, c: Constants) -> float:
    """One GEMM of M x K by K x N at the shape-dependent fraction of peak."""
    shape = 1 + c.shape_dim * (1 / m + 1 / n + 1 / k)
    return 2 * m * n * k / (peak * c.e_max) * shape


def ring_seconds(nbytes: float, ranks: int, bandwidth: float, c: Constants,
                 all_reduce: bool) -> float:
    """A ring collective: each rank sends (ranks-1)/ranks of the bytes (twice for an
    all-reduce: reduce-scatter then all-gather) at COMM_EFF of the one-way bandwidth."""
    if ranks <= 1:
        return 0.0
    share = (2 if all_reduce else 1) * (ranks - 1) / ranks
    return share * nbytes / (bandwidth * c.comm_eff)


def step_time(w: Workload, hw, c: Constants = Constants()) -> StepTime:
    """The model above for one optimizer step; hw: harness.plan.hardware.Hardware."""
    peak = hw.peak_for(w.precision)
    m = w.micro_batch * w.seq
    per_layer = sum(gemm_seconds(m, *g.on_rank(w.tp), peak, c) for g in w.layer_gemms)
    head = gemm_seconds(m, *w.head.on_rank(w.tp), peak, c)
    gemm = 3 * (w.n_layer * per_layer + head)  # forward + 2 backward GEMMs each
    attn_flops = 0.5 * 12 * w.n_layer * w.d_model * w.seq * m / w.tp  # causal: half
    attention = attn_flops / (peak * hw.attention_fraction)
    recompute = w.recompute * (gemm + attention)
    hbm = hw.hbm_bytes_s * HBM_FRACTION
    vocab_on_rank = w.head.on_rank(w.tp)[1]
    elem = (ELEMENTWISE_BYTES * w.d_model * w.n_layer * m * (1 + w.recompute)
            + LOGIT_BYTES * m * vocab_on_rank) / hbm
    tp_count = w.n_layer * (4 + 6 * w.recompute) if w.tp > 1 else 0
    tp_comm = tp_count * (ring_seconds(m * w.d_model * 2, w.tp, hw.intra_bytes_s, c, True)
                          + COLLECTIVE_LATENCY_S)
    shard = w.rank_params / w.dp if w.zero_stage >= 1 else w.rank_params
    optimizer = OPTIMIZER_BYTES * shard / hbm
    norm = NORM_BYTES * shard / hbm
    inter = w.world > w.gpus_per_node  # the data-parallel group leaves the node
    bw = data_parallel_bandwidth(w, hw)
    micro_compute = (gemm + attention + recompute) + elem
    backward = (gemm + attention) * 2 / 3 + recompute  # a recomputed forward runs in the backward
    dp = _zero_seconds(w, bw, c, micro_compute, backward)
    a = w.grad_accum
    return StepTime(gemm=a * gemm, attention=a * attention, recompute=a * recompute,
                    elementwise=a * elem, optimizer=optimizer, norm=norm, tp_comm=a * tp_comm,
                    dp_comm_intra=0.0 if inter else dp, dp_comm_inter=dp if inter else 0.0,
                    host=a * w.host_s, tokens=m * a * w.dp, world=w.world,
                    model_flops_per_token=w.model_flops_per_token, peak=peak)


def data_parallel_bandwidth(w: Workload, hw) -> float:
    """One-way bytes/s a data-parallel ring collective moves per rank. Inside a node, the
    link's. Across nodes NCCL runs one ring per NIC and each node's share of the data
    enters it once, so the group's gpus_per_node / tp members on a node pool their NICs
    (rail-optimised: one NIC per GPU), up to the intra-node link."""
    if w.world <= w.gpus_per_node:
        return hw.intra_bytes_s
    return min(hw.intra_bytes_s, hw.inter_bytes_s * max(1, w.gpus_per_node // w.tp))


def _zero_seconds(w: Workload, bw: float, c: Constants, micro_compute: float,
                  backward: float) -> float:
    """Exposed data-parallel communication per step (see the module docstring)."""
    grads = w.rank_params * w.grad_bytes
    params = w.rank_params * 2
    if w.dp <= 1:
        return 0.0
    if w.zero_stage == 0:
        return ring_seconds(grads, w.dp, bw, c, all_reduce=True)
    gather = ring_seconds(params, w.dp, bw, c, all_reduce=False)
    scatter = ring_seconds(grads, w.dp, bw, c, all_reduce=False)
    hidden = 1.0 if w.overlap else 0.0
    if w.zero_stage == 1:
        return max(0.0, scatter - hidden * backward) + gather
    if w.zero_stage == 2:
        return w.grad_accum * max(0.0, scatter - hidden * backward) + gather
    per_micro = 2 * gather + scatter
    exposed = max(0.0, per_micro - hidden * micro_compute) + gather / max(w.n_layer, 1)
    return w.grad_accum * exposed


def layer_gemms(arch: str, d_model: int, ffn: int, n_head: int,
                n_kv_head: int | None = None) -> tuple[Gemm, ...]:
    """A block's forward GEMMs as Megatron-LM and DeepSpeed AutoTP cut them: GPT-2 (fused qkv
    and fc column-parallel, proj and fc2 row-parallel); llama (wq, wk, wv, w1, w3
    column-parallel, wo and w2 row-parallel; wk and wv n_kv_head heads wide)."""
    if arch == "llama":
        kv = d_model * (n_kv_head or n_head) // n_head
        return (Gemm(d_model, d_model, "n"), Gemm(d_model, kv, "n"), Gemm(d_model, kv, "n"),
                Gemm(d_model, d_model, "k"), Gemm(d_model, ffn, "n"), Gemm(d_model, ffn, "n"),
                Gemm(ffn, d_model, "k"))
    return (Gemm(d_model, 3 * d_model, "n"), Gemm(d_model, d_model, "k"),
            Gemm(d_model, ffn, "n"), Gemm(ffn, d_model, "k"))


def matmul_params(gemms: tuple[Gemm, ...]) -> int:
    return sum(g.k * g.n for g in gemms)
