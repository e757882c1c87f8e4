"""Cost model of one training step of a MoE model under a folded layout: memory per GPU and time.

A first-order model meant to rank layouts, not to promise milliseconds. Notation: h hidden, a heads,
g query groups, d head dim, F expert FFN, Fs shared-expert FFN, E experts, k top-k, V vocabulary,
s sequence, b micro-batch, L layers, M micro-batches per step; TP t, CP c, PP p, VPP v, EP e, ETP u,
DP, EDP. Tokens of one micro-batch on one GPU's attention side (sequence parallel): n = b*s/(t*c).

Memory per GPU (bytes), for the fullest pipeline stage (L/p layers, plus embedding or output layer):
- weights bf16 2 B/param, gradients fp32 4 B/param (Megatron's main_grad buffers), distributed
  optimizer (fp32 master + Adam m, v) 12 B/param sharded over DP x CP for dense parameters and over
  EDP for expert parameters (Megatron's distributed optimizer; ZeRO-1 style);
  dense parameters are split over t, expert parameters over e*u.
- activations per layer and micro-batch (after Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", with flash attention so no s^2 term):
    attention: 2 B * n * (2h + (a+2g)d + 2ad)
    MoE:       2 B * (n*2h + r*(h + 3F/u) + n*3Fs),  r = n*k*u*lf rows reach a GPU's experts
  where lf is the expert load factor (capacity factor when dropping, 1.2 for dropless: a straggler
  expert receives 20% more than average); full recomputation keeps only the layer input (2 B * n*h)
  plus one layer's activations. The first stage holds min(p, M) micro-batches in flight with 1F1B,
  times (1 + (p-1)/(p*v)) with interleaving (Korthikanti et al. 2022). The last stage adds fp32 logits
  4 B * n*t*V/t. Plus 3 GB for CUDA context, NCCL and workspace buffers.

Time (per micro-batch and pipeline stage; training = forward + backward = 3x forward FLOPs, 4x with
full recomputation; communication volumes of the backward equal the forward's):
- GEMM FLOPs per GPU: attention 2*n*h*(a+2g)d + 2*n*h*a*d, experts r*6*h*F/u, shared expert 6*n*h*Fs,
  router 2*n*h*E, logits 2*n*h*V (last stage); each at an achieved efficiency
  eff(m) = 0.80 * m/(m + 128) of the GPU's dense BF16 peak, m the smallest GEMM dimension (expert
  GEMMs get rows per local expert r/(E/e): more EP means taller GEMMs, ETP narrows them). Core
  attention 2*b*s^2*a*d/(t*c) at 0.55 * B/(B + 512) of peak (flash attention, causal), B the block
  length: s, or s/(2c) for ring attention's chunks under context parallelism. Elementwise work is bound
  by memory bandwidth: 2 B * (r*(4h + 3F/u) + 10*n*h + 3*n*Fs) per layer (permute/unpermute, SwiGLU,
  norms and residuals) at the GPU's HBM bandwidth.
- TP (sequence parallel): all-gather + reduce-scatter per attention block and per shared expert, each
  moving (t-1)*n*h*2 B per GPU. CP: ring exchange of K and V, (c-1)*(b*s/c)*2g*d/t*2 B, hidden behind
  core attention (only the excess counts). EP: dispatch + combine all-to-all, each n*k*lf*(e-1)/e*h*2 B
  per GPU. ETP: all-gather + reduce-scatter of the expert rows, (u-1)*n*k*lf*h*2 B each. PP: one
  activation send per micro-batch, direction and virtual stage. Not overlapped with compute (the conservative
  default of Megatron-Core 0.19 without --overlap-moe-expert-parallel-comm).
- Each group's traffic uses NVLink when FoldedLayout places the whole group inside one node, otherwise
  the network; an EP all-to-all spread over nodes takes max(intra bytes / NVLink, inter bytes / network).
- Step: (M + (p-1)/v) * t_stage (1F1B bubble of (p-1)/v micro-batches), t_stage the slowest stage,
  plus the data-parallel gradient reduce-scatter (fp32) and parameter all-gather (bf16) of the
  distributed optimizer, (G-1)/G * params * 6 B over DP x CP (dense) and EDP (experts), of which only
  what exceeds the last micro-batch's backward is exposed.
- MFU = model FLOPs (3x forward, no recomputation, no load factor) / (step * GPUs * peak).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_fold.layout import FoldedLayout
from megatron_fold.plan.hardware import GPUSpec
from megatron_fold.plan.models import ModelSpec

__all__ = ["Choice", "Estimate", "estimate", "model_flops_per_token", "DROPLESS_LOAD_FACTOR"]

GEMM_PEAK_EFFICIENCY = 0.80
GEMM_HALF_EFFICIENCY_DIM = 128
ATTENTION_EFFICIENCY = 0.55
ATTENTION_HALF_EFFICIENCY_BLOCK = 512
DROPLESS_LOAD_FACTOR = 1.2
RUNTIME_OVERHEAD_GB = 3.0
GB = 1e9


@dataclass(frozen=True)
class Choice:
    """A layout plus the per-layout knobs the search also varies."""

    layout: FoldedLayout
    vpp: int = 1
    micro_batch: int = 1
    recompute: bool = False

    def label(self) -> str:
        l = self.layout
        return (f"TP{l.tp} CP{l.cp} PP{l.pp} VPP{self.vpp} EP{l.ep} ETP{l.etp} DP{l.dp} EDP{l.edp} "
                f"mbs{self.micro_batch}{' recompute' if self.recompute else ''}")

    def megatron_args(self, global_batch: int, num_layers: int) -> list[str]:
        args = self.layout.megatron_args() + [f"--micro-batch-size={self.micro_batch}",
                                              f"--global-batch-size={global_batch}"]
        if self.vpp > 1:
            args.append(f"--num-layers-per-virtual-pipeline-stage={num_layers // (self.layout.pp * self.vpp)}")
        if self.layout.tp > 1:
            args.append("--sequence-parallel")
        if self.recompute:
            args += ["--recompute-granularity=full", "--recompute-method=uniform", "--recompute-num-layers=1"]
        return args


@dataclass
class Estimate:
    choice: Choice
    step_time_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float
    memory_gb: dict[str, float]
    time_s: dict[str, float]  # per-step seconds by component
    fits: bool
    megatron_args: list[str] = field(default_factory=list)

    @property
    def memory_total_gb(self) -> float:
        return sum(self.memory_gb.values())

    @property
    def bottleneck(self) -> str:
        return max(self.time_s, key=self.time_s.get)

    def to_dict(self) -> dict:
        l = self.choice.layout
        return {
            "layout": {"tp": l.tp, "cp": l.cp, "pp": l.pp, "vpp": self.choice.vpp, "ep": l.ep, "etp": l.etp,
                       "dp": l.dp, "edp": l.edp, "micro_batch": self.choice.micro_batch,
                       "recompute": self.choice.recompute},
            "step_time_s": self.step_time_s, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu, "memory_gb": self.memory_gb,
            "memory_total_gb": self.memory_total_gb, "time_s": self.time_s, "bottleneck": self.bottleneck,
            "fits": self.fits, "megatron_args": self.megatron_args,
        }


def model_flops_per_token(m: ModelSpec, seq: int) -> float:
    """Forward FLOPs per token (dense math the model defines; causal attention counted once)."""
    per_layer = (2 * m.hidden * (m.num_heads + 2 * m.num_query_groups) * m.head_dim
                 + 2 * m.hidden * m.num_heads * m.head_dim
                 + 2 * seq * m.num_heads * m.head_dim
                 + 6 * m.hidden * m.moe_ffn * m.topk
                 + 6 * m.hidden * m.shared_expert_ffn
                 + 2 * m.hidden * m.num_experts)
    return m.num_layers * per_layer + 2 * m.hidden * m.vocab


def _eff(smallest_dim: float) -> float:
    return GEMM_PEAK_EFFICIENCY * smallest_dim / (smallest_dim + GEMM_HALF_EFFICIENCY_DIM)


def _bw(layout: FoldedLayout, group: str, gpu: GPUSpec) -> float:
    return (gpu.nvlink_gbs if layout.intra_node(group) else gpu.network_gbs) * GB


def _ep_all_to_all_time(layout: FoldedLayout, nbytes: float, gpu: GPUSpec) -> float:
    """Bytes sent to EP peers, split by where the peers are (rank 0's group is representative)."""
    if layout.ep == 1 or nbytes == 0:
        return 0.0
    group = layout.group_of("ep", 0)
    same_node = sum(1 for r in group if layout.node_of(r) == layout.node_of(0)) - 1
    intra = nbytes * same_node / (layout.ep - 1)
    inter = nbytes - intra
    return max(intra / (gpu.nvlink_gbs * GB), inter / (gpu.network_gbs * GB))


def estimate(m: ModelSpec, gpu: GPUSpec, choice: Choice, seq: int, global_batch: int,
             capacity_factor: float | None) -> Estimate:
    l, v, b = choice.layout, choice.vpp, choice.micro_batch
    t, c, p, e, u = l.tp, l.cp, l.pp, l.ep, l.etp
    M = global_batch // (l.dp * b)
    layers = m.num_layers // p
    n = b * seq / (t * c)
    lf = capacity_factor if capacity_factor is not None else DROPLESS_LOAD_FACTOR
    rows = n * m.topk * u * lf  # expert rows on one GPU per micro-batch and layer
    h, F, Fs = m.hidden, m.moe_ffn, m.shared_expert_ffn
    qkv_width = (m.num_heads + 2 * m.num_query_groups) * m.head_dim

    # ---- memory ---------------------------------------------------------------------------------------
    dense_layer = m.attention_params_per_layer + m.dense_moe_params_per_layer
    first = layers * dense_layer / t + m.embedding_params / t
    last = layers * dense_layer / t + (m.output_params if m.untied_embeddings else m.embedding_params) / t + h
    dense = max(first, last)
    experts = layers * m.expert_params_per_layer / (e * u)
    act_attn = 2 * n * (2 * h + qkv_width + 2 * m.num_heads * m.head_dim)
    act_moe = 2 * (n * 2 * h + rows * (h + 3 * F / u) + n * 3 * Fs)
    per_layer = act_attn + act_moe
    in_flight = min(p, M) * ((1 + (p - 1) / (p * v)) if v > 1 else 1)
    if choice.recompute:
        acts = 2 * n * h * layers * in_flight + per_layer
    else:
        acts = per_layer * layers * in_flight
    logits = 4 * n * t * m.vocab / t
    memory_gb = {
        "weights": 2 * (dense + experts) / GB,
        "gradients": 4 * (dense + experts) / GB,
        "optimizer": 12 * (dense / (l.dp * c) + experts / l.edp) / GB,
        "activations": (acts + logits) / GB,
        "runtime": RUNTIME_OVERHEAD_GB,
    }
    fits = sum(memory_gb.values()) <= gpu.memory_gb

    # ---- compute --------------------------------------------------------------------------------------
    peak = gpu.peak_tflops * 1e12
    mult = 4 if choice.recompute else 3
    attn_gemm = (2 * n * h * qkv_width / _eff(min(n * t, qkv_width / t, h))
                 + 2 * n * h * m.num_heads * m.head_dim / _eff(min(n * t, h, m.num_heads * m.head_dim / t)))
    rows_per_expert = rows / (m.num_experts / e)
    expert_gemm = rows * 6 * h * F / u / _eff(min(rows_per_expert, F / u, h)) if rows_per_expert else 0.0
    shared_gemm = 6 * n * h * Fs / _eff(min(n * t, Fs / t, h)) if Fs else 0.0
    router = 2 * n * h * m.num_experts / _eff(min(n, m.num_experts, h))
    # Ring attention works on 2*CP chunks of the sequence: shorter blocks run less efficiently.
    block = seq if c == 1 else seq / (2 * c)
    attn_eff = ATTENTION_EFFICIENCY * block / (block + ATTENTION_HALF_EFFICIENCY_BLOCK)
    core_attn_s = 2 * b * seq * seq * m.num_heads * m.head_dim / (t * c) / (attn_eff * peak)
    # Memory-bound elementwise work per layer: permute + unpermute of every expert row (read + write),
    # SwiGLU (read 2F/u, write F/u), and ~10 passes over the layer's tokens (norms, residuals, rotary).
    elementwise_bytes = 2 * (rows * (4 * h + 3 * F / u) + 10 * n * h + (3 * n * Fs if Fs else 0))
    layer_compute_s = (attn_gemm + expert_gemm + shared_gemm + router) / peak + core_attn_s \
        + elementwise_bytes / (gpu.hbm_gbs * GB)
    logits_s = 2 * n * h * m.vocab / _eff(min(n * t, m.vocab / t, h)) / peak

    # ---- communication per layer and micro-batch (forward volume; x passes) ---------------------------
    passes = 3 if choice.recompute else 2  # forward (+ recomputed forward) + backward
    tp_bytes = (t - 1) * n * h * 2 * (2 + (2 if Fs else 0))
    tp_s = tp_bytes / _bw(l, "tp", gpu) if t > 1 else 0.0
    cp_bytes = (c - 1) * (b * seq / c) * 2 * m.num_query_groups * m.head_dim / t * 2
    cp_s = max(0.0, cp_bytes / _bw(l, "cp", gpu) - core_attn_s) if c > 1 else 0.0
    ep_s = 2 * _ep_all_to_all_time(l, n * m.topk * lf * (e - 1) / e * h * 2, gpu)
    etp_s = 2 * (u - 1) * n * m.topk * lf * h * 2 / _bw(l, "etp", gpu) if u > 1 else 0.0
    # Interleaving multiplies the stage boundaries a micro-batch crosses by v.
    pp_s = (v * n * h * 2 / (gpu.network_gbs * GB)) if p > 1 else 0.0

    stage = {
        # forward once, backward twice (x3); full recomputation adds one forward of the layers (x4)
        "compute": layers * layer_compute_s * mult + logits_s * 3,
        "tp_comm": layers * tp_s * passes,
        "cp_comm": layers * cp_s * passes,
        "ep_comm": layers * ep_s * passes,
        "etp_comm": layers * etp_s * passes,
        "pp_comm": 2 * pp_s,
    }
    t_stage = sum(stage.values())
    bubble_s = (p - 1) / v * t_stage
    dp_bytes = 6 * (dense * (l.dp * c - 1) / (l.dp * c) + experts * (l.edp - 1) / l.edp)
    dp_group_bw = min(_bw(l, "dp_cp", gpu), _bw(l, "edp", gpu))
    dp_exposed = max(0.0, dp_bytes / dp_group_bw - stage["compute"] * 2 / 3)

    time_s = {k: M * val for k, val in stage.items()}
    time_s["pipeline_bubble"] = bubble_s
    time_s["dp_comm_exposed"] = dp_exposed
    step = sum(time_s.values())

    tokens = global_batch * seq
    flops = 3 * model_flops_per_token(m, seq) * tokens
    world = l.world_size
    return Estimate(
        choice=choice, step_time_s=step, tokens_per_s_per_gpu=tokens / step / world,
        tflops_per_gpu=flops / step / world / 1e12, mfu=flops / (step * world * peak),
        memory_gb=memory_gb, time_s=time_s, fits=fits,
        megatron_args=choice.megatron_args(global_batch, m.num_layers),
    )
