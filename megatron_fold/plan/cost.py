"""Cost model of one training step of a MoE model under a folded layout: memory per GPU and time.

A first-order model meant to rank layouts, not to promise milliseconds; docs/planner.md compares it
with public MFU numbers. Notation: h hidden, a heads, g query groups, d head dim, F expert FFN,
Fs shared-expert FFN, E experts, k top-k, V vocabulary, s sequence, b micro-batch, L layers,
G global batch, M = G/(DP*b) micro-batches per step; TP t, CP c, PP p, VPP v, EP e, ETP u, DP, EDP.
Tokens of one micro-batch on one GPU on the attention side (sequence parallelism is on whenever
t > 1): n = b*s/(t*c). Rows reaching one GPU's experts: r = n*k*u*lf (the EP all-to-all spreads the
n*k routed copies evenly, the ETP all-gather multiplies them by u), lf the load factor below.
Nothing here is fitted to end-to-end throughput (docs/planner.md, "Validation").

Memory per GPU (bytes), for the fuller of the first and the last pipeline stage (L/p layers each):
- parameters (stage_params; equal to Megatron-Core's GPTModel rank by rank, tests/plan): dense
  P_d = (L/p)*(linear layers/t + norms + router + shared-expert gate), plus the embedding V*h/t on the
  first stage and the output layer V*h/t (a copy of the embedding when tied) and final norm on the
  last; expert P_e = (L/p)*E*3*h*F/(e*u).
- weights bf16 2*(P_d + P_e); gradients fp32 4*(P_d + P_e) (Megatron's main_grad buffers are not
  sharded); distributed optimizer (fp32 master weights, Adam m and v) 12*P_d/(DP*c) + 12*P_e/EDP:
  Megatron shards dense optimizer state over the DP x CP group and expert state over EDP.
- activations, split in two (stage_memory), so that Megatron-LM's own estimate checks the first part
  (tests/plan/test_megatron_oracles.py, 22 layouts):
    activations: what megatron.training.theoretical_memory_usage counts, per layer and micro-batch
      n*(18h + 4F) (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
      Models", arXiv 2205.05198, Table 2, sequence parallelism + selective recomputation, which flash
      attention matches), plus the embedding's ids and mask n*(8 + h) per micro-batch on the first
      stage; CP divides n (Megatron's formula predates CP). Full recomputation (uniform, one layer per
      checkpoint) keeps 2*n*h per layer (Korthikanti's row) plus one layer's activations.
    moe_activations: what Megatron's dense formula omits for a MoE layer (moe_activations_per_layer):
      r*(2h + 6F/u + 4) routed rows, n*8E router logits and probabilities, n*6Fs shared expert, less
      the 4nF of the dense FFN counted above.
- micro-batches in flight on pipeline rank i, exactly as Megatron-Core's schedules count them
  (`get_pp_rank_microbatches`): 1F1B keeps min(p - i, M); the interleaved schedule keeps
  min(2(p-i-1) + (v-1)p + 1, M*v) model chunks of L/(p*v) layers each. Rank 0 therefore holds
  p + (p-1)/v stage-equivalents, the (1 + (p-1)/(p*v)) factor of Korthikanti et al.
- named terms Megatron's formula omits: logits 4*n*(h + V) on the last stage (the output layer's input
  and fp32 logits; Megatron counts them only at PP 1), moe_dispatch_buffers (permuted tokens, the
  all-to-all receive buffer and the ETP-gathered rows of the busiest layer), fragmentation 5% of the
  activations (Megatron-LM's own allowance in compute_activation_memory_without_sp) and
  cuda_nccl_context 3 GB (CUDA context, cuBLAS workspaces, NCCL buffers: an assumption, no cited
  measurement; `torch.cuda.mem_get_info` after the first step shows it on a real run).
- lf for memory: the capacity factor when dropping, the binomial straggler load when dropless (as
  for time, below).

Time per micro-batch and pipeline stage: the terms of terms.py (each with its formula and source)
over a Profile (profile.py: measured GEMM ceiling, attention by block length, HBM, NVLink and network
bandwidth, collective latency). Forward once and backward (about twice; flash attention's backward
2.5x its forward FLOPs) per layer; full recomputation adds one forward. GEMMs: attention QKV and
projection and the shared expert on the TP group's gathered n*t tokens with TP-split weights, the
experts as one grouped GEMM over E/e local experts of r/(E/e) rows and width F/u, the logits on the
last stage. moe_routing, a term of its own: the router GEMM on n tokens, softmax / top-k,
permutation, unpermutation and sorting received chunks, HBM-bound. Each
collective of the forward has a twin of equal size in the backward. Bandwidth: NVLink when
FoldedLayout places every group of that kind inside one node (the NVLink domain), else the network;
the EP all-to-all splits its bytes by where rank 0's EP peers sit. TP, EP, ETP and PP transfers are
exposed (Megatron-Core 0.19 without --tp-comm-overlap or --overlap-moe-expert-parallel-comm); CP
exposes only what exceeds each ring step's attention.
- Step: (M + (p-1)/v) * t_stage (the 1F1B bubble is (p-1)/v stage times, Narayanan et al. 2021,
  "Efficient Large-Scale Language Model Training on GPU Clusters", arXiv 2104.04473), t_stage the
  last stage (the slowest: it adds the logits), plus the distributed optimizer's gradient
  reduce-scatter (fp32) and parameter all-gather (bf16), (N-1)/N * 6 bytes per parameter over
  DP x CP for dense and EDP for expert parameters, of which only what exceeds the last
  micro-batch's backward is exposed (--overlap-grad-reduce, --overlap-param-gather); the plain
  optimizer all-reduces fp32 gradients instead (8 bytes). optimizer_step: HBM passes of fused Adam,
  gradient clipping and the bf16 copy over the local shard (38 B per parameter) and zeroing the
  fp32 gradient buffer (4 B per local parameter), not overlapped.
- host_sync (dropless only): one host synchronisation per MoE layer forward (the token counts per
  expert), the profile's host_sync_us each (calibrate measures it).
- lf for time: expert_load_factor: the padded capacity when dropping (capacity.py's bound for the
  drop scope), the binomial straggler load when dropless (terms.dropless_straggler_load).
- MFU = model FLOPs (3x forward, no recomputation, no load factor) / (step * GPUs * peak).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from megatron_fold.layout import TP_PP_DP_ORDER, FoldedLayout
from megatron_fold.plan.models import ModelSpec
from megatron_fold.plan.profile import Profile
from megatron_fold.plan.terms import (attention_time, cp_attention_exchange_time, dropless_straggler_load,
                                      ep_all_to_all_time, etp_collective_time, grouped_gemm_time, linear_time,
                                      permutation_time, ring_collective_time, sequence_scope_gather_time,
                                      sequence_scope_rows)

__all__ = ["Choice", "Estimate", "estimate", "memory_gb", "stage_memory", "stage_params", "model_flops_per_token",
           "megatron_activations_per_layer", "moe_activations_per_layer", "FRAGMENTATION", "RUNTIME_OVERHEAD_GB",
           "in_flight_microbatches", "interleaving_violation",
           "expert_load_factor"]

# Kernel and link numbers come from the profile (profile.py, with sources); nothing here is fitted to
# end-to-end throughput.
RUNTIME_OVERHEAD_GB = 3.0
# Allocator slack over activations: Megatron-LM's own estimate adds 5% "for optimizer and
# miscellaneous temporaries" (theoretical_memory_usage.compute_activation_memory_without_sp).
FRAGMENTATION = 0.05
# Flash attention backward FLOPs over forward FLOPs (five matmuls to two; FlashAttention-2, arXiv 2307.08691).
ATTENTION_BACKWARD_FLOPS = 2.5
# Optimizer step bytes per parameter of the local shard: fused Adam 28, gradient-norm 4, bf16 copy 6.
OPTIMIZER_BYTES_PER_SHARD_PARAM = 38
GB = 1e9


@dataclass(frozen=True)
class Choice:
    """A layout plus the per-layout knobs the search also varies."""

    layout: FoldedLayout
    vpp: int = 1
    micro_batch: int = 1
    recompute: bool = False
    # Megatron's distributed optimizer (sharded fp32 state, reduce-scatter + all-gather). The search
    # always uses it (it never costs more memory or traffic); False models Megatron-LM's plain
    # optimizer (whole state on every GPU, one fp32 gradient all-reduce); not a search or CLI option.
    distributed_optimizer: bool = True

    def label(self) -> str:
        l = self.layout
        return (f"TP{l.tp} CP{l.cp} PP{l.pp} VPP{self.vpp} EP{l.ep} ETP{l.etp} DP{l.dp} EDP{l.edp} "
                f"mbs{self.micro_batch}{' recompute' if self.recompute else ''}"
                f"{'' if self.distributed_optimizer else ' plain-optimizer'}"
                f"{' tp-pp-dp' if l.order == TP_PP_DP_ORDER else ''}")

    def megatron_args(self, m: ModelSpec, seq: int, global_batch: int, capacity_factor: float | None) -> list[str]:
        """Megatron-LM arguments that reproduce this choice, the model and the cost model's assumptions
        (the layout's own include `--sequence-parallel` when TP > 1: the model times sequence parallelism)."""
        args = self.layout.megatron_args() + [
            f"--micro-batch-size={self.micro_batch}", f"--global-batch-size={global_batch}",
        ] + m.megatron_args(seq) + [
            # The model assumes these: BF16 with grouped expert GEMMs, sharded optimizer state,
            # overlapped data-parallel traffic, and the all-to-all dispatcher's traffic (Megatron's
            # default dispatcher is allgather).
            "--bf16", "--moe-grouped-gemm", "--overlap-grad-reduce", "--moe-token-dispatcher-type=alltoall",
        ]
        if self.distributed_optimizer:
            args += ["--use-distributed-optimizer", "--overlap-param-gather"]
        if self.vpp > 1:
            args.append(f"--num-layers-per-virtual-pipeline-stage={m.num_layers // (self.layout.pp * self.vpp)}")
        if self.recompute:
            args += ["--recompute-granularity=full", "--recompute-method=uniform", "--recompute-num-layers=1"]
        if capacity_factor is not None:
            # Time and memory assume every expert processes exactly its capacity (padded).
            args += [f"--moe-expert-capacity-factor={capacity_factor:g}", "--moe-pad-expert-input-to-capacity"]
        return args


@dataclass
class Estimate:
    choice: Choice
    step_time_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float
    memory_gb: dict[str, float]  # of the fuller pipeline stage
    memory_stage: str  # "first" or "last"
    time_s: dict[str, float]  # per-step seconds by component
    fits: bool
    # (model, seq, global batch, capacity factor): the arguments are built when asked for (the search
    # estimates ~10^5 choices and prints a few).
    args_of: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def megatron_args(self) -> list[str]:
        return self.choice.megatron_args(*self.args_of) if self.args_of else []

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
                       "dp": l.dp, "edp": l.edp, "order": l.order, "micro_batch": self.choice.micro_batch,
                       "recompute": self.choice.recompute},
            "step_time_s": self.step_time_s, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu, "memory_gb": self.memory_gb,
            "memory_stage": self.memory_stage, "memory_total_gb": self.memory_total_gb, "time_s": self.time_s,
            "bottleneck": self.bottleneck, "fits": self.fits, "megatron_args": self.megatron_args,
        }


