"""FoldedLayout against Megatron-Core's RankGenerator (the oracle), and its validation messages."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from megatron.core.parallel_state import RankGenerator, _inject_gtp_remat_axis

from megatron_fold import FoldedLayout, LayoutError
from megatron_fold.layout import GROUP_NAMES

_ATTENTION_TOKENS = {"tp": "tp", "cp": "cp", "dp": "dp", "dp_cp": "dp-cp", "tp_cp": "tp-cp", "pp": "pp",
                     "mp": "tp-pp", "tp_dp_cp": "tp-dp-cp"}
_EXPERT_TOKENS = {"ep": "ep", "etp": "tp", "tp_ep": "tp-ep", "tp_ep_pp": "tp-ep-pp", "edp": "dp"}


def megatron_generators(world, tp, cp, pp, ep, etp, order):
    """The two generators exactly as megatron.core.parallel_state.initialize_model_parallel builds them."""
    dp, edp = world // (tp * cp * pp), world // (etp * ep * pp)
    attention = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=_inject_gtp_remat_axis(order, after="tp"))
    expert = RankGenerator(tp=etp, ep=ep, dp=edp, pp=pp, cp=1, order=_inject_gtp_remat_axis(order, after="ep"))
    return attention, expert


def megatron_accepts(world, tp, cp, pp, ep, etp, order):
    """Megatron's own checks in initialize_model_parallel, as a predicate."""
    if world % (tp * cp * pp) or world % (etp * ep * pp):
        return False
    try:
        attention, expert = megatron_generators(world, tp, cp, pp, ep, etp, order)
        attention.get_ranks("tp"), expert.get_ranks("tp")
    except RuntimeError:  # the order leaves out a dimension of size > 1
        return False
    except (AssertionError, ValueError):  # the order leaves out tp (megatron-core 0.19 cannot build that)
        assert "tp" not in order.split("-")
        return False
    dp, edp = world // (tp * cp * pp), world // (etp * ep * pp)
    if not (order.endswith("pp") or pp == 1 or edp == dp):
        return False
    return attention.get_ranks("pp") == expert.get_ranks("pp")


def assert_equal_to_megatron(layout):
    attention, expert = megatron_generators(layout.world_size, layout.tp, layout.cp, layout.pp,
                                            layout.ep, layout.etp, layout.order)
    for name in GROUP_NAMES:
        gen, token = (attention, _ATTENTION_TOKENS[name]) if name in _ATTENTION_TOKENS else (expert, _EXPERT_TOKENS[name])
        assert layout.groups(name) == gen.get_ranks(token), name
    for rank in {0, layout.world_size // 3, layout.world_size - 1}:
        for name in GROUP_NAMES:
            assert rank in layout.group_of(name, rank)


_size = st.sampled_from([1, 1, 2, 2, 4, 8, 3])
_orders = st.sampled_from(["tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp"])


@st.composite
def layouts(draw):
    tp, cp, pp, etp = draw(_size), draw(_size), draw(_size), draw(_size)
    dp = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32]))
    world = tp * cp * pp * dp
    ep = draw(st.sampled_from([d for d in (1, 2, 3, 4, 6, 8, 16, 32, 64) if world % (d * etp * pp) == 0] or [1]))
    return dict(world_size=world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=draw(_orders))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_groups_equal_rank_generator(kw):
    world = kw["world_size"]
    args = (world, kw["tp"], kw["cp"], kw["pp"], kw["ep"], kw["etp"], kw["order"])
    if not megatron_accepts(*args):
        with pytest.raises(LayoutError):
            FoldedLayout(**kw)
        return
    assert_equal_to_megatron(FoldedLayout(**kw))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.permutations(["tp", "cp", "ep", "dp", "pp"]), st.integers(0, 3))
