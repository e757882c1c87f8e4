"""The cost model against references: Megatron-Core's pipeline schedule, the parameter count that equals
Megatron's GPTModel (test_param_count.py), and closed-form arithmetic written out independently."""

import dataclasses
import math
from types import SimpleNamespace

import pytest

from megatron_fold.layout import FoldedLayout
from megatron_fold.plan.cost import (GB, Choice, estimate, expert_load_factor,
                                     in_flight_microbatches, memory_gb, model_flops_per_token, stage_params)
from megatron_fold.plan.hardware import get_gpu
from megatron_fold.plan.models import PRESETS, get_model


def _megatron_in_flight(p, v, M, rank):
    """Model chunks rank `rank` holds at its peak, from Megatron-Core's own schedule bookkeeping."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    comm = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: p, rank=lambda: rank),
                           virtual_pipeline_model_parallel_size=v if v > 1 else None)
    total, _, warmup, _ = get_pp_rank_microbatches(M, v, p, p2p_communicator=comm)
    return min(warmup + 1, total)  # the warm-up forwards plus the first 1F1B forward


def test_in_flight_micro_batches_equal_megatron_schedule():
    cases = [(p, v, M, r) for p in (2, 3, 4, 8) for v in (1, 2, 4, 7) for M in (1, 2, 8, 16, 64) for r in range(p)
             if v == 1 or M % p == 0]
    for p, v, M, rank in cases:
        assert in_flight_microbatches(p, v, M, rank) * v == pytest.approx(_megatron_in_flight(p, v, M, rank)), \
            (p, v, M, rank)
    assert in_flight_microbatches(1, 1, 32, 0) == 1  # no pipelining: one micro-batch at a time


def test_first_stage_interleaving_factor_is_korthikanti():
    # Korthikanti et al. 2022: the first stage holds p * (1 + (p-1)/(p*v)) micro-batches of activations.
    for p, v in [(4, 2), (8, 7), (8, 1)]:
        assert in_flight_microbatches(p, v, 64, 0) == pytest.approx(p * (1 + (p - 1) / (p * v)) if v > 1 else p)


def test_weights_gradients_optimizer_equal_the_parameter_count():
    """With no model parallelism every GPU holds the whole model: 2 + 4 bytes per parameter, and 12 bytes
    per parameter sharded over the 8 data-parallel ranks, for the Megatron-verified parameter count."""
    for m in PRESETS.values():
        layout = FoldedLayout(8, num_experts=m.num_experts)
        _, mem = memory_gb(m, Choice(layout), 4096, 256, None)
        assert mem["weights"] == pytest.approx(2 * m.total_params / GB, rel=1e-12)
        assert mem["gradients"] == pytest.approx(4 * m.total_params / GB, rel=1e-12)
        assert mem["optimizer"] == pytest.approx(12 * m.total_params / 8 / GB, rel=1e-12)


def test_memory_of_the_fuller_stage_from_megatron_verified_stage_params():
    """Weights 2 B, gradients 4 B per parameter of the stage; optimizer 12 B sharded over DP x CP for
    dense and EDP for expert parameters (stage_params equals Megatron's ranks: test_param_count.py)."""
    m = get_model("qwen2-57b-a14b")
    layout = FoldedLayout(64, tp=2, cp=2, pp=2, ep=4, etp=2, num_experts=m.num_experts)
    assert (layout.dp, layout.edp) == (8, 4)
    stage, mem = memory_gb(m, Choice(layout), 4096, 256, None)
    per_stage = {"first": stage_params(m, layout, 0), "last": stage_params(m, layout, 1)}
    dense, experts = per_stage[stage]
    assert mem["weights"] == pytest.approx(2 * (dense + experts) / GB, rel=1e-12)
    assert mem["gradients"] == pytest.approx(4 * (dense + experts) / GB, rel=1e-12)
    assert mem["optimizer"] == pytest.approx(12 * (dense / 16 + experts / 4) / GB, rel=1e-12)


@pytest.mark.parametrize("recompute", [False, True])
def test_activations_follow_the_documented_formula(recompute):
    """Mixtral 8x7B, PP 4, EP 8, micro-batch 2: the first stage holds 4 micro-batches (1F1B); each layer
    keeps Megatron's count n*(18h + 4F) and, beyond it, the routed rows of the straggler expert rank (fc1
    input, SwiGLU input and output, fp32 probability), the fp32 router logits and probabilities, less
    the dense FFN's 4nF; the embedding adds ids and mask per micro-batch. With full recomputation only layer
    inputs plus one layer. (Written out from the cost.py docstrings.)"""
    m = get_model("mixtral-8x7b")
    layout = FoldedLayout(64, pp=4, ep=8, num_experts=8)
    b, s = 2, 4096
    n = b * s
    h, F, k, E = m.hidden, m.moe_ffn, m.topk, m.num_experts
    mu = n * k  # the busiest of 8 EP ranks: sqrt(2 ln 8) binomial sigmas above its n*k copies
    rows = mu * (1 + math.sqrt(2 * math.log(8)) * math.sqrt(mu * 7 / 8) / mu)
    megatron = n * h * (18 + 4 * F / h)
    moe = rows * (2 * h + 6 * F + 4) + n * E * 8 - 4 * n * F
    layers, in_flight = 32 // 4, 4
    embedding = in_flight * (8 * n + n * h)
    if recompute:
        acts, moe_total = 2 * n * h * layers * in_flight + megatron + embedding, moe
    else:
        acts, moe_total = megatron * layers * in_flight + embedding, moe * layers * in_flight
    stage, mem = memory_gb(m, Choice(layout, micro_batch=b, recompute=recompute), s, 256, None)
    assert stage == "first"
    assert mem["activations"] == pytest.approx(acts / GB, rel=1e-12)
    assert mem["moe_activations"] == pytest.approx(moe_total / GB, rel=1e-12)
    assert mem["moe_dispatch_buffers"] == pytest.approx(2 * rows * 2 * h / GB, rel=1e-12)
    assert mem["fragmentation"] == pytest.approx(0.05 * (acts + moe_total) / GB, rel=1e-12)


@pytest.mark.parametrize("name", list(PRESETS))
def test_model_flops_are_twice_the_active_matmul_parameters_plus_attention(name):
    m = PRESETS[name]
    s = 4096
    norms = m.num_layers * (2 * m.hidden + (2 * m.head_dim if m.qk_layernorm else 0)) + m.hidden
    biases = m.num_layers * (m.num_heads + 2 * m.num_query_groups) * m.head_dim if m.qkv_bias else 0
    matmul = m.active_params - m.embedding_params - norms - biases  # the embedding is a lookup
    if not m.untied_embeddings:
        matmul += m.embedding_params  # ... but a tied one is also the output projection
    routers = m.num_layers * (m.num_experts * m.hidden + (m.hidden if m.shared_expert_gate else 0))
    matmul -= routers  # Megatron-LM's count leaves out the router and shared-expert gate
    attention = m.num_layers * 2 * s * m.num_heads * m.head_dim  # QK^T and AV, causal: half of 4*s*a*d
    assert model_flops_per_token(m, s) == 2 * matmul + attention


def test_tied_embeddings_flops():
    m = dataclasses.replace(get_model("mixtral-8x7b"), untied_embeddings=False)
    norms = m.num_layers * 2 * m.hidden + m.hidden
    routers = m.num_layers * m.num_experts * m.hidden
    assert model_flops_per_token(m, 1024) == 2 * (m.active_params - norms - routers) + m.num_layers * 2 * 1024 * 4096


def test_ep_all_to_all_splits_traffic_by_placement():
    """EP 16 over two 8-GPU nodes: 7 of a rank's 15 peers share its node (NVLink), 8 do not (network);
    the all-to-all takes the slower of the two shares plus one call latency, twice (dispatch, combine),
    per pass."""
    m = get_model("qwen3-30b-a3b")
    gpu = get_gpu("h100")
    layout = FoldedLayout(16, ep=16, gpus_per_node=8, num_experts=m.num_experts)
    est = estimate(m, gpu, Choice(layout), 4096, 64, None)
    n = 4096  # tokens per GPU per micro-batch: no TP, no CP, micro-batch 1
    mu = n * m.topk  # copies a rank receives on average; the busiest of 16 gets sqrt(2 ln 16) sigma more
    load = 1 + (2 * 2.772588722239781) ** 0.5 * (mu * 15 / 16) ** 0.5 / mu
    sent = n * m.topk * load * m.hidden * 2
    per_layer = 2 * (max(sent * 7 / 16 / (gpu.nvlink_gbs * 1e9), sent * 8 / 16 / (gpu.network_gbs * 1e9))
                     + gpu.collective_latency_us * 1e-6)
    M = 64 // 16
    assert est.time_s["ep_comm"] == pytest.approx(M * m.num_layers * per_layer * 2, rel=1e-12)


def test_capacity_factor_load_is_the_padded_capacity():
    """Drop-and-pad: each expert receives ceil(tokens*k/E*cf) rows from every source rank, so the load
    factor is E * capacity / (tokens * k); the sequence scope pads to capacity.py's larger bound."""
    m = get_model("mixtral-8x7b")
    layout = FoldedLayout(64, tp=2, cp=2, pp=4, ep=8, etp=1, num_experts=8)
    n = 4096 / 4  # tokens per rank: TP 2 x CP 2, micro-batch 1
    assert expert_load_factor(m, layout, n, 1, 4096, 1.25, "subsequence") == pytest.approx(8 * 320 / (n * 2))
    # sequence scope: min(local 1024 tokens, ceil(4096*2/8*1.25) = 1280) = 1024 rows per expert
    assert expert_load_factor(m, layout, n, 1, 4096, 1.25, "sequence") == pytest.approx(8 * 1024 / (n * 2))
    choice = Choice(layout)
    t_sub = estimate(m, get_gpu("h100"), choice, 4096, 256, 1.25).time_s
    t_seq = estimate(m, get_gpu("h100"), choice, 4096, 256, 1.25, drop_scope="sequence").time_s
    assert t_seq["ep_comm"] > t_sub["ep_comm"] and t_seq["drop_gather"] > 0 and "drop_gather" not in t_sub
    # Memory: the expert rows scale with the load factor (capacity factor when dropping).
    lean, padded = (memory_gb(m, choice, 4096, 256, cf)[1]["moe_activations"] for cf in (1.0, 1.25))
    n_rows = n * 2  # n tokens x top-2, over 8 layers x 4 micro-batches in flight on the first stage
    assert padded - lean == pytest.approx(8 * 4 * n_rows * 0.25 * (2 * m.hidden + 6 * m.moe_ffn + 4) / GB, rel=1e-9)


def test_published_ordering_ep8_tp1_beats_ep4_tp2_for_mixtral_8x7b():
    """Megatron-Core MoE README, "Performance Best Practice": "In practice, EP8TP1 is better than EP4TP2
    for 8x7B" (its reference mapping: 64 GPUs, PP 4, VPP 8, micro-batch 1, global batch 256)."""
    m = get_model("mixtral-8x7b")
    gpu = get_gpu("h100")
    ep8_tp1 = Choice(FoldedLayout(64, tp=1, pp=4, ep=8, etp=1, num_experts=8), vpp=8)
    ep4_tp2 = Choice(FoldedLayout(64, tp=2, pp=4, ep=4, etp=2, num_experts=8), vpp=8)
    time = {name: estimate(m, gpu, choice, 4096, 256, None).step_time_s
            for name, choice in (("ep8_tp1", ep8_tp1), ("ep4_tp2", ep4_tp2))}
    assert time["ep8_tp1"] < time["ep4_tp2"]
