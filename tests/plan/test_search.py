"""The planner's search: exhaustive against brute force, and ranking properties that physics demands."""

import itertools

import pytest

from megatron_fold.layout import FoldedLayout, LayoutError
from megatron_fold.plan.cost import Choice, estimate
from megatron_fold.plan.hardware import get_gpu
from megatron_fold.plan.models import get_model
from megatron_fold.plan.search import candidate_choices, candidate_layouts, is_coupled, plan


def _brute_force(model, world, gpn, seq, order="tp-cp-ep-dp-pp"):
    """Every 5-tuple of sizes 1..world that FoldedLayout accepts in `order`, filtered by the model's
    rules written out independently of search.model_violations."""
    found = set()
    # Every tuple whose grids are no larger than the world (FoldedLayout refuses the others anyway).
    tuples = ((tp, cp, pp, ep, etp) for tp in range(1, world + 1) for cp in range(1, world // tp + 1)
              for pp in range(1, world // (tp * cp) + 1) for ep in range(1, world // pp + 1)
              for etp in range(1, world // (ep * pp) + 1))
    for tp, cp, pp, ep, etp in tuples:
        try:
            FoldedLayout(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, gpus_per_node=gpn, num_experts=model.num_experts,
                         order=order)
        except LayoutError:
            continue
        heads_ok = model.num_heads % tp == 0 and model.num_query_groups % tp == 0
        shared_ok = model.shared_expert_ffn % tp == 0
        seq_ok = (cp == 1 or seq % (2 * cp) == 0) and (seq // cp) % tp == 0
        if heads_ok and shared_ok and seq_ok and model.moe_ffn % etp == 0 and model.num_layers % pp == 0:
            found.add((tp, cp, pp, ep, etp))
    return found


@pytest.mark.parametrize("model,world,gpn,seq", [("mixtral-8x7b", 16, 8, 4096), ("qwen2-57b-a14b", 24, 8, 4096),
                                                 ("qwen3-30b-a3b", 12, 4, 4096), ("mixtral-8x22b", 16, 4, 96)])
def test_search_visits_exactly_the_brute_force_layouts(model, world, gpn, seq):
    m = get_model(model)
    layouts = candidate_layouts(m, world, gpn, seq)
    visited = [(l.tp, l.cp, l.pp, l.ep, l.etp, l.order) for l in layouts]
    assert len(visited) == len(set(visited))  # each once
    expected = _brute_force(m, world, gpn, seq)
    assert {v[:5] for v in visited if v[5] == "tp-cp-ep-dp-pp"} == expected
    # --use-tp-pp-dp-mapping: every layout that order accepts whose groups differ from the default's
    # (with PP 1 or DP 1 the two orders build the same groups and are searched once).
    mapped = {t for t in _brute_force(m, world, gpn, seq, "tp-cp-ep-pp-dp") if t[2] > 1 and world > t[0] * t[1] * t[2]}
    assert {v[:5] for v in visited if v[5] == "tp-cp-ep-pp-dp"} == mapped
    for l in layouts:
        if l.order == "tp-cp-ep-pp-dp":
            assert l.groups("pp") != FoldedLayout(world, tp=l.tp, cp=l.cp, pp=l.pp, ep=l.ep, etp=l.etp,
                                                  gpus_per_node=gpn).groups("pp")
    if gpn == 4:  # TP or ETP groups larger than a node are valid, slow, and searched all the same
        assert any(tp > gpn or etp > gpn for tp, _, _, _, etp in expected)


def test_choices_are_exactly_the_batch_and_schedule_rules():
    """Every (VPP, micro-batch, recompute) Megatron-LM accepts: the micro-batch divides G/DP, PP x VPP
    divides the layers, and interleaving needs the micro-batch count to be a multiple of PP."""
    m = get_model("mixtral-8x7b")  # 32 layers
    G = 96
    for layout in candidate_layouts(m, 16, 8, 4096):
        got = {(c.vpp, c.micro_batch, c.recompute) for c in candidate_choices(m, layout, G)}
        want = set()
        for vpp, mbs, recompute in itertools.product(range(1, 33), range(1, G + 1), (False, True)):
            if G % (layout.dp * mbs) or m.num_layers % (layout.pp * vpp):
                continue
            M = G // (layout.dp * mbs)
            if vpp > 1 and (layout.pp == 1 or M % layout.pp):
                continue
            want.add((vpp, mbs, recompute))
        assert got == want, layout


def test_no_fold_results_are_a_subset_of_coupled_layouts():
    m = get_model("mixtral-8x7b")
    folded = {(l.tp, l.cp, l.pp, l.ep, l.etp) for l in candidate_layouts(m, 64, 8, 4096)}
    coupled = candidate_layouts(m, 64, 8, 4096, no_fold=True)
    assert {(l.tp, l.cp, l.pp, l.ep, l.etp) for l in coupled} < folded
    for l in coupled:
        # Coupled, as before folding: ETP = TP and each EP group is a subset of one DP x CP group.
        dp_groups = [set(g) for g in l.groups("dp_cp")]
        assert l.etp == l.tp and all(any(set(g) <= d for d in dp_groups) for g in l.groups("ep"))
    # ... and every layout left out breaks that rule.
    for l in candidate_layouts(m, 64, 8, 4096):
        if (l.tp, l.cp, l.pp, l.ep, l.etp) not in {(c.tp, c.cp, c.pp, c.ep, c.etp) for c in coupled}:
            assert not is_coupled(l)
    ranked_fold, _ = plan(m, get_gpu("h100"), 64, 8, 4096, 256, None)
    ranked_coupled, _ = plan(m, get_gpu("h100"), 64, 8, 4096, 256, None, no_fold=True)
    assert {e.choice for e in ranked_coupled} < {e.choice for e in ranked_fold}
    assert ranked_fold[0].step_time_s <= ranked_coupled[0].step_time_s


def _some_choices(m, world):
    out = []
    layouts = candidate_layouts(m, world, 8, 4096)
    for layout in layouts[:: max(1, len(layouts) // 40)]:
        out += list(candidate_choices(m, layout, 256))[::7]
    return out


def test_faster_links_never_slow_a_layout_down():
    m = get_model("qwen2-57b-a14b")
    slow = get_gpu("h100")
    faster = [slow.with_overrides(nvlink_gbs=900.0), slow.with_overrides(network_gbs=100.0),
              slow.with_overrides(nvlink_gbs=900.0, network_gbs=200.0), slow.with_overrides(hbm_gbs=4800.0)]
    choices = _some_choices(m, 64)
    assert len(choices) > 50 and any(c.layout.pp > 1 and c.vpp > 1 for c in choices)
    for choice in choices:
        base = estimate(m, slow, choice, 4096, 256, None).step_time_s
        for gpu in faster:
            assert estimate(m, gpu, choice, 4096, 256, None).step_time_s <= base * (1 + 1e-12), choice.label()


def test_more_gpus_for_the_same_layout_never_raise_memory():
    m = get_model("mixtral-8x7b")
    gpu = get_gpu("h100")
    for tp, cp, pp, ep, etp, vpp, recompute in [(2, 1, 4, 8, 1, 1, False), (1, 2, 2, 4, 2, 2, True),
                                               (4, 1, 1, 8, 1, 1, False), (1, 1, 8, 8, 1, 4, False)]:
        previous = None
        for world in (64, 128, 256, 512):  # the same TP/CP/PP/EP/ETP: more data parallelism
            layout = FoldedLayout(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, num_experts=m.num_experts)
            mem = estimate(m, gpu, Choice(layout, vpp=vpp, recompute=recompute), 4096, 4096, None).memory_total_gb
            assert previous is None or mem <= previous + 1e-9
            previous = mem


def test_layouts_over_the_memory_limit_are_never_ranked():
    m = get_model("qwen2-57b-a14b")
    small = get_gpu("h100").with_overrides(memory_gb=40.0)
    ranked, evaluated = plan(m, small, 32, 8, 4096, 256, None)
    assert ranked and len(ranked) < evaluated
    assert all(e.fits and e.memory_total_gb <= 40.0 for e in ranked)
    assert [e.step_time_s for e in ranked] == sorted(e.step_time_s for e in ranked)
    # Each choice left out really does not fit: the fitting set is exactly the estimates that fit.
    every = [estimate(m, small, c, 4096, 256, None) for l in candidate_layouts(m, 32, 8, 4096)
             for c in candidate_choices(m, l, 256)]
    assert len(every) == evaluated
    assert {e.choice for e in ranked} == {e.choice for e in every if e.memory_total_gb <= 40.0}


def test_mfu_is_consistent_with_throughput():
    m = get_model("mixtral-8x22b")
    gpu = get_gpu("h100")
    best = plan(m, gpu, 128, 8, 4096, 256, None)[0][0]
    # MFU = achieved model FLOP/s per GPU / peak; tokens/s and TFLOP/s describe the same step.
    assert best.mfu == pytest.approx(best.tflops_per_gpu / gpu.peak_tflops)
    assert best.tokens_per_s_per_gpu == pytest.approx(256 * 4096 / best.step_time_s / 128)
    assert best.step_time_s == pytest.approx(sum(best.time_s.values()))