def test_any_order_equals_rank_generator(kw, order, left_out):
    """Megatron-Core's generator takes any order string, and appends left-out dimensions of size 1;
    FoldedLayout accepts and rejects the same orders and builds the same groups."""
    kw = kw | {"order": "-".join(order[:5 - left_out])}
    args = (kw["world_size"], kw["tp"], kw["cp"], kw["pp"], kw["ep"], kw["etp"], kw["order"])
    if not megatron_accepts(*args):
        with pytest.raises(LayoutError):
            FoldedLayout(**kw)
        return
    assert_equal_to_megatron(FoldedLayout(**kw))


@pytest.mark.parametrize("kw", [
    dict(world_size=4096, tp=8, cp=2, pp=16, ep=64, etp=1),
    dict(world_size=4096, tp=4, cp=1, pp=8, ep=32, etp=2),
    dict(world_size=1024, tp=2, pp=8, ep=8, etp=1, order="tp-cp-ep-pp-dp", cp=4),
    dict(world_size=3072, tp=8, cp=4, pp=4, ep=48, etp=1),
    dict(world_size=128, tp=2, pp=8, ep=8, etp=1),   # the paper's Mixtral 8x22B layout
])
def test_large_worlds_equal_rank_generator(kw):
    assert_equal_to_megatron(FoldedLayout(**kw))


def test_derived_sizes_and_coords():
    layout = FoldedLayout(16, tp=2, cp=2, pp=2, ep=4, etp=1)
    assert (layout.dp, layout.edp) == (2, 2)
    for rank in range(16):
        c = layout.rank_coords(rank)
        # Each coordinate is the rank's index inside the matching group.
        assert layout.group_of("tp", rank).index(rank) == c["tp"]
        assert layout.group_of("cp", rank).index(rank) == c["cp"]
        assert layout.group_of("dp", rank).index(rank) == c["dp"]
        assert layout.group_of("pp", rank).index(rank) == c["pp"]
        assert layout.group_of("ep", rank).index(rank) == c["ep"]
        assert layout.group_of("etp", rank).index(rank) == c["etp"]
        assert layout.group_of("edp", rank).index(rank) == c["edp"]


def test_placement():
    layout = FoldedLayout(128, tp=2, pp=8, ep=8, etp=1, gpus_per_node=8)
    assert layout.intra_node("ep") and layout.intra_node("tp_ep") and layout.intra_node("tp")
    assert not layout.intra_node("pp") and not layout.intra_node("dp")
    assert layout.placement("pp")[0] == {"ranks": [0, 16, 32, 48, 64, 80, 96, 112],
                                         "nodes": [0, 2, 4, 6, 8, 10, 12, 14], "intra_node": False}
    wide = FoldedLayout(128, tp=1, pp=1, ep=16, etp=1, gpus_per_node=8)
    assert not wide.intra_node("ep") and wide.nodes_of(wide.group_of("ep", 0)) == [0, 1]