def model_flops_per_token(m: ModelSpec, seq: int, tp: int = 1) -> float:
    """Forward FLOPs per token as Megatron-LM counts them for its TFLOP/s log
    (training.num_floating_point_operations, divided by 3 for forward + two backward GEMMs): 2 x the
    matmul weights a token meets (QKV, projection, top-k routed and shared experts, the output layer
    over the vocabulary padded for `tp`) plus causal attention 2*s*a*d. Like Megatron it leaves out the
    router and shared-expert gate GEMMs (under 1% of a layer): the time model still runs them, so
    the MFU printed is the one Megatron-LM would log."""
    per_layer = (2 * m.hidden * (m.num_heads + 2 * m.num_query_groups) * m.head_dim
                 + 2 * m.hidden * m.num_heads * m.head_dim
                 + 2 * seq * m.num_heads * m.head_dim
                 + 6 * m.hidden * m.moe_ffn * m.topk
                 + 6 * m.hidden * m.shared_expert_ffn)
    return m.num_layers * per_layer + 2 * m.hidden * m.padded_vocab(tp)


def in_flight_microbatches(p: int, v: int, M: int, rank: int) -> float:
    """Micro-batches whose activations pipeline rank `rank` holds at its peak, in units of a whole
    stage (L/p layers): Megatron-Core's warm-up count plus the one in its first 1F1B step."""
    if p == 1:
        return 1.0  # forward_backward_no_pipelining: one micro-batch at a time
    if v == 1:
        return float(min(p - rank, M))
    chunks = min(2 * (p - rank - 1) + (v - 1) * p + 1, M * v)
    return chunks / v


