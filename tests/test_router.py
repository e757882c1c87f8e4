"""FoldRouter on one rank: every upstream TopKRouter feature gives upstream's numbers; our dropping
matches upstream's (subsequence, probs policy) or a brute-force reference; the finite check."""

import math

import pytest
import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.router import FoldRouter, NonFiniteRouterScores
from tests import moe_reference as ref
from tests.multirank import run_on_ranks

S, B, H = 12, 3, 16

FEATURES = {
    "softmax": dict(),
    "pre-softmax": dict(moe_router_pre_softmax=True),
    "sigmoid-expert-bias": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    "scaling-factor": dict(moe_router_topk_scaling_factor=2.5),
    "group-limited": dict(num_moe_experts=16, moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2),
    "fp64": dict(moe_router_dtype="fp64"),
    "fp32-router": dict(moe_router_dtype="fp32"),
    "aux-loss+z-loss": dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01),
    "seq-aux-loss": dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.1),
    "global-aux-loss": dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1),
    "jitter": dict(moe_input_jitter_eps=0.1),
    "drop-probs": dict(moe_expert_capacity_factor=0.5),
    "sinkhorn": dict(moe_router_load_balancing_type="sinkhorn", moe_router_topk=1),
}


def _routers(config, pgs, **kwargs):
    torch.manual_seed(0)
    upstream = TopKRouter(config, pg_collection=pgs)
    ours = FoldRouter(config, pg_collection=pgs, **kwargs)
    ours.load_state_dict(upstream.state_dict())
    for r in (upstream, ours):
        r.set_layer_number(1)
        r.train()
    if config.moe_router_enable_expert_bias:
        bias = torch.linspace(-0.3, 0.3, config.num_moe_experts)
        upstream.expert_bias.copy_(bias)
        ours.expert_bias.copy_(bias)
    return upstream, ours


def _route(router, x, r, seed):
    torch.manual_seed(seed)  # input jitter draws random numbers
    x = x.clone().requires_grad_(True)
    probs, routing_map = router(x)
    (probs * r).sum().backward()
    return probs.detach(), routing_map, x.grad, router.weight.grad


def _compare_features(rank, world_size):
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(1))
    try:
        out = {}
        for name, kw in FEATURES.items():
            config = ref.make_moe_config(FoldedLayout(1), hidden_size=H, **kw)
            upstream, ours = _routers(config, pgs)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(S, B, H, generator=g)
            r = torch.randn(S * B, config.num_moe_experts, generator=g)
            out[name] = (_route(upstream, x, r, 5), _route(ours, x, r, 5),
                         None if upstream.local_tokens_per_expert is None else
                         (upstream.local_tokens_per_expert.clone(), ours.local_tokens_per_expert.clone()))
        return out
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def feature_results():
    return run_on_ranks(_compare_features, 1, timeout=120)[0]


