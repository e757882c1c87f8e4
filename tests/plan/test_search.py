"""The planner's search and cost model: exhaustive against brute force, and monotone where physics is."""

import itertools

import pytest

from megatron_fold.layout import FoldedLayout, LayoutError
from megatron_fold.plan.cost import Choice, estimate
from megatron_fold.plan.hardware import get_gpu
from megatron_fold.plan.models import get_model
from megatron_fold.plan.search import candidate_layouts, plan


def _brute_force(model, world, gpn, seq):
    """Every 5-tuple of sizes 1..world through FoldedLayout, filtered by the model's divisibility rules
    written out independently of search.model_admits."""
    found = set()
    sizes = range(1, world + 1)
    for tp, cp, pp, ep, etp in itertools.product(sizes, repeat=5):
        if tp > gpn or etp > gpn or tp * cp * pp > world or etp * ep * pp > world:
            continue
        try:
            FoldedLayout(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, gpus_per_node=gpn, num_experts=model.num_experts)
        except LayoutError:
            continue
        heads_ok = model.num_heads % tp == 0 and model.num_query_groups % tp == 0
        seq_ok = (cp == 1 or seq % (2 * cp) == 0) and (seq // cp) % tp == 0
        if heads_ok and seq_ok and model.moe_ffn % etp == 0 and model.num_layers % pp == 0:
            found.add((tp, cp, pp, ep, etp))
    return found


@pytest.mark.parametrize("model,world", [("mixtral-8x7b", 16), ("qwen2-57b-a14b", 24), ("qwen3-30b-a3b", 12)])
def test_search_visits_exactly_the_brute_force_layouts(model, world):
    m = get_model(model)
    visited = {(l.tp, l.cp, l.pp, l.ep, l.etp) for l in candidate_layouts(m, world, 8, 4096)}
    assert visited == _brute_force(m, world, 8, 4096)
    assert visited  # and the case is not vacuous


def test_no_fold_is_a_subset_of_coupled_layouts():
    m = get_model("mixtral-8x7b")
    folded = {(l.tp, l.cp, l.pp, l.ep, l.etp) for l in candidate_layouts(m, 64, 8, 4096)}
    coupled = candidate_layouts(m, 64, 8, 4096, no_fold=True)
    assert {(l.tp, l.cp, l.pp, l.ep, l.etp) for l in coupled} < folded
    assert all(l.etp == l.tp and (l.dp * l.cp) % l.ep == 0 for l in coupled)
    ranked_fold, _ = plan(m, get_gpu("h100"), 64, 8, 4096, 256, None)
    ranked_coupled, _ = plan(m, get_gpu("h100"), 64, 8, 4096, 256, None, no_fold=True)
    assert {e.choice for e in ranked_coupled} <= {e.choice for e in ranked_fold}
    assert ranked_fold[0].step_time_s <= ranked_coupled[0].step_time_s


def _some_choices(m, world):
    layouts = candidate_layouts(m, world, 8, 4096)
    return [Choice(l, vpp=1, micro_batch=1, recompute=r) for l in layouts[:: max(1, len(layouts) // 40)]
            for r in (False, True) if 256 % l.dp == 0]


def test_faster_links_never_slow_a_layout_down():
    m = get_model("qwen2-57b-a14b")
    slow = get_gpu("h100")
    faster = [slow.with_overrides(nvlink_gbs=900.0), slow.with_overrides(network_gbs=100.0),
              slow.with_overrides(nvlink_gbs=900.0, network_gbs=200.0)]
    for choice in _some_choices(m, 64):
        base = estimate(m, slow, choice, 4096, 256, None).step_time_s
        for gpu in faster:
            assert estimate(m, gpu, choice, 4096, 256, None).step_time_s <= base + 1e-12, choice.label()


def test_more_gpus_for_the_same_layout_never_raise_memory():
    m = get_model("mixtral-8x7b")
    gpu = get_gpu("h100")
    for tp, pp, ep, etp in [(2, 4, 8, 1), (1, 2, 4, 2), (4, 1, 8, 1)]:
        previous = None
        for world in (64, 128, 256, 512):  # same TP/PP/EP/ETP: more data parallelism
            layout = FoldedLayout(world, tp=tp, pp=pp, ep=ep, etp=etp, num_experts=m.num_experts)
            mem = estimate(m, gpu, Choice(layout), 4096, 512, None).memory_total_gb
            assert previous is None or mem <= previous + 1e-9
            previous = mem


def test_layouts_over_the_memory_limit_are_never_ranked():
    m = get_model("mixtral-8x22b")
    small = get_gpu("h100").with_overrides(memory_gb=60.0)
    ranked, evaluated = plan(m, small, 128, 8, 4096, 256, None)
    assert ranked and len(ranked) < evaluated
    assert all(e.fits and e.memory_total_gb <= 60.0 for e in ranked)
    assert [e.step_time_s for e in ranked] == sorted(e.step_time_s for e in ranked)


def test_mfu_is_consistent_with_throughput():
    m = get_model("mixtral-8x22b")
    gpu = get_gpu("h100")
    best = plan(m, gpu, 128, 8, 4096, 256, None)[0][0]
    # MFU = achieved model FLOP/s per GPU / peak; tokens/s and TFLOP/s describe the same step.
    assert best.mfu == pytest.approx(best.tflops_per_gpu / gpu.peak_tflops)
    assert best.tokens_per_s_per_gpu == pytest.approx(256 * 4096 / best.step_time_s / 128)
    assert best.step_time_s == pytest.approx(sum(best.time_s.values()))