def interleaving_violation(p: int, v: int, M: int) -> str | None:
    """Why Megatron-Core refuses this interleaved schedule, or None. With the default
    microbatch_group_size_per_vp_stage = PP, schedules.py requires M >= PP and M % PP == 0."""
    if v == 1:
        return None
    if p == 1:
        return f"virtual pipeline stages (VPP {v}) need PP > 1"
    if M % p:
        return (f"the interleaved schedule needs the number of micro-batches per step ({M}) to be a "
                f"multiple of PP {p}")
    return None


@dataclass(frozen=True)
class _Placement:
    """Which groups FoldedLayout keeps inside a node, and how many EP peers share rank 0's node."""

    intra: dict
    ep_peers_on_node: int


@functools.lru_cache(maxsize=8192)
def _placement(layout: FoldedLayout) -> _Placement:
    # Placement depends only on the layout: computed once, reused for every VPP / micro-batch /
    # recompute choice and every GPU preset (the search evaluates dozens of choices per layout).
    # Asking FoldedLayout enumerates every group over every rank, the search's main cost at 1,024
    # GPUs; a group of one rank is trivially inside a node and one larger than a node cannot be.
    sizes = {"tp": layout.tp, "cp": layout.cp, "pp": layout.pp, "etp": layout.etp, "tp_cp": layout.tp * layout.cp,
             "dp_cp": layout.dp * layout.cp, "edp": layout.edp}
    gpn = layout.gpus_per_node
    intra = {name: size == 1 or (size <= gpn and layout.intra_node(name)) for name, size in sizes.items()}
    peers = 0
    if layout.ep > 1:
        group = layout.groups("ep")[0]  # the group holding rank 0
        peers = sum(1 for r in group if layout.node_of(r) == layout.node_of(0)) - 1
    return _Placement(intra, peers)


