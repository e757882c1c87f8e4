"""Sequence-scope dropping shared over the token group (megatron_fold.moe.sequence_drop, FoldRouter._sequence_keep).

On 8 gloo ranks, under token groups of G = 2, 4 and 8 members (TP with sequence parallelism, CP, both),
every rank's keep mask and the token group's counts [2, E] equal a brute-force reference written here:
per (sequence b, expert e), the routed pairs of the whole sequence ranked by (key descending, true
position ascending), the first `capacity` kept. Experts divide G, do not, and number fewer than G; both
drop policies (position: every routed key ties), probabilities drawn from three values (heavy ties),
and a capacity of the whole sequence. Each rank's rows and their positions are cut by Megatron's own CP
split and torch.chunk over TP (moe_reference.shard_like_megatron), not by the router's token order.
Also: each member sorts only its share of the experts (the group sorts each expert once), and the
decision makes no host synchronisation.
"""

import functools
import math

import pytest
import torch

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.moe.router import FoldRouter
from megatron_fold.testing import moe_reference as ref
from megatron_fold.testing.host_sync import HostSyncCounter
from megatron_fold.testing.multirank import run_on_ranks

S, B, H, TOPK = 32, 2, 16, 2
LAYOUTS = [dict(tp=2), dict(cp=4), dict(tp=2, cp=2), dict(tp=4, cp=2), dict(tp=2, cp=4)]  # G = 2, 4, 4, 8, 8
EXPERTS = [3, 6, 8, 12]  # with G = 2, 4, 8: divisible, uneven, and fewer experts than members
POLICIES = ["probs", "position"]
CAPACITY_FACTORS = [0.5, 1.0, 100.0]  # 100: capacity >= S, everything kept


