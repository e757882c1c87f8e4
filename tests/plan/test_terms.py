"""Each cost term against a closed-form case written out here, and the planner behaviours the terms
exist for: fine-grained models gain more from folding, a slower network moves EP inside a node."""

import dataclasses
import math

import pytest

from megatron_fold.layout import FoldedLayout
from megatron_fold.plan import terms
from megatron_fold.plan.cost import Choice, estimate
from megatron_fold.plan.hardware import get_gpu
from megatron_fold.plan.models import get_model
from megatron_fold.plan.search import is_coupled, plan

# A round profile: 100 TFLOP/s peak, half reachable, 10 SMs, 1000 GB/s HBM.
P = dataclasses.replace(get_gpu("h100"), name="round", peak_tflops=100.0, gemm_max_efficiency=0.5, sms=10,
                        hbm_gbs=1000.0, nvlink_gbs=100.0, network_gbs=10.0, collective_latency_us=10.0,
                        attention=((1000.0, 20.0), (10000.0, 40.0)))


def test_gemm_compute_bound_full_waves():
    # 1280 x 1280 output = 10 x 10 tiles = 100 tiles = 10 full waves of 10 SMs: 2*m*n*k / (50 TFLOP/s)
    t = terms.gemm_time(1280, 1280, 4096, P)
    assert t == pytest.approx(2 * 1280 * 1280 * 4096 / 50e12)
    assert t > 2 * (1280 * 4096 * 2 + 1280 * 1280) / 1e12  # compute-bound here


def test_gemm_wave_quantization():
    # 11 tiles on 10 SMs: 2 waves, 11/20 of the SMs busy on average.
    t = terms.gemm_time(128, 11 * 128, 8192, P)
    assert t == pytest.approx(2 * 128 * 11 * 128 * 8192 / (50e12 * 11 / 20))


def test_gemm_memory_bound_small_m():
    # 8 rows against a 8192 x 8192 weight: bytes 2*(8*8192 + 8192*8192 + 8*8192) at 1000 GB/s.
    t = terms.gemm_time(8, 8192, 8192, P)
    assert t == pytest.approx(2 * (8 * 8192 + 8192 * 8192 + 8 * 8192) / 1e12)


def test_grouped_gemm_efficiency_falls_with_rows_per_expert():
    """Same rows and FLOPs, the rows spread over more, narrower local experts (fewer rows per weight
    byte): the grouped GEMM takes longer."""
    h100 = get_gpu("h100")
    few = sum(terms.grouped_gemm_time(16384, 8, 6144, 2048, h100))  # 2048 rows per expert
    many = sum(terms.grouped_gemm_time(16384, 64, 6144, 2048, h100))  # 256 rows per expert, same FLOPs
    assert few < many


def test_grouped_gemm_forward_backward_shapes():
    f, b = terms.grouped_gemm_time(2560, 2, 1280, 640, P)  # 1280 rows per expert
    g = lambda m, n, k: terms.gemm_time(m, n, k, P, 2)
    assert f == pytest.approx(g(1280, 1280, 1280) + g(1280, 1280, 640))
    assert b == pytest.approx(g(1280, 1280, 1280) + g(1280, 1280, 1280) + g(1280, 1280, 640) + g(640, 1280, 1280))


def test_permutation_traffic_grows_with_topk():
    t2 = terms.permutation_time(1000, 1000, 2, 8, P)
    t8 = terms.permutation_time(1000, 1000, 8, 8, P)
    assert t2 == pytest.approx(((2 * 2 + 2 + 1) * 1000 * 1000 * 2 + 3 * 1000 * 8 * 4) / 1e12)
    assert t8 == pytest.approx(((2 * 8 + 8 + 1) * 1000 * 1000 * 2 + 3 * 1000 * 8 * 4) / 1e12)


def test_etp_all_gather_and_reduce_scatter():
    # 4 ranks, 1000 rows of 1000: each collective moves 3 chunks of 2 MB at 100 GB/s, plus 10 us.
    assert terms.etp_collective_time(1000, 1000, 4, 100.0, P) == pytest.approx(2 * (3 * 2e6 / 100e9 + 10e-6))
    assert terms.etp_collective_time(1000, 1000, 1, 100.0, P) == 0.0


def test_all_to_all_by_peer_placement():
    # 8 ranks, 1 GB per rank: all peers on NVLink: 7/8 GB at 100 GB/s; 3 on NVLink and 4 off: the network
    # share 4/8 GB at 10 GB/s dominates.
    assert terms.ep_all_to_all_time(1e9, 8, 7, P) == pytest.approx(7 / 8 / 100 + 10e-6)
    assert terms.ep_all_to_all_time(1e9, 8, 3, P) == pytest.approx(4 / 8 / 10 + 10e-6)
    assert terms.ep_all_to_all_time(1e9, 1, 0, P) == 0.0