@functools.lru_cache(maxsize=65536)
def stage_params(m: ModelSpec, layout: FoldedLayout, stage: int, vocab: int | None = None) -> tuple[float, float]:
    """(dense, expert) parameters on one GPU of pipeline stage `stage`, exactly as Megatron-Core builds
    them: TP splits the linear layers and the vocabulary, EP x ETP the experts; norms, router and
    shared-expert gate are whole on every TP rank; the first stage holds the embedding, the last the
    output layer (a copy of the embedding when tied) and the final norm. `vocab`: the vocabulary the
    model is built with, by default Megatron-LM's padded one (ModelSpec.padded_vocab)."""
    t, p = layout.tp, layout.pp
    embedding = (vocab if vocab is not None else m.padded_vocab(t)) * m.hidden
    layers = m.num_layers // p
    repl = m.tp_replicated_params_per_layer
    dense = layers * ((m.attention_params_per_layer + m.dense_moe_params_per_layer - repl) / t + repl)
    if stage == 0:
        dense += embedding / t
    if stage == p - 1:
        dense += m.hidden  # final norm
        if m.untied_embeddings or p > 1:
            dense += embedding / t  # output layer: its own weights, or the tied copy
    return dense, layers * m.expert_params_per_layer / (layout.ep * layout.etp)


