"""Every term of the step time pinned against closed-form arithmetic written out here, for six
layouts: ETP 2 folded (ETP != TP = 1, EP inside a node), Qwen2-57B with CP, a shared expert and
drop-and-pad, a coupled ETP = TP = 2 layout whose EP group spans two nodes, with VPP and full
recomputation, CP across nodes (ring attention's exchange exposed), ETP across nodes, and the plain optimizer.

Nothing here calls the planner's terms: the roofline, the collectives and the placement are written
from the docstrings of cost.py and terms.py, so deleting or changing any term (issue 20, item 7:
`etp_comm`) turns a test red. Hardware numbers are the shipped h100 profile's data."""

import math

import pytest

from megatron_fold.layout import FoldedLayout
from megatron_fold.plan.cost import Choice, estimate
from megatron_fold.plan.hardware import get_gpu
from megatron_fold.plan.models import get_model

GPU = get_gpu("h100")
PEAK = GPU.peak_tflops * 1e12 * GPU.gemm_max_efficiency  # profile: 989 TFLOP/s x 0.801 (MAMF)
HBM = GPU.hbm_gbs * 1e9
NVLINK, NETWORK = GPU.nvlink_gbs * 1e9, GPU.network_gbs * 1e9
LAT = GPU.collective_latency_us * 1e-6
SEQ, GBS = 4096, 256


def gemm(m, n, k, groups=1):
    """[m,k] x [k,n]: max(2mnk / (peak x wave efficiency of 128x128 tiles on 132 SMs), 2(mk+kn+mn)/HBM)."""
    tiles = groups * math.ceil(m / 128) * math.ceil(n / 128)
    waves = math.ceil(tiles / GPU.sms)
    compute = 2 * m * n * k * groups / (PEAK * tiles / (waves * GPU.sms))
    memory = 2 * (m * k + k * n + m * n) * groups / HBM
    return max(compute, memory) / (GPU.grouped_gemm_factor if groups > 1 else 1)


def linear(m, k, n, groups=1):
    """(forward, backward = data gradient + weight gradient) of x[m,k] W[k,n]."""
    return gemm(m, n, k, groups), gemm(m, k, n, groups) + gemm(k, n, m, groups)


def ring(nbytes, group, bw):
    return (group - 1) * nbytes / bw + LAT if group > 1 else 0.0