@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_equals_upstream(feature_results, feature):
    (u_probs, u_map, u_gx, u_gw), (o_probs, o_map, o_gx, o_gw), counts = feature_results[feature]
    assert torch.equal(o_map, u_map)
    torch.testing.assert_close(o_probs, u_probs, rtol=1e-6, atol=1e-6)
    # Aux losses and z-loss act through the backward pass: equal gradients mean equal losses.
    torch.testing.assert_close(o_gx, u_gx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(o_gw, u_gw, rtol=1e-6, atol=1e-6)
    if counts is not None:  # expert-bias token counts
        assert torch.equal(counts[0], counts[1])


# ---- sequence scope and the position policy against brute force ---------------------------------------

def brute_force_keep(key, routing_map, seq, batch, capacity):
    """Per (sequence, expert): the `capacity` largest keys among routed tokens, earlier position on ties."""
    key = key.view(seq, batch, -1)
    routing_map = routing_map.view(seq, batch, -1)
    keep = torch.zeros_like(routing_map)
    for b in range(batch):
        for e in range(key.shape[-1]):
            routed = [s for s in range(seq) if routing_map[s, b, e]]
            routed.sort(key=lambda s: (-float(key[s, b, e]), s))
            for s in routed[:capacity]:
                keep[s, b, e] = True
    return keep.view(seq * batch, -1)


def _sequence_scope(rank, world_size):
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(1))
    try:
        out = []
        for policy, topk, experts, cf in [("probs", 2, 8, 1.0), ("position", 2, 8, 0.5), ("probs", 8, 64, 0.25),
                                         ("position", 1, 64, 2.0)]:
            config = ref.make_moe_config(FoldedLayout(1), hidden_size=H, num_moe_experts=experts, moe_router_topk=topk,
                                         moe_router_pre_softmax=topk == 1, moe_expert_capacity_factor=cf,
                                         moe_token_drop_policy=policy)
            torch.manual_seed(0)
            x = torch.randn(S, B, H)
            results = {}
            for scope in ("sequence", "subsequence"):
                torch.manual_seed(1)
                router = FoldRouter(config, pg_collection=pgs, drop_scope=scope)
                router.set_layer_number(1)
                probs, routing_map = router(x)
                router.config = ref.make_moe_config(FoldedLayout(1), hidden_size=H, num_moe_experts=experts,
                                                    moe_router_topk=topk, moe_router_pre_softmax=topk == 1)
                dropless_probs, dropless_map = router(x)
                results[scope] = (probs.detach(), routing_map, dropless_probs.detach(), dropless_map)
            out.append((policy, topk, experts, cf, results))
        return out
    finally:
        parallel_state.destroy_model_parallel()


def test_dropping_equals_brute_force():
    for policy, topk, experts, cf, results in run_on_ranks(_sequence_scope, 1, timeout=120)[0]:
        for scope, (probs, routing_map, dropless_probs, dropless_map) in results.items():
            tokens = S if scope == "sequence" else S * B
            capacity = math.ceil(tokens * topk / experts * cf)
            key = dropless_probs if policy == "probs" else dropless_map.float()
            if scope == "sequence":
                expected = brute_force_keep(key, dropless_map, S, B, capacity)
            else:  # one "sequence" of all local tokens
                expected = brute_force_keep(key, dropless_map, S * B, 1, capacity)
            expected &= dropless_map
            assert torch.equal(routing_map, expected), (policy, topk, experts, cf, scope)
            torch.testing.assert_close(probs, dropless_probs * expected)


# ---- checks ------------------------------------------------------------------------------------------

def _non_finite(rank, world_size):
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(1))
    try:
        config = ref.make_moe_config(FoldedLayout(1), hidden_size=H)
        x = torch.randn(S, B, H)
        x[3, 1, 0] = float("nan")
        x[5, 0, 2] = float("inf")
        strict = FoldRouter(config, pg_collection=pgs)
        strict.set_layer_number(7)
        try:
            strict(x)
            message = None
        except NonFiniteRouterScores as e:
            message = str(e)
        lenient = FoldRouter(config, pg_collection=pgs, check_finite=False)
        probs, _ = lenient(x)
        return message, bool(torch.isnan(probs).any())
    finally:
        parallel_state.destroy_model_parallel()


def test_non_finite_scores_name_the_layer():
    message, nan_passed_through = run_on_ranks(_non_finite, 1, timeout=60)[0]
    assert "MoE layer 7: router scores are NaN or infinite for 2 of 36 tokens on this rank (2 on the ranks" in message
    assert nan_passed_through  # check off: the NaN reaches the output instead of an error


def _bad_construction(rank, world_size):
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(1))
    try:
        errors = []
        for kwargs, overrides in [(dict(pg_collection=None), {}), (dict(pg_collection=pgs), dict(moe_router_fusion=True)),
                                  (dict(pg_collection=pgs, drop_scope="document"), {})]:
            try:
                FoldRouter(ref.make_moe_config(FoldedLayout(1), hidden_size=H, **overrides), **kwargs)
            except ValueError as e:
                errors.append(str(e))
        return errors
    finally:
        parallel_state.destroy_model_parallel()


def test_bad_construction_is_explained():
    errors = run_on_ranks(_bad_construction, 1, timeout=60)[0]
    assert "needs the folded ProcessGroupCollection" in errors[0]
    assert "moe_router_fusion needs Transformer Engine" in errors[1]
    assert "unknown drop scope 'document'; choose one of: subsequence, sequence" in errors[2]
