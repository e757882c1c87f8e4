"""Cost terms of one MoE training step, each a closed form over a Profile (profile.py).

Every term returns seconds (or a load factor) and names its formula and source. cost.py adds them up
per layer, micro-batch and pipeline stage. Bytes are bf16 (2 per element) unless said otherwise.
"""

from __future__ import annotations

import math

from megatron_fold.moe.capacity import padded_tokens_per_expert
from megatron_fold.plan.profile import Profile

__all__ = ["GEMM_TILE", "gemm_time", "linear_time", "grouped_gemm_time", "permutation_time", "etp_collective_time",
           "ep_all_to_all_time", "ring_collective_time", "attention_time", "cp_attention_exchange_time",
           "dropless_straggler_load", "sequence_scope_rows", "sequence_scope_gather_time"]

GB = 1e9
# Output tile of one thread block: cuBLAS / CUTLASS Hopper BF16 kernels use 128 x 128 (and 128 x 256)
# tiles; a GEMM whose tiles do not fill the last wave of SMs leaves SMs idle (wave quantization).
GEMM_TILE = 128


def gemm_time(m: float, n: float, k: float, p: Profile, groups: int = 1) -> float:
    """[m, k] x [k, n], `groups` times (one grouped-GEMM launch when groups > 1).

    Roofline (Williams, Waterman, Patterson 2009) with wave quantization:
      compute = 2*m*n*k*groups / (peak * gemm_max_efficiency * wave_eff)
      wave_eff = tiles / (ceil(tiles / SMs) * SMs),  tiles = groups * ceil(m/T) * ceil(n/T), T = 128
      memory  = 2*(m*k + k*n + m*n)*groups / hbm   (read both operands, write the result once)
      time    = max(compute, memory), divided by grouped_gemm_factor for grouped launches.
    The ceiling is the measured best GEMM (MAMF, profile source), not a fit to training throughput:
    small m (few tokens per local expert) turns the GEMM memory-bound on the weights (k*n), and few
    tiles leave SMs idle, which is what makes fine-grained experts expensive.
    """
    if m <= 0 or n <= 0 or k <= 0 or groups <= 0:
        return 0.0
    tiles = groups * math.ceil(m / GEMM_TILE) * math.ceil(n / GEMM_TILE)
    wave_eff = tiles / (math.ceil(tiles / p.sms) * p.sms)
    compute = 2 * m * n * k * groups / (p.peak_tflops * 1e12 * p.gemm_max_efficiency * wave_eff)
    memory = 2 * (m * k + k * n + m * n) * groups / (p.hbm_gbs * GB)
    t = max(compute, memory)
    return t / p.grouped_gemm_factor if groups > 1 else t


def linear_time(m: float, k: float, n: float, p: Profile, groups: int = 1) -> tuple[float, float]:
    """(forward, backward) of a linear layer y[m, n] = x[m, k] W[k, n]: the backward computes the data
    gradient [m, n] x [n, k] and the weight gradient [k, m] x [m, n] (m the inner dimension)."""
    return (gemm_time(m, n, k, p, groups),
            gemm_time(m, k, n, p, groups) + gemm_time(k, n, m, p, groups))


def grouped_gemm_time(rows: float, local_experts: int, hidden: int, width: int, p: Profile) -> tuple[float, float]:
    """(forward, backward) of SwiGLU experts on one GPU: `rows` expert rows over `local_experts` experts
    (m = rows / local_experts rows each), fc1 [m, h] x [h, 2w] and fc2 [m, w] x [w, h], each one
    grouped-GEMM launch over the local experts (Megatron's --moe-grouped-gemm)."""
    m = rows / local_experts
    if m <= 0:
        return 0.0, 0.0
    f1 = linear_time(m, hidden, 2 * width, p, local_experts)
    f2 = linear_time(m, width, hidden, p, local_experts)
    return f1[0] + f2[0], f1[1] + f2[1]


def permutation_time(tokens: float, hidden: int, topk: int, num_experts: int, p: Profile) -> float:
    """Forward permutation, unpermutation and routing on one GPU, HBM-bound:
      permute: read each token once per copy and write k copies   2 * tokens*k*h*2 bytes
      unpermute: read k copies, write the weighted sum            (tokens*k + tokens)*h*2 bytes
      routing: logits, softmax, top-k, probabilities (fp32)       3 * tokens*E*4 bytes
    The k-fold copy traffic is why fine-grained top-8 models pay more per token than top-2 ones."""
    moved = (2 * tokens * topk + tokens * topk + tokens) * hidden * 2 + 3 * tokens * num_experts * 4
    return moved / (p.hbm_gbs * GB)