def hand_terms(m, world, tp, cp, pp, vpp, ep, etp, mbs, recompute, cf, dist=True, *, ep_peers_on_node, bw):
    """Step-time terms by hand. ep_peers_on_node and bw (per group kind: NVLink or network) are read
    off the rank grid by the caller, from Megatron's rank orders written out in each test."""
    h, F, Fs, E, k = m.hidden, m.moe_ffn, m.shared_expert_ffn, m.num_experts, m.topk
    a, g, d = m.num_heads, m.num_query_groups, m.head_dim
    dp = world // (tp * cp * pp)
    edp = world // (etp * ep * pp)
    M = GBS // (dp * mbs)
    L = m.num_layers // pp
    n = mbs * SEQ / (tp * cp)
    if cf is None:  # dropless: the busiest of EP ranks, sqrt(2 ln EP) binomial sigmas above n*k
        mu = n * k
        lf = 1 + math.sqrt(2 * math.log(ep)) * math.sqrt(mu * (1 - 1 / ep)) / mu if ep > 1 else 1.0
    else:  # drop-and-pad, subsequence scope: ceil(n*k/E*cf) rows per expert from each rank
        lf = E * min(n, math.ceil(n * k / E * cf)) / (n * k)
    rows = n * k * etp * lf
    vocab = -(-m.vocab // (128 * tp)) * 128 * tp

    parts = [linear(n * tp, h, (a + 2 * g) * d / tp), linear(n * tp, a * d / tp, h)]
    local = E // ep  # SwiGLU experts: fc1 [h -> 2F/ETP], fc2 [F/ETP -> h], one grouped launch each
    parts += [linear(rows / local, h, 2 * F / etp, local), linear(rows / local, F / etp, h, local)]
    if Fs:
        parts += [linear(n * tp, h, 2 * Fs / tp), linear(n * tp, Fs / tp, h)]
    chunk = SEQ if cp == 1 else SEQ / (2 * cp)
    rate = dict(GPU.attention)[chunk] * 1e12  # the layouts below use measured block lengths
    attn = 2 * mbs * SEQ * SEQ * a * d / (tp * cp) / rate
    elementwise = 2 * (rows * 3 * F / etp + 10 * n * h + 3 * n * Fs) / HBM
    fwd = sum(p[0] for p in parts) + attn + elementwise
    bwd = sum(p[1] for p in parts) + 2.5 * attn + 2 * elementwise  # flash backward: 2.5x the FLOPs
    # routing: router GEMM; permute (read k copies' sources, write k copies), unpermute (read k, write 1),
    # fp32 logits / softmax / top-k (3 passes of E values); sorting received chunks (read + write)
    shuffle = (((2 * n * lf * k + n * lf * k + n * lf) * h * 2 + 3 * n * lf * E * 4) / HBM
               + (4 * rows * h / HBM if ep * etp > 1 else 0))
    router = linear(n, h, E)
    routing_fwd, routing_bwd = router[0] + shuffle, router[1] + 2 * shuffle
    logits = sum(linear(n * tp, h, vocab / tp))
    passes = 3 if recompute else 2

    tp_layer = (2 + (2 if Fs else 0)) * ring(n * h * 2, tp, bw["tp"])
    kv = 2 * (mbs * SEQ / cp) * (g / tp) * d * 2
    cp_layer = (cp - 1) * max(0.0, kv / bw["cp"] + LAT - attn / cp) if cp > 1 else 0.0
    sent = n * k * lf * h * 2
    a2a = (max(sent * ep_peers_on_node / ep / NVLINK, sent * (ep - 1 - ep_peers_on_node) / ep / NETWORK) + LAT
           if ep > 1 else 0.0)
    ep_layer = 2 * a2a
    etp_layer = 2 * ring(n * k * lf * h * 2, etp, bw["etp"])
    pp_send = vpp * (n * h * 2 / bw["pp"] + LAT) if pp > 1 else 0.0

    stage = {
        "compute": L * (fwd * (2 if recompute else 1) + bwd) + logits,
        "moe_routing": L * (routing_fwd * (2 if recompute else 1) + routing_bwd),
        "tp_comm": L * tp_layer * passes,
        "cp_comm": L * cp_layer * passes,
        "ep_comm": L * ep_layer * passes,
        "etp_comm": L * etp_layer * passes,
        "pp_comm": 2 * pp_send,
    }
    if cf is None:  # dropless: one host sync per MoE layer forward (and recomputed forward)
        stage["host_sync"] = L * (2 if recompute else 1) * GPU.host_sync_us * 1e-6
    terms = {key: M * v for key, v in stage.items()}
    terms["pipeline_bubble"] = (pp - 1) / vpp * sum(stage.values())
    # distributed optimizer, last stage's parameters: fp32 reduce-scatter + bf16 all-gather (6 B)
    # over DP x CP (dense) and EDP (experts), hidden behind the last micro-batch's backward
    attn_params = h * (a + 2 * g) * d + ((a + 2 * g) * d if m.qkv_bias else 0) + a * d * h
    replicated = 2 * h + E * h + (h if m.shared_expert_gate else 0) + (2 * d if m.qk_layernorm else 0)
    # last stage: final norm and output layer; at PP 1 it is also the first stage, with the embedding
    dense = L * ((attn_params + 3 * h * Fs) / tp + replicated) + h + vocab * h / tp * (2 if pp == 1 else 1)
    experts = L * E * 3 * h * F / (ep * etp)
    # the plain optimizer all-reduces fp32 gradients instead: 2 x 4 B on a ring
    per_param = 6 if dist else 8
    dp_s = (per_param * dense * (dp * cp - 1) / (dp * cp) / bw["dp_cp"]
            + per_param * experts * (edp - 1) / edp / bw["edp"])
    terms["dp_comm_exposed"] = max(0.0, dp_s - L * (bwd + routing_bwd))
    # Adam over the local shard (28 B), gradient norm (4 B), bf16 copy (6 B); zeroing all fp32 gradients
    shard = dense / (dp * cp) + experts / edp if dist else dense + experts  # plain: every parameter
    terms["optimizer_step"] = (38 * shard + 4 * (dense + experts)) / HBM
    return terms


CASES = {
    # Mixtral 8x7B on 32 GPUs (4 nodes of 8), TP1 PP2 VPP2 EP4 ETP2, dropless. Expert grid etp-ep-edp-pp:
    # rank 0's EP group is ranks 0, 2, 4, 6 (stride ETP) -> 3 peers on its node; ETP {0, 1} on NVLink.
    # PP stride 16 and DP x CP (stride 1, 16 ranks) leave the node; EDP (stride 8, 2 ranks) too.
    "etp2_folded": (("mixtral-8x7b", 32, 1, 1, 2, 2, 4, 2, 1, False, None), 3,
                    {"tp": NVLINK, "cp": NVLINK, "etp": NVLINK, "pp": NETWORK, "dp_cp": NETWORK, "edp": NETWORK}),
    # Qwen2-57B-A14B on 64 GPUs, TP2 CP2 PP2 EP8 ETP1, capacity factor 1: TP x CP = 4 ranks on NVLink, EP
    # ranks 0..7 one node (7 peers), PP stride 32, DP x CP 16 ranks and EDP 4 ranks of stride 8 off-node.
    "cp2_shared_expert": (("qwen2-57b-a14b", 64, 2, 2, 2, 1, 8, 1, 1, False, 1.0), 7,
                          {"tp": NVLINK, "cp": NVLINK, "etp": NVLINK, "pp": NETWORK, "dp_cp": NETWORK,
                           "edp": NETWORK}),
    # Mixtral 8x22B on 128 GPUs, coupled TP2 PP8 VPP7 EP8 ETP2, full recomputation: EP ranks 0, 2, .., 14
    # (stride 2) -> 3 peers on node 0 and 4 on node 1; ETP = TP pairs on NVLink; EDP 1.
    "coupled_etp2_recompute": (("mixtral-8x22b", 128, 2, 1, 8, 7, 8, 2, 1, True, None), 3,
                               {"tp": NVLINK, "cp": NVLINK, "etp": NVLINK, "pp": NETWORK, "dp_cp": NETWORK,
                                "edp": NVLINK}),
    # Qwen2-57B-A14B on 64 GPUs, TP4 CP4 EP8, dropless: the CP group (stride TP = 4: ranks 0, 4, 8, 12)
    # spans two nodes, so ring attention's K/V sends on the network outlast its 512-token blocks
    # (exposed); EP ranks 0..7 share a node; DP x CP (16 ranks) and EDP (stride 8) leave it.
    "cp4_across_nodes": (("qwen2-57b-a14b", 64, 4, 4, 1, 1, 8, 1, 1, False, None), 7,
                         {"tp": NVLINK, "cp": NETWORK, "etp": NVLINK, "pp": NETWORK, "dp_cp": NETWORK,
                          "edp": NETWORK}),
    # Mixtral 8x7B on 32 GPUs, TP1 EP2 ETP16: the ETP group (ranks 0..15) spans two nodes, so its
    # all-gather / reduce-scatter run on the network while TP (one rank) costs nothing; EP {0, 16} has no
    # peer on rank 0's node.
    "etp16_across_nodes": (("mixtral-8x7b", 32, 1, 1, 1, 1, 2, 16, 1, False, None), 0,
                           {"tp": NVLINK, "cp": NVLINK, "etp": NETWORK, "pp": NETWORK, "dp_cp": NETWORK,
                            "edp": NVLINK}),
    # Mixtral 8x7B on 16 GPUs, TP2 EP8 ETP1 with Megatron's plain optimizer: fp32 gradient all-reduce
    # over DP 8 (stride 2, two nodes) and EDP 2 (ranks 0, 8), Adam over every parameter.
    "plain_optimizer": (("mixtral-8x7b", 16, 2, 1, 1, 1, 8, 1, 1, False, None, False), 7,
                        {"tp": NVLINK, "cp": NVLINK, "etp": NVLINK, "pp": NETWORK, "dp_cp": NETWORK,
                         "edp": NETWORK}),
}


def _planned(case):
    name, world, tp, cp, pp, vpp, ep, etp, mbs, recompute, cf, *dist = case
    m = get_model(name)
    layout = FoldedLayout(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, num_experts=m.num_experts)
    choice = Choice(layout, vpp=vpp, micro_batch=mbs, recompute=recompute, distributed_optimizer=dist[0] if dist else True)
    return m, estimate(m, GPU, choice, SEQ, GBS, cf)


@pytest.mark.parametrize("name", list(CASES))
def test_every_step_term_equals_hand_computed(name):
    case, peers, bw = CASES[name]
    m, est = _planned(case)
    want = hand_terms(m, *case[1:], ep_peers_on_node=peers, bw=bw)
    assert set(est.time_s) == set(want)
    for term, value in want.items():
        assert est.time_s[term] == pytest.approx(value, rel=1e-9, abs=1e-12), term
    assert est.step_time_s == pytest.approx(sum(want.values()), rel=1e-9)


def test_pinned_layouts_exercise_every_term():
    """The pins mean something only if each term is nonzero in some case: ETP and EP traffic, CP
    exposure or not, the bubble and the exposed DP traffic."""
    seen = {}
    for case, _, _ in CASES.values():
        _, est = _planned(case)
        for term, value in est.time_s.items():
            seen[term] = max(seen.get(term, 0.0), value)
    zero = [t for t in ("compute", "moe_routing", "optimizer_step", "host_sync", "tp_comm", "cp_comm", "ep_comm", "etp_comm", "pp_comm", "pipeline_bubble") if not seen[t] > 0]
    assert not zero and seen["dp_comm_exposed"] > 0