def megatron_activations_per_layer(m: ModelSpec, n: float) -> float:
    """Bytes one layer keeps for one micro-batch of n tokens per GPU, as Megatron-LM's
    theoretical_memory_usage.compute_activation_memory counts them (Korthikanti et al. 2022, Table 2,
    sequence parallelism with selective recomputation, which flash attention matches: no s^2 term):
    n*h*(18 + 4*F/h) = attention 11nh + two norms 4nh + the MLP's input and dropout mask 3nh + its
    hidden activations 4nF, with F the FFN width (for a MoE model Megatron passes the expert's)."""
    return n * (18 * m.hidden + 4 * m.moe_ffn)


def moe_activations_per_layer(m: ModelSpec, n: float, rows: float, etp: int) -> float:
    """Bytes a MoE layer keeps beyond the dense FFN that megatron_activations_per_layer counts in its
    place (Megatron's formula has no routing). Per micro-batch, from what Megatron-Core 0.19's MoE
    layer saves for its backward (token_dispatcher.py alltoall path, experts.py TEGroupedMLP,
    moe_utils.unpermute):
      routed experts, `rows` rows on this GPU: fc1 input 2h, SwiGLU input 2*(2F/u), its output 2*(F/u),
        the routing probability (fp32) the SwiGLU scales by -> rows*(2h + 6F/u + 4); the alltoall
        dispatcher applies the probabilities inside the experts, so unpermute keeps nothing
      router: logits and probabilities in fp32: n*E*8
      shared expert (column-parallel fc1 output 2Fs, SwiGLU output Fs, bf16): n*6Fs
    minus the dense FFN's 4nF that Megatron counts instead (its 3nh of input and mask stay: the MoE
    layer keeps the same norm output and dropout mask)."""
    h, F, Fs = m.hidden, m.moe_ffn, m.shared_expert_ffn
    return rows * (2 * h + 6 * F / etp + 4) + n * m.num_experts * 8 + n * 6 * Fs - 4 * n * F


def stage_memory(m: ModelSpec, choice: Choice, seq: int, global_batch: int, capacity_factor: float | None,
                 rank: int) -> dict[str, float]:
    """Memory per GPU (GB) of pipeline rank `rank`, by named term. The first four are what Megatron-LM's
    theoretical_memory_usage counts (weights, gradients and optimizer: compute_weight_and_optimizer_memory;
    activations: compute_activation_memory, with CP and full recomputation added); the rest are what
    it omits, each with its source (module docstring)."""
    l, v, b = choice.layout, choice.vpp, choice.micro_batch
    M = global_batch // (l.dp * b)
    t, c, p, u = l.tp, l.cp, l.pp, l.etp
    layers = m.num_layers // p
    h = m.hidden
    n = b * seq / (t * c)
    # Rows on the busiest expert rank: the capacity factor when dropping, the same binomial straggler
    # load the time model uses when dropless (terms.dropless_straggler_load).
    lf = capacity_factor if capacity_factor is not None else dropless_straggler_load(n * m.topk, l.ep)
    rows = n * m.topk * u * lf
    dense, experts = stage_params(m, l, rank)
    flight = in_flight_microbatches(p, v, M, rank)
    megatron_layer = megatron_activations_per_layer(m, n)
    moe_layer = moe_activations_per_layer(m, n, rows, u)
    if choice.recompute:
        # Full recomputation, one layer per checkpoint: each layer keeps its input (Korthikanti et al.,
        # Table 2: 2sbh/t), and the layer being recomputed holds its whole activations once.
        acts = 2 * n * h * layers * flight + megatron_layer
        moe = moe_layer
    else:
        acts = megatron_layer * layers * flight
        moe = moe_layer * layers * flight
    if rank == 0:
        acts += flight * n * (8 + h)  # embedding: int64 token ids and dropout mask (Megatron's formula)
    out = {
        "weights": 2 * (dense + experts) / GB,
        "gradients": 4 * (dense + experts) / GB,
        "optimizer": (12 * (dense / (l.dp * c) + experts / l.edp) if choice.distributed_optimizer
                      else 12 * (dense + experts)) / GB,
        "activations": acts / GB,
        "moe_activations": moe / GB,
        # Transient in the busiest layer: the permuted tokens, the all-to-all's receive buffer and,
        # with ETP > 1, the gathered rows (token_dispatcher.py), alive together before the experts run.
        "moe_dispatch_buffers": (2 * n * m.topk * lf * 2 * h + (rows * 2 * h if u > 1 else 0)) / GB,
    }
    if rank == p - 1:
        # Output layer input and logits in fp32 for the cross entropy, 4*n*(h + V) (Megatron's formula
        # counts them at PP 1 only: it sizes the first stage).
        out["logits"] = 4 * n * (h + m.padded_vocab(t)) / GB
    out["fragmentation"] = FRAGMENTATION * (out["activations"] + out["moe_activations"])
    out["cuda_nccl_context"] = RUNTIME_OVERHEAD_GB
    return out