def test_attention_rate_interpolates_in_log_length():
    assert P.attention_tflops(1000) == 20.0 and P.attention_tflops(10000) == 40.0
    assert P.attention_tflops(math.sqrt(1000 * 10000)) == pytest.approx(30.0)
    assert P.attention_tflops(20000) == 40.0 and P.attention_tflops(500) == pytest.approx(10.0)
    assert terms.attention_time(40e12, 10000, P) == pytest.approx(1.0)


def test_cp_exchange_exposed_only_beyond_compute():
    # 4 ranks, 1 GB per step at 100 GB/s = 10 ms + 10 us per step vs 40 ms / 4 = 10 ms of attention per step.
    assert terms.cp_attention_exchange_time(1e9, 4, 0.040, 100.0, P) == pytest.approx(3 * 10e-6)
    assert terms.cp_attention_exchange_time(1e9, 4, 0.004, 100.0, P) == pytest.approx(3 * (0.01 + 10e-6 - 0.001))
    assert terms.cp_attention_exchange_time(1e9, 1, 0.0, 100.0, P) == 0.0


def test_dropless_straggler_load_closed_form():
    # 8 ranks, 10,000 copies on average: sigma = sqrt(10000 * 7/8), max ~ mean + sqrt(2 ln 8) sigma.
    assert terms.dropless_straggler_load(10000, 8) == pytest.approx(1 + math.sqrt(2 * math.log(8)) * math.sqrt(8750) / 10000)
    assert terms.dropless_straggler_load(10000, 1) == 1.0


def test_sequence_scope_rows_are_capacity_bounds():
    # 4096-token sequence, 1024 tokens per rank, 8 experts, top-2, cf 1: sequence capacity 1024, so all
    # local tokens; subsequence capacity ceil(1024*2/8) = 256.
    assert terms.sequence_scope_rows(1024, 4096, 1, 2, 8, 1.0) == (1024, 256)
    # TP x CP small: local 4096 tokens, sequence capacity 1024 bounds it.
    assert terms.sequence_scope_rows(4096, 4096, 2, 2, 8, 1.0) == (2048, 2048)
    # gather of E fp32 scores per token over TP x CP 4
    assert terms.sequence_scope_gather_time(1000, 8, 4, 100.0, P) == pytest.approx(3 * 1000 * 8 * 4 / 100e9 + 10e-6)


def test_fine_grained_model_gains_more_from_folding():
    """The paper's fine-grained Mixtral 8x22B variant (64 experts of width 2048, top-8) against the
    original (8 experts of 16384, top-2), on the published attention grid (128 H100s, TP2 PP8 VPP7,
    capacity factor 1): folded experts (ETP1 EP8) over coupled ones (ETP = TP = 2, EP inside DP) must
    buy more for the fine-grained model (the paper measures +6.5% and +68%)."""
    coarse = get_model("mixtral-8x22b")
    fine = dataclasses.replace(coarse, name="mixtral-8x22b-g8t8", num_experts=64, moe_ffn=2048, topk=8)
    gpu = get_gpu("h100")
    gain = {}
    for m in (coarse, fine):
        folded = Choice(FoldedLayout(128, tp=2, pp=8, ep=8, etp=1, num_experts=m.num_experts), vpp=7)
        coupled = [Choice(FoldedLayout(128, tp=2, pp=8, ep=ep, etp=2, num_experts=m.num_experts), vpp=7)
                   for ep in (1, 2, 4, 8)]
        assert not any(c.layout.is_folded for c in coupled) and folded.layout.is_folded
        best_coupled = min(estimate(m, gpu, c, 4096, 256, 1.0).step_time_s for c in coupled)
        gain[m.name] = best_coupled / estimate(m, gpu, folded, 4096, 256, 1.0).step_time_s - 1
    assert gain["mixtral-8x22b-g8t8"] > gain["mixtral-8x22b"] > 0


def test_slower_network_moves_ep_inside_a_node():
    """Qwen3-30B-A3B on 32 GPUs: with a 400 GB/s network the best plan spreads EP over nodes; on a
    1 GB/s network every EP group of the best plan stays inside a node."""
    m = get_model("qwen3-30b-a3b")
    fast = get_gpu("h100").with_overrides(network_gbs=400.0)
    slow = get_gpu("h100").with_overrides(network_gbs=1.0)
    best = {name: plan(m, g, 32, 8, 4096, 256, None)[0][0].choice.layout for name, g in (("fast", fast), ("slow", slow))}
    assert not best["fast"].intra_node("ep")
    assert best["slow"].intra_node("ep")