INVALID = [
    (dict(world_size=96, pp=8, ep=8), "world_size 96 is not divisible by ETP*EP*PP = 1*8*8 = 64; EP values that fit: 1, 2, 3, 4, 6, 12"),
    (dict(world_size=12, tp=8), "world_size 12 is not divisible by TP*CP*PP = 8*1*1 = 8; TP values that fit: 1, 2, 3, 4, 6, 12"),
    (dict(world_size=16, tp=2, cp=3), "not divisible by TP*CP*PP = 2*3*1 = 6"),
    (dict(world_size=16, pp=3), "not divisible by TP*CP*PP = 1*1*3 = 3"),
    (dict(world_size=16, ep=3), "not divisible by ETP*EP*PP = 1*3*1 = 3"),
    (dict(world_size=16, tp=2, etp=4, ep=8), "not divisible by ETP*EP*PP = 4*8*1 = 32"),
    (dict(world_size=16, etp=32), "not divisible by ETP*EP*PP = 32*1*1 = 32"),
    (dict(world_size=8, tp=2, ep=4, num_experts=6), "num_experts 6 is not divisible by EP 4; EP values that fit: 1, 2"),
    (dict(world_size=64, ep=16, num_experts=8), "num_experts 8 is not divisible by EP 16"),
    (dict(world_size=16, ep=8, num_experts=60), "num_experts 60 is not divisible by EP 8; EP values that fit: 1, 2, 4"),
    (dict(world_size=0), "sizes must be positive integers, got world_size=0"),
    (dict(world_size=8, tp=0), "tp=0"),
    (dict(world_size=8, cp=-2), "cp=-2"),
    (dict(world_size=8, pp=1.5), "pp=1.5"),
    (dict(world_size=8, ep=True), "ep=True"),
    (dict(world_size=8, etp=0), "etp=0"),
    (dict(world_size=8, gpus_per_node=0), "gpus_per_node=0"),
    (dict(world_size=8, num_experts=0), "num_experts=0"),
    (dict(world_size=8, ep=2, order="tp-cp-dp-pp"),
     "order 'tp-cp-dp-pp' leaves out EP = 2: an order may omit only dimensions of size 1"),
    (dict(world_size=8, tp=2, cp=2, order="tp-ep-pp"), "leaves out CP = 2, DP = 2 / EDP = 4"),
    (dict(world_size=8, order="cp-ep-dp-pp"), "order 'cp-ep-dp-pp' leaves out tp, which megatron-core 0.19 cannot build"),
    (dict(world_size=8, order="tp-tp-ep-dp-pp"), "must name each of tp, cp, ep, dp, pp at most once"),
    (dict(world_size=8, order="tp-cp-ep-dp-pp-xx"), "must name each of tp, cp, ep, dp, pp at most once"),
    (dict(world_size=16, tp=2, pp=2, ep=4, order="tp-cp-ep-pp-dp"),
     "does not end with pp, so with PP 2 > 1 Megatron requires EDP == DP, got EDP 1 != DP 4"),
    (dict(world_size=32, tp=1, pp=4, ep=8, etp=1, order="tp-cp-ep-pp-dp"), "EDP 1 != DP 8"),
    (dict(world_size=32, tp=4, pp=2, ep=1, etp=1, order="tp-cp-ep-pp-dp"), "EDP 16 != DP 4"),
    (dict(world_size=24, tp=2, cp=2, pp=2, ep=16, etp=1), "not divisible by ETP*EP*PP = 1*16*2 = 32; EP values that fit: 1, 2, 3, 4, 6, 12"),
    (dict(world_size=10, tp=4, ep=4), "TP values that fit: 1, 2, 5, 10"),
    # Suggestions name the dimension that can change: PP, CP, ETP too, nearby values only.
    (dict(world_size=16, pp=3), "= 3; PP values that fit: 1, 2, 4, 8, 16"),
    (dict(world_size=16, tp=2, cp=3), "= 6; CP values that fit: 1, 2, 4, 8"),
    (dict(world_size=16, tp=2, etp=3), "ETP*EP*PP = 3*1*1 = 3; ETP values that fit: 1, 2, 4, 8, 16"),
    (dict(world_size=4096, tp=8, pp=4, ep=48, etp=1), "EP values that fit: 8, 16, 32, 64, 128, 256"),
    (dict(world_size=7, tp=2, cp=3, etp=1), "no change of one of TP, CP, PP alone fits; their product must divide 7"),
    # Orders other than the two Megatron-LM offers can give the grids different pipeline groups.
    (dict(world_size=8, tp=2, pp=2, ep=2, etp=1, order="tp-pp-cp-ep-dp"),
     "pipeline groups of the attention grid and the expert grid differ"),
]