def _inputs(E, seed):
    """Routing map [S, B, E] (top-2 of random logits) and scores from {0.25, 0.5, 0.75} (ties galore)."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randn(S, B, E, generator=g).topk(TOPK, dim=-1).indices
    routing_map = torch.zeros(S, B, E, dtype=torch.bool).scatter(-1, chosen, True)
    scores = torch.randint(1, 4, (S, B, E), generator=g).float() / 4
    return routing_map, scores


@functools.cache
def _reference(E, seed, policy, cf):
    """Routing map, keep mask [S, B, E] and counts [2, E] by brute force, one (b, e) at a time."""
    routing_map, scores = _inputs(E, seed)
    capacity = math.ceil(S * TOPK / E * cf)
    keep = torch.zeros_like(routing_map)
    for b in range(B):
        for e in range(E):
            routed = [s for s in range(S) if routing_map[s, b, e]]
            ranked = sorted(routed, key=lambda s: (-(scores[s, b, e].item() if policy == "probs" else 0.0), s))
            for s in ranked[:capacity]:
                keep[s, b, e] = True
    return routing_map, keep, torch.stack([routing_map.sum(dim=(0, 1)), keep.sum(dim=(0, 1))])


def _router(layout, pgs, E, policy, cf):
    config = ref.make_moe_config(layout, hidden_size=H, num_moe_experts=E, moe_router_topk=TOPK,
                                 moe_expert_capacity_factor=cf, moe_token_drop_policy=policy)
    router = FoldRouter(config, pg_collection=pgs, drop_scope="sequence")
    router.set_layer_number(1)
    return router


def _drop(router, pgs, routing_map, scores):
    """The router's drop on this rank's rows -> (kept [S_local, B, E], counts [2, E])."""
    cut = lambda t: ref.shard_like_megatron(t, pgs.tp.rank(), pgs.tp.size(), pgs.cp)  # noqa: E731
    local_map, local_scores = cut(routing_map), cut(scores)
    E = routing_map.shape[-1]
    _, kept, counts = router._drop(local_scores.reshape(-1, E), local_map.reshape(-1, E), local_map.shape[0], B,
                                   local_scores.reshape(-1, E))
    return kept.view(local_map.shape), counts


def _all_cases(rank, world_size):
    results = {}
    for layout_kwargs in LAYOUTS:
        layout = FoldedLayout(world_size, **layout_kwargs)
        pgs = parallel_state.initialize_model_parallel(layout)
        try:
            positions = ref.shard_like_megatron(torch.arange(S)[:, None], pgs.tp.rank(), pgs.tp.size(), pgs.cp)[:, 0]
            for E in EXPERTS:
                for policy in POLICIES:
                    for cf in CAPACITY_FACTORS:
                        routing_map, scores = _inputs(E, seed=layout.rank_coords(rank)["dp"] * 100 + E)
                        kept, counts = _drop(_router(layout, pgs, E, policy, cf), pgs, routing_map, scores)
                        results[(str(layout_kwargs), E, policy, cf)] = (kept, counts, positions)
        finally:
            parallel_state.destroy_model_parallel()
    return results


def _layout_id(kwargs):
    return "-".join(f"{k}{v}" for k, v in kwargs.items())


@pytest.fixture(scope="module")
def all_cases():
    return run_on_ranks(_all_cases, 8, timeout=240)


@pytest.mark.parametrize("layout_kwargs", LAYOUTS, ids=[_layout_id(kw) for kw in LAYOUTS])
def test_keep_mask_and_counts_equal_brute_force(all_cases, layout_kwargs):
    layout = FoldedLayout(8, **layout_kwargs)
    dropped_somewhere = set()
    for rank, results in enumerate(all_cases):
        for E in EXPERTS:
            for policy in POLICIES:
                for cf in CAPACITY_FACTORS:
                    kept, counts, positions = results[(str(layout_kwargs), E, policy, cf)]
                    seed = layout.rank_coords(rank)["dp"] * 100 + E
                    routing_map, keep, want_counts = _reference(E, seed, policy, cf)
                    where = f"rank {rank} E={E} {policy} cf={cf}"
                    assert torch.equal(kept, (keep & routing_map).index_select(0, positions)), where
                    assert torch.equal(counts, want_counts), where
                    if counts[1].sum() < counts[0].sum():
                        dropped_somewhere.add((E, policy, cf))
    # Against vacuity: every capacity below the sequence drops, for every expert count and policy.
    assert dropped_somewhere == {(E, p, cf) for E in EXPERTS for p in POLICIES for cf in CAPACITY_FACTORS[:2]}


# ---- the work is shared: each member sorts its experts only; no host synchronisation ---------------------

SHARE_CASES = [(dict(tp=2), 3), (dict(tp=2, cp=2), 6), (dict(tp=4, cp=2), 8), (dict(tp=4, cp=2), 12),
               (dict(tp=2, cp=4), 6)]  # (layout, E): G | E, uneven, G > E


def _sorted_and_syncs(rank, world_size):
    out = {}
    real_sort = torch.sort
    for layout_kwargs, E in SHARE_CASES:
        layout = FoldedLayout(world_size, **layout_kwargs)
        pgs = parallel_state.initialize_model_parallel(layout)
        try:
            router = _router(layout, pgs, E, "probs", 1.0)
            routing_map, scores = _inputs(E, seed=E)
            _drop(router, pgs, routing_map, scores)  # warm-up: the one-time coordinate gather reads its result
            sorted_elements = []

            def counting_sort(t, *args, **kwargs):
                sorted_elements.append(t.numel())
                return real_sort(t, *args, **kwargs)

            counter = HostSyncCounter()
            torch.sort = counting_sort
            try:
                with counter.watching():
                    _drop(router, pgs, routing_map, scores)
            finally:
                torch.sort = real_sort
            out[(str(layout_kwargs), E)] = (pgs.tp_cp.rank(), pgs.tp_cp.size(), sorted_elements,
                                            [str(p) for p in counter.points])
        finally:
            parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def sorted_and_syncs():
    return run_on_ranks(_sorted_and_syncs, 8, timeout=120)


@pytest.mark.parametrize("layout_kwargs,E", SHARE_CASES, ids=[f"{_layout_id(kw)}-e{E}" for kw, E in SHARE_CASES])
def test_each_member_sorts_its_share_of_experts(sorted_and_syncs, layout_kwargs, E):
    """Member g of G sorts the whole sequence for floor(E / G) experts, one more for g < E % G: the
    group sorts each (sequence, expert) column once, not G times."""
    per_member = {}
    for rank, results in enumerate(sorted_and_syncs):
        member, G, sorted_elements, _ = results[(str(layout_kwargs), E)]
        share = E // G + (1 if member < E % G else 0)
        assert sorted_elements == ([S * B * share] if share else []), (rank, member, sorted_elements)
        per_member[member] = sum(sorted_elements)
    assert sum(per_member.values()) == S * B * E


@pytest.mark.parametrize("layout_kwargs,E", SHARE_CASES, ids=[f"{_layout_id(kw)}-e{E}" for kw, E in SHARE_CASES])
def test_sequence_drop_makes_no_host_sync(sorted_and_syncs, layout_kwargs, E):
    for rank, results in enumerate(sorted_and_syncs):
        assert results[(str(layout_kwargs), E)][3] == [], rank