def memory_gb(m: ModelSpec, choice: Choice, seq: int, global_batch: int,
              capacity_factor: float | None) -> tuple[str, dict[str, float]]:
    """(fuller stage, its memory per GPU by kind). Needs no placement: the search calls it first and
    estimates time only for choices that fit."""
    p = choice.layout.pp
    stages = {name: stage_memory(m, choice, seq, global_batch, capacity_factor, rank)
              for name, rank in (("first", 0), ("last", p - 1))}
    name = max(stages, key=lambda k: sum(stages[k].values()))
    return name, stages[name]


@functools.lru_cache(maxsize=65536)
def expert_load_factor(m: ModelSpec, layout: FoldedLayout, n: float, micro_batch: int, seq: int,
                       capacity_factor: float | None, drop_scope: str) -> float:
    """Expert rows per GPU over the balanced n*k*ETP. Dropping with padding: every expert receives its
    padded capacity from every source rank, capacity.py's static bound for the drop scope (subsequence:
    about the capacity factor; sequence: up to E/topk times more once TP x CP is large). Dropless: the
    busiest EP rank's statistical excess (terms.dropless_straggler_load)."""
    if capacity_factor is None:
        return dropless_straggler_load(n * m.topk, layout.ep)
    local_seq = seq // (layout.tp * layout.cp)
    sequence, subsequence = sequence_scope_rows(local_seq, seq, micro_batch, m.topk, m.num_experts, capacity_factor)
    padded = sequence if drop_scope == "sequence" else subsequence
    return m.num_experts * padded / (n * m.topk)