@pytest.mark.parametrize("kw,message", INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_invalid_layouts_name_the_constraint(kw, message):
    with pytest.raises(LayoutError) as e:
        FoldedLayout(**kw)
    assert message in str(e.value)


def test_every_violation_is_reported_at_once():
    with pytest.raises(LayoutError) as e:
        FoldedLayout(world_size=12, tp=8, ep=5, num_experts=8)
    assert len(e.value.violations) == 3


def test_unknown_group_name():
    with pytest.raises(KeyError, match="unknown group 'dpp'; known groups: tp, cp"):
        FoldedLayout(8).groups("dpp")


def test_at_least_200_valid_layouts_equal_rank_generator():
    """A fixed, reproducible sweep (the hypothesis test above also explores invalid corners)."""
    import itertools
    import random

    rng = random.Random(0)
    sizes = [1, 2, 4, 8]
    combos = list(itertools.product(sizes, [1, 2, 4], [1, 2, 4, 8], sizes, [1, 2, 4, 8, 16, 32], [1, 3, 16],
                                    ["tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp"]))
    rng.shuffle(combos)
    checked = 0
    for tp, cp, pp, etp, ep, dp, order in combos:
        world = tp * cp * pp * dp
        if world > 4096 or not megatron_accepts(world, tp, cp, pp, ep, etp, order):
            continue
        assert_equal_to_megatron(FoldedLayout(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order))
        checked += 1
        if checked == 250:
            break
    assert checked == 250


def test_folded_means_ep_outside_dp_cp_or_etp_differs():
    """Coupled (not folded) = experts on attention's TP groups and every EP group inside one DP x CP
    group. Under Megatron-LM's two orders that is the closed form "ETP == TP and EP divides DP x CP",
    checked on every valid layout of several worlds; other orders are decided by the groups."""
    import itertools

    checked = folded = 0
    for world in (8, 16, 24, 32, 64):
        ds = [d for d in range(1, world + 1) if world % d == 0]
        for tp, cp, pp, ep, etp, order in itertools.product(ds, ds, ds, ds, ds, ["tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp"]):
            try:
                layout = FoldedLayout(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
            except LayoutError:
                continue
            assert layout.is_folded == (not (etp == tp and (cp * layout.dp) % ep == 0)), layout
            checked += 1
            folded += layout.is_folded
    assert checked > 1000 and 0 < folded < checked
    # EP spread over CP ranks with ETP = TP is coupled (Megatron built EP from DP x CP before folding).
    assert not FoldedLayout(8, cp=2, ep=2).is_folded
    assert FoldedLayout(8, tp=2, ep=8, etp=1).is_folded and FoldedLayout(8, tp=2, ep=2, etp=1).is_folded
    # Equal sizes, other groups: with cp before tp, TP groups are [0, 2], ... but ETP groups [0, 1], ...
    odd = FoldedLayout(8, tp=2, cp=2, ep=2, etp=2, order="cp-tp-ep-dp-pp")
    assert odd.groups("tp")[0] == [0, 2] and odd.groups("etp")[0] == [0, 1] and odd.is_folded


def test_megatron_lm_order_and_arguments():
    # An order naming only some dimensions builds the groups of one of Megatron-LM's two orders ...
    assert FoldedLayout(16, tp=2, pp=2, order="tp-pp-dp").megatron_lm_order() == "tp-cp-ep-pp-dp"
    assert FoldedLayout(16, tp=2, pp=2, order="tp-pp-dp").megatron_args()[-1] == "--use-tp-pp-dp-mapping"
    assert FoldedLayout(16, tp=2, pp=2, order="tp-dp-pp").megatron_lm_order() == "tp-cp-ep-dp-pp"
    assert "--use-tp-pp-dp-mapping" not in FoldedLayout(16, tp=2, pp=2, order="tp-dp-pp").megatron_args()
    # ... or of neither, and then no Megatron-LM argument can select it.
    odd = FoldedLayout(8, tp=2, cp=2, ep=2, etp=2, order="cp-tp-ep-dp-pp")
    assert odd.megatron_lm_order() is None
    with pytest.raises(ValueError, match="neither Megatron-LM order"):
        odd.megatron_args()