def ring_collective_time(bytes_per_rank: float, group: int, bw_gbs: float, p: Profile) -> float:
    """All-gather or reduce-scatter over `group` ranks on a ring: each rank sends and receives
    (group - 1) chunks of `bytes_per_rank` (NCCL bus bandwidth convention), plus one call latency."""
    if group <= 1:
        return 0.0
    return (group - 1) * bytes_per_rank / (bw_gbs * GB) + p.collective_latency_us * 1e-6


def etp_collective_time(rows: float, hidden: int, etp: int, bw_gbs: float, p: Profile) -> float:
    """Expert tensor parallelism, forward: all-gather the `rows` expert rows this rank received over
    ETP before fc1 and reduce-scatter the fc2 output after: 2 ring collectives of rows*h*2 bytes per
    rank. Paid by coupled layouts too, whenever ETP = TP > 1."""
    return 2 * ring_collective_time(rows * hidden * 2, etp, bw_gbs, p)


def ep_all_to_all_time(bytes_per_rank: float, ep: int, peers_in_domain: int, p: Profile) -> float:
    """One all-to-all (dispatch or combine) over `ep` ranks, of which `peers_in_domain` share this
    rank's NVLink domain: (ep-1)/ep of the bytes leave the GPU, spread evenly over peers, and the NVLink
    and network parts run concurrently, so
      time = max(bytes*peers_in/ep / nvlink, bytes*(ep-1-peers_in)/ep / network) + latency.
    Pricing peers by where they sit is what moves EP inside a node on a slow network."""
    if ep <= 1:
        return 0.0
    intra = bytes_per_rank * peers_in_domain / ep
    inter = bytes_per_rank * (ep - 1 - peers_in_domain) / ep
    return (max(intra / (p.nvlink_gbs * GB), inter / (p.network_gbs * GB))
            + p.collective_latency_us * 1e-6)


def attention_time(flops: float, chunk: float, p: Profile) -> float:
    """Core attention FLOPs at the profile's achieved throughput for blocks of `chunk` tokens (FA3 /
    cuDNN measurements by sequence length, interpolated in log length): ring attention's chunks of
    s/(2c) tokens run at the shorter block's rate."""
    return flops / (p.attention_tflops(chunk) * 1e12)


def cp_attention_exchange_time(kv_bytes_per_step: float, cp: int, attention_s: float, bw_gbs: float,
                               p: Profile) -> float:
    """Exposed part of ring attention's K/V exchange (Liu et al., "Ring Attention", arXiv 2310.01889;
    Megatron-Core's p2p CP): cp-1 steps each send a K/V block while the previous block's attention
    runs, so each step exposes max(0, send - compute) with compute = attention_s / cp; short per-rank
    chunks make compute per step small and expose the link."""
    if cp <= 1:
        return 0.0
    send = kv_bytes_per_step / (bw_gbs * GB) + p.collective_latency_us * 1e-6
    return (cp - 1) * max(0.0, send - attention_s / cp)


def dropless_straggler_load(copies_per_rank: float, ep: int) -> float:
    """Load of the busiest EP rank relative to the mean, dropless, if routing were balanced in
    expectation with independent tokens: each rank's copies are binomial with mean mu and standard
    deviation sqrt(mu*(1 - 1/ep)); the maximum of ep of them exceeds the mean by about
    sqrt(2 ln ep) standard deviations (Gaussian extreme value). A lower bound on real routers' imbalance,
    set by arithmetic, not by a fit."""
    if ep <= 1 or copies_per_rank <= 0:
        return 1.0
    sigma = math.sqrt(copies_per_rank * (1 - 1 / ep))
    return 1 + math.sqrt(2 * math.log(ep)) * sigma / copies_per_rank


def sequence_scope_rows(local_seq_len: int, seq_len: int, local_batch: int, topk: int, num_experts: int,
                        capacity_factor: float) -> tuple[int, int]:
    """(padded rows per expert per source rank with sequence-scope dropping, with Megatron's
    subsequence scope): megatron_fold.moe.capacity's static bounds, which is what drop-and-pad sends."""
    kw = dict(local_seq_len=local_seq_len, seq_len=seq_len, local_batch=local_batch, topk=topk,
              num_experts=num_experts, capacity_factor=capacity_factor)
    return padded_tokens_per_expert("sequence", **kw), padded_tokens_per_expert("subsequence", **kw)


def sequence_scope_gather_time(tokens: float, num_experts: int, tp_cp: int, bw_gbs: float, p: Profile) -> float:
    """Sequence-scope dropping gathers every token's routing scores (E fp32 values) over the attention
    TP x CP group before deciding drops: one all-gather of tokens*E*4 bytes per rank."""
    return ring_collective_time(tokens * num_experts * 4, tp_cp, bw_gbs, p)
