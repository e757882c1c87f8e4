"""FoldRouter's sequence-scope routing, aux losses, z-loss, token counts and expert-bias counts are the
same under every attention TP x CP layout (DP replicas get their own micro-batches): each rank's rows equal the single-rank rows of its tokens,
and gradients summed over the ranks equal the single-rank gradient of the same micro-batch."""

import pytest
import torch
import torch.distributed as dist

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.router import FoldRouter
from megatron_fold.token_order import shard_sequence
from tests import moe_reference as ref
from tests.multirank import run_on_ranks

S, B, H = 16, 2, 16

LAYOUTS = [dict(tp=2), dict(cp=2), dict(tp=2, cp=2), dict(tp=4, cp=2), dict(tp=2, cp=4)]
CONFIGS = {
    "probs-top2-e8": dict(moe_expert_capacity_factor=1.0),
    "position-top1-e64": dict(num_moe_experts=64, moe_router_topk=1, moe_router_pre_softmax=True,
                              moe_expert_capacity_factor=0.5, moe_token_drop_policy="position"),
    "probs-top8-e64-aux+z": dict(num_moe_experts=64, moe_router_topk=8, moe_expert_capacity_factor=1.0,
                                 moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1,
                                 moe_z_loss_coeff=0.01),
    "seq-aux": dict(moe_expert_capacity_factor=0.5, moe_router_load_balancing_type="seq_aux_loss",
                    moe_aux_loss_coeff=0.1),
    "sigmoid-expert-bias": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                moe_expert_capacity_factor=1.0),
    "global-aux": dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1),
}


def _inputs(replica, experts):
    g = torch.Generator().manual_seed(50 + replica)
    return torch.randn(S, B, H, generator=g), torch.randn(S, B, experts, generator=g)


def _route(layout, pgs, name, x, r):
    config = ref.make_moe_config(layout, hidden_size=H, **CONFIGS[name])
    torch.manual_seed(0)
    router = FoldRouter(config, pg_collection=pgs, drop_scope="sequence")
    router.set_layer_number(1)
    router.train()
    x = x.clone().requires_grad_(True)
    probs, routing_map = router(x)
    (probs * r.reshape(-1, config.num_moe_experts)).sum().backward()
    bias_counts = None if router.local_tokens_per_expert is None else router.local_tokens_per_expert.clone()
    return (probs.detach(), routing_map, x.grad, router.weight.grad.clone(), router.token_counts()[1],
            bias_counts)


def _single(rank, world_size, replicas):
    layout = FoldedLayout(1)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        return {name: [_route(layout, pgs, name, *_inputs(rep, ref.make_moe_config(layout, **CONFIGS[name]).num_moe_experts))
                       for rep in range(replicas)] for name in CONFIGS}
    finally:
        parallel_state.destroy_model_parallel()


def _multi(rank, world_size, layout_kwargs):
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        c = layout.rank_coords(rank)
        out = {}
        for name in CONFIGS:
            if name == "global-aux" and layout.dp > 1:
                continue  # global aux loss pools DP replicas: compared on DP = 1 layouts only
            experts = ref.make_moe_config(layout, **CONFIGS[name]).num_moe_experts
            x, r = (shard_sequence(t, c["tp"], layout.tp, c["cp"], layout.cp) for t in _inputs(c["dp"], experts))
            probs, routing_map, gx, gw, tokens, bias_counts = _route(layout, pgs, name, x, r)
            dist.all_reduce(gw, group=pgs.tp_cp)  # sequence-parallel router weight: sum over TP x CP
            if bias_counts is not None:  # Megatron reduces these over TP x DP x CP; per replica: TP x CP
                dist.all_reduce(bias_counts, group=pgs.tp_cp)
            out[name] = (probs, routing_map, gx, gw, tokens, bias_counts)
        return out
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("layout_kwargs", LAYOUTS, ids=["-".join(f"{k}{v}" for k, v in kw.items()) for kw in LAYOUTS])
def test_layout_invariance(layout_kwargs):
    layout = FoldedLayout(8, **layout_kwargs)
    single = run_on_ranks(_single, 1, layout.dp, timeout=120)[0]
    for rank, results in enumerate(run_on_ranks(_multi, 8, layout_kwargs, timeout=120)):
        c = layout.rank_coords(rank)
        shard = lambda t: shard_sequence(t.reshape(S, B, -1), c["tp"], layout.tp, c["cp"], layout.cp).reshape(-1, t.shape[-1])  # noqa: E731
        for name, (probs, routing_map, gx, gw, tokens, bias_counts) in results.items():
            r_probs, r_map, r_gx, r_gw, r_tokens, r_bias = single[name][c["dp"]]
            where = f"rank {rank} {name}"
            assert torch.equal(routing_map, shard(r_map)), where
            torch.testing.assert_close(probs, shard(r_probs), rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(gx, shard_sequence(r_gx, c["tp"], layout.tp, c["cp"], layout.cp),
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} input grad: {m}")
            torch.testing.assert_close(gw, r_gw, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} weight grad: {m}")
            assert torch.equal(tokens, r_tokens), where
            if bias_counts is not None:
                # Megatron's expert-bias update is a function of these counts alone
                # (get_updated_expert_bias: bias += rate * sign(mean - count)).
                assert torch.equal(bias_counts, r_bias), where


def _no_sequence_parallel(rank, world_size):
    """TP 2 without sequence parallelism (evaluation): TP ranks hold the same tokens."""
    layout = FoldedLayout(world_size, tp=2, cp=2)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        c = layout.rank_coords(rank)
        config = ref.make_moe_config(layout, hidden_size=H, sequence_parallel=False, **CONFIGS["probs-top2-e8"])
        torch.manual_seed(0)  # the single-rank reference's router weights
        router = FoldRouter(config, pg_collection=pgs, drop_scope="sequence")
        router.set_layer_number(1)
        x, _ = _inputs(c["dp"], 8)
        probs, routing_map = router(shard_sequence(x, 0, 1, c["cp"], layout.cp))
        return routing_map, router.token_counts()[1]
    finally:
        parallel_state.destroy_model_parallel()


def test_tensor_parallel_without_sequence_parallel():
    layout = FoldedLayout(8, tp=2, cp=2)
    single = run_on_ranks(_single, 1, layout.dp, timeout=120)[0]["probs-top2-e8"]
    for rank, (routing_map, tokens) in enumerate(run_on_ranks(_no_sequence_parallel, 8, timeout=120)):
        c = layout.rank_coords(rank)
        r_map, r_tokens = single[c["dp"]][1], single[c["dp"]][4]
        expected = shard_sequence(r_map.reshape(S, B, -1), 0, 1, c["cp"], layout.cp).reshape(-1, 8)
        assert torch.equal(routing_map, expected), rank
        assert torch.equal(tokens, r_tokens), rank  # TP copies are not counted twice