@functools.lru_cache(maxsize=65536)
def _layer_times(m: ModelSpec, gpu: Profile, seq: int, b: int, t: int, c: int, e: int, u: int,
                 lf: float) -> tuple[float, ...]:
    """(layer forward, layer backward, routing forward, routing backward, attention forward, logits
    forward + backward) in seconds for one micro-batch: the kernels depend on the shapes only, so the
    search computes them once per shape rather than once per VPP, PP and recomputation choice."""
    n = b * seq / (t * c)
    h, F, Fs, E, k = m.hidden, m.moe_ffn, m.shared_expert_ffn, m.num_experts, m.topk
    ad = m.num_heads * m.head_dim
    qkv_width = (m.num_heads + 2 * m.num_query_groups) * m.head_dim
    rows = n * k * u * lf  # expert rows on one GPU
    # Sequence parallelism: attention and shared-expert GEMMs run on the TP group's gathered n*t tokens
    # with TP-split weights; the router on this rank's n tokens.
    gemms = [linear_time(n * t, h, qkv_width / t, gpu), linear_time(n * t, ad / t, h, gpu),
             grouped_gemm_time(rows, E // e, h, F // u, gpu)]
    if Fs:
        gemms += [linear_time(n * t, h, 2 * Fs / t, gpu), linear_time(n * t, Fs / t, h, gpu)]
    gemm_fwd, gemm_bwd = sum(g[0] for g in gemms), sum(g[1] for g in gemms)
    chunk = seq if c == 1 else seq / (2 * c)  # ring attention works on 2*CP chunks
    attn_fwd = attention_time(2 * b * seq * seq * ad / (t * c), chunk, gpu)  # causal: half of 4*b*s^2*a*d
    elementwise = 2 * (rows * 3 * F / u + 10 * n * h + 3 * n * Fs) / (gpu.hbm_gbs * GB)  # SwiGLU, norms
    layer_fwd = gemm_fwd + attn_fwd + elementwise
    # Flash attention's backward recomputes the scores: five matmuls to the forward's two, 2.5x its
    # FLOPs (Dao, FlashAttention-2, arXiv 2307.08691, and flash-attn's benchmark count), here at the
    # forward's measured rate (the profile measures the forward only).
    layer_bwd = gemm_bwd + ATTENTION_BACKWARD_FLOPS * attn_fwd + 2 * elementwise
    # MoE routing kernels, a term of their own: the router GEMM, softmax / top-k, permutation and
    # unpermutation (terms.permutation_time) and, with EP or ETP > 1, sorting the received chunks by
    # expert; the backward moves the same bytes twice (gradients in, gradients out).
    router_f, router_b = linear_time(n, h, E, gpu)
    shuffle = permutation_time(n * lf, h, k, E, gpu) + (4 * rows * h / (gpu.hbm_gbs * GB) if e * u > 1 else 0.0)
    routing_fwd, routing_bwd = router_f + shuffle, router_b + 2 * shuffle
    lt, lk = linear_time(n * t, h, m.padded_vocab(t) / t, gpu)
    logits_s = lt + lk

    return layer_fwd, layer_bwd, routing_fwd, routing_bwd, attn_fwd, logits_s


def estimate(m: ModelSpec, gpu: Profile, choice: Choice, seq: int, global_batch: int,
             capacity_factor: float | None, memory: tuple[str, dict[str, float]] | None = None,
             drop_scope: str = "subsequence") -> Estimate:
    """Time, throughput and memory of one choice; `memory` is memory_gb's answer when already known."""
    l, v, b = choice.layout, choice.vpp, choice.micro_batch
    t, c, p, e, u = l.tp, l.cp, l.pp, l.ep, l.etp
    M = global_batch // (l.dp * b)
    layers = m.num_layers // p
    n = b * seq / (t * c)
    h, F, Fs, E, k = m.hidden, m.moe_ffn, m.shared_expert_ffn, m.num_experts, m.topk
    ad = m.num_heads * m.head_dim
    qkv_width = (m.num_heads + 2 * m.num_query_groups) * m.head_dim

    memory_stage, memory = memory or memory_gb(m, choice, seq, global_batch, capacity_factor)
    fits = sum(memory.values()) <= gpu.memory_gb
    place = _placement(l)

    def bw(group: str) -> float:
        return gpu.nvlink_gbs if place.intra[group] else gpu.network_gbs

    # ---- compute, forward and backward per layer and micro-batch (terms.py) --------------------------
    lf = expert_load_factor(m, l, n, b, seq, capacity_factor, drop_scope)
    rows = n * k * u * lf  # expert rows on one GPU
    layer_fwd, layer_bwd, routing_fwd, routing_bwd, attn_fwd, logits_s = _layer_times(m, gpu, seq, b, t, c, e, u, lf)

    # ---- communication per layer and micro-batch (forward; the backward has a twin of each) ----------
    passes = 3 if choice.recompute else 2  # forward (+ recomputed forward) + backward
    tp_s = (2 + (2 if Fs else 0)) * ring_collective_time(n * h * 2, t, bw("tp"), gpu)
    kv_step = 2 * (b * seq / c) * (m.num_query_groups / t) * m.head_dim * 2
    cp_s = cp_attention_exchange_time(kv_step, c, attn_fwd, bw("cp"), gpu)
    ep_s = 2 * ep_all_to_all_time(n * k * lf * h * 2, e, place.ep_peers_on_node, gpu)
    etp_s = etp_collective_time(n * k * lf, h, u, bw("etp"), gpu)
    drop_s = (sequence_scope_gather_time(n, E, t * c, bw("tp_cp"), gpu)
              if capacity_factor is not None and drop_scope == "sequence" else 0.0)
    pp_s = v * (n * h * 2 / (bw("pp") * GB) + gpu.collective_latency_us * 1e-6) if p > 1 else 0.0

    stage = {
        "compute": layers * (layer_fwd * (2 if choice.recompute else 1) + layer_bwd) + logits_s,
        "moe_routing": layers * (routing_fwd * (2 if choice.recompute else 1) + routing_bwd),
        "tp_comm": layers * tp_s * passes,
        "cp_comm": layers * cp_s * passes,
        "ep_comm": layers * ep_s * passes,
        "etp_comm": layers * etp_s * passes,
        "pp_comm": 2 * pp_s,
    }
    if drop_s:
        stage["drop_gather"] = layers * drop_s * passes
    if capacity_factor is None:
        # Dropless: each MoE layer's forward (and its recomputation) reads the token counts per expert on
        # the host for the all-to-all splits and the grouped GEMM (token_dispatcher.py); the GPU idles
        # for the round trip and the relaunch behind it. Drop-and-pad has static shapes and no sync.
        stage["host_sync"] = layers * (2 if choice.recompute else 1) * gpu.host_sync_us * 1e-6
    t_stage = sum(stage.values())

    # ---- data parallelism (distributed optimizer), overlapped with the last backward -------------------
    dense_params, expert_params = stage_params(m, l, p - 1)  # the last stage: the step waits for it
    # Distributed optimizer: fp32 gradient reduce-scatter (4 B) and bf16 parameter all-gather (2 B) per
    # parameter; plain optimizer: one fp32 gradient all-reduce (2 x 4 B on a ring).
    per_param = 6 if choice.distributed_optimizer else 8
    dp_s = (per_param * dense_params * (l.dp * c - 1) / (l.dp * c) / (bw("dp_cp") * GB)
            + per_param * expert_params * (l.edp - 1) / l.edp / (bw("edp") * GB))
    dp_exposed = max(0.0, dp_s - layers * (layer_bwd + routing_bwd))
    # Optimizer step, after the last gradient arrives and before the next forward (not overlapped):
    # HBM-bound passes over this GPU's shard (the distributed optimizer's, or every parameter with the
    # plain one) of torch / Apex fused Adam on fp32 state: read gradient, master weight, m and v and write
    # the last three (28 B), gradient-norm clipping reads the gradient (4 B, Megatron-LM's default
    # --clip-grad 1.0), and the bf16 copy of the new weight reads 4 B and writes 2; zeroing the whole
    # fp32 gradient buffer for the next step writes 4 B per local parameter.
    shard = dense_params / (l.dp * c) + expert_params / l.edp if choice.distributed_optimizer else \
        dense_params + expert_params
    optimizer_s = (OPTIMIZER_BYTES_PER_SHARD_PARAM * shard + 4 * (dense_params + expert_params)) / (gpu.hbm_gbs * GB)

    time_s = {k_: M * val for k_, val in stage.items()}
    time_s["pipeline_bubble"] = (p - 1) / v * t_stage
    time_s["dp_comm_exposed"] = dp_exposed
    time_s["optimizer_step"] = optimizer_s
    step = sum(time_s.values())

    tokens = global_batch * seq
    flops = 3 * model_flops_per_token(m, seq, t) * tokens
    world = l.world_size
    peak = gpu.peak_tflops * 1e12
    return Estimate(
        choice=choice, step_time_s=step, tokens_per_s_per_gpu=tokens / step / world,
        tflops_per_gpu=flops / step / world / 1e12, mfu=flops / (step * world * peak),
        memory_gb=memory, memory_stage=memory_stage, time_s=time_s, fits=fits,
        args_of=(m, seq, global_batch, capacity_factor),
    )
