"""FoldMoELayer on 8 folded ranks equals a single-rank run of the same layer with the same full weights.

Each data-parallel replica (a (DP, PP) coordinate: PP stages here hold independent copies of the layer)
gets its own micro-batch, sharded over CP and TP the way Megatron shards it (Megatron's own
get_batch_on_this_cp_rank and torch.chunk: moe_reference.shard_like_megatron). Checked per rank: the
output rows and input gradients of its shard equal the single-rank run of its micro-batch. Checked per
parameter: after reducing each gradient over the group Megatron reduces it over (EDP for experts,
TP x DP x CP for sequence-parallel replicated parameters: router weight, shared-expert gate; DP x CP
otherwise; megatron_fold.testing.moe_reference.reduce_grads_like_megatron) and reassembling the shards, it equals the
sum of the single-rank gradients over the micro-batches of that PP stage. Each rank also builds every
config twice: outputs and all gradients must be bitwise equal (determinism).
"""

import copy
import dataclasses

import pytest
import torch

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.specs import get_fold_moe_module_spec
from megatron_fold.testing import moe_reference as ref
from megatron_fold.testing.multirank import run_on_ranks, rank_device

SEQ, BATCH, HIDDEN = 16, 2, 16

# TP x CP = 8: the configs with 8-token micro-batches hold one token per rank.
ONE_TOKEN_PER_RANK = "tp2-cp4-ep8-etp1"

# (name, layout kwargs) on 8 ranks; all fold the expert grid differently from the attention grid.
LAYOUTS = [
    ("tp2-ep4-etp1", dict(tp=2, ep=4, etp=1)),
    ("cp2-ep4", dict(cp=2, ep=4, etp=1)),
    ("tp2-cp2-ep2-etp2", dict(tp=2, cp=2, ep=2, etp=2)),
    ("tp2-ep8-etp1", dict(tp=2, ep=8, etp=1)),          # EP 8 larger than DP 4
    ("etp2-ep4", dict(tp=1, ep=4, etp=2)),
    ("ep8", dict(ep=8)),
    ("tp4-ep2-etp1", dict(tp=4, ep=2, etp=1)),
    ("cp4-ep8", dict(cp=4, ep=8, etp=1)),
    ("tp2-cp2-ep4-etp1", dict(tp=2, cp=2, ep=4, etp=1)),
    ("tp2-pp2-ep4-etp1", dict(tp=2, pp=2, ep=4, etp=1)),
    ("cp2-pp2-ep2-etp2", dict(cp=2, pp=2, ep=2, etp=2)),
    ("pp2-ep4", dict(pp=2, ep=4)),
    ("tp2-etp1-ep1", dict(tp=2, ep=1, etp=1)),          # EP 1, ETP != TP
    (ONE_TOKEN_PER_RANK, dict(tp=2, cp=4, ep=8, etp=1)),
]

# Routing configurations run under every layout (one 8-rank run per layout covers them all).
CONFIGS = [
    dict(num_moe_experts=8, moe_router_topk=1, moe_router_pre_softmax=True),
    dict(num_moe_experts=8, moe_router_topk=2, shared=True),
    dict(num_moe_experts=8, moe_router_topk=8, shared=True),
    dict(num_moe_experts=64, moe_router_topk=8),
    dict(num_moe_experts=8, moe_router_topk=2, moe_expert_capacity_factor=1.0, drop_scope="sequence"),
    dict(num_moe_experts=64, moe_router_topk=2, moe_expert_capacity_factor=0.5, drop_scope="sequence",
         moe_token_drop_policy="position", shared=True),
    dict(num_moe_experts=8, moe_router_topk=2, moe_expert_capacity_factor=1.0, drop_scope="sequence",
         moe_pad_expert_input_to_capacity=True),
    dict(num_moe_experts=64, moe_router_topk=1, moe_router_pre_softmax=True, moe_expert_capacity_factor=2.0,
         drop_scope="sequence"),
    # Mixtral / Qwen2-MoE experts (SwiGLU) with top-8 dropping and a gated shared expert.
    dict(num_moe_experts=64, moe_router_topk=8, moe_expert_capacity_factor=1.0, drop_scope="sequence",
         swiglu=True, shared=True, moe_shared_expert_gate=True),
    # Load balancing through the whole layer: aux loss and z-loss gradients reach the router weight.
    dict(num_moe_experts=8, moe_router_topk=1, moe_router_pre_softmax=True, moe_expert_capacity_factor=1.0,
         drop_scope="sequence", moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01),
    # Edge cases, on 8 tokens per micro-batch (1 per rank where TP x CP = 8): most of 64 experts get no
    # token anywhere, and some EP ranks receive none;
    dict(num_moe_experts=64, moe_router_topk=1, moe_router_pre_softmax=True, seq=8, batch=1,
         edge="idle-experts"),
    # capacity 1 per (sequence, expert): ranks whose only token is dropped send nothing at all;
    dict(num_moe_experts=8, moe_router_topk=1, moe_router_pre_softmax=True, moe_expert_capacity_factor=0.5,
         drop_scope="sequence", seq=8, batch=1, edge="silent-ranks"),
    # everything dropped but one token per (sequence, expert), padded to static blocks.
    dict(num_moe_experts=8, moe_router_topk=2, moe_expert_capacity_factor=0.25, drop_scope="sequence",
         moe_pad_expert_input_to_capacity=True, edge="one-per-expert"),
]
# What the edge-case configs must really exercise: on the single-rank reference (its metrics) ...
_EDGE_IN_REFERENCE = {
    "idle-experts": lambda m: sum(t == 0 for t in m.tokens_per_expert) >= 56,  # 8 tokens, 64 experts
    "silent-ranks": lambda m: m.dropped_fraction > 0 and max(m.tokens_per_expert) == 1,
    # at most one token per expert in each of the 2 sequences; 64 routed pairs, at most 16 kept
    "one-per-expert": lambda m: max(m.tokens_per_expert) == 2 and m.dropped_fraction >= 0.75,
}
# ... and on the layout with one token per rank, per rank (rows received by its experts, rows sent).
_EDGE_ON_RANKS = {
    "idle-experts": lambda received, sent: 0 in received,
    "silent-ranks": lambda received, sent: 0 in sent,
}


def _micro_batch(replica: int, cfg: dict):
    g = torch.Generator().manual_seed(1000 + replica)
    shape = (cfg.get("seq", SEQ), cfg.get("batch", BATCH), HIDDEN)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(*shape, generator=g)  # loss = sum(out * w): a non-trivial output gradient
    return x.to(rank_device()), w.to(rank_device())


def _build(cfg_kwargs, layout, pgs, weights, check_finite=False):
    cfg_kwargs = {k: v for k, v in cfg_kwargs.items() if k not in ("seq", "batch", "edge")}
    shared = cfg_kwargs.pop("shared", False)
    swiglu = cfg_kwargs.pop("swiglu", False)
    drop_scope = cfg_kwargs.pop("drop_scope", "subsequence")
    config = ref.make_moe_config(layout=layout, hidden_size=HIDDEN, shared_expert=shared, swiglu=swiglu,
                                 **cfg_kwargs)
    builder = get_fold_moe_module_spec(use_te=False, num_experts=config.num_moe_experts, drop_scope=drop_scope,
                                       check_finite=check_finite)
    layer = builder(config=config, pg_collection=pgs).to(rank_device())
    layer.set_layer_number(1)
    if weights is None:
        weights = ref.full_moe_weights(config, seed=7)
    ref.load_full_weights(layer, weights, pgs)
    return layer, weights


def _to_cpu(tensors: dict) -> dict:
    """Results cross processes on the CPU (the parent must not touch CUDA in the 8-GPU smoke test)."""
    return {k: v.cpu() for k, v in tensors.items()}


def _run(layer, x, w):
    x = x.clone().requires_grad_(True)
    out, bias = layer(x)
    assert bias is None
    (out * w).sum().backward()
    return out.detach(), x.grad.detach()


def _single_rank(rank, world_size, num_replicas):
    """Per config: full weights, and per micro-batch the output, input grad and full parameter grads."""
    layout = FoldedLayout(1)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        results = []
        for cfg in CONFIGS:
            per_batch = []
            layer, weights = _build(cfg, layout, pgs, None)
            for replica in range(num_replicas):
                layer.zero_grad()
                x, w = _micro_batch(replica, cfg)
                out, gx = _run(layer, x, w)
                per_batch.append((out.cpu(), gx.cpu(), _to_cpu(ref.gather_full_grads(layer, pgs)), layer.metrics()))
            results.append((weights, per_batch))
        return results
    finally:
        parallel_state.destroy_model_parallel()


def _multi_rank(rank, world_size, layout_kwargs, reference):
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        c = layout.rank_coords(rank)
        replica = c["dp"] * layout.pp + c["pp"]
        results = []
        for cfg, (weights, _) in zip(CONFIGS, reference):
            layer, _ = _build(cfg, layout, pgs, weights)
            x, w = _micro_batch(replica, cfg)
            # Megatron's own CP split and torch.chunk over TP, not megatron_fold.moe.token_order (the router's).
            shard = lambda t: ref.shard_like_megatron(t, pgs.tp.rank(), pgs.tp.size(), pgs.cp)  # noqa: E731
            positions = shard(torch.arange(x.shape[0], device=x.device)[:, None])[:, 0].cpu()  # this rank's rows
            out, gx = _run(layer, shard(x), shard(w))
            # Determinism: a second layer from the same weights and inputs gives bitwise the same output,
            # input gradient and parameter gradients.
            again, _ = _build(cfg, layout, pgs, weights)
            out2, gx2 = _run(again, shard(x), shard(w))
            assert torch.equal(out2, out) and torch.equal(gx2, gx), f"rank {rank} {cfg}: nondeterministic output"
            for (name, p), (_, q) in zip(layer.named_parameters(), again.named_parameters()):
                assert (p.grad is None) == (q.grad is None), name
                assert p.grad is None or torch.equal(p.grad, q.grad), f"rank {rank} {cfg}: nondeterministic grad {name}"
            ref.reduce_grads_like_megatron(layer, pgs)
            # Rows this rank's experts received, and rows it sent to experts (padding excluded here).
            traffic = (int(layer.token_dispatcher.last_tokens_per_local_expert.sum()),
                       sum(layer.token_dispatcher._send))
            results.append((out.cpu(), gx.cpu(), _to_cpu(ref.gather_full_grads(layer, pgs)), layer.metrics(), positions,
                            traffic))
        return results
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("name,layout_kwargs", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_matches_single_rank(name, layout_kwargs):
    layout = FoldedLayout(8, **layout_kwargs)
    num_replicas = layout.dp * layout.pp
    reference = run_on_ranks(_single_rank, 1, num_replicas, timeout=300)[0]
    for i, (cfg, (_, per_batch)) in enumerate(zip(CONFIGS, reference)):
        for *_, metrics in per_batch:  # a dropping config that drops nothing would test nothing
            if "moe_expert_capacity_factor" in cfg:
                assert metrics.dropped_fraction > 0, (i, cfg)
            if "edge" in cfg:
                assert _EDGE_IN_REFERENCE[cfg["edge"]](metrics), (i, cfg, metrics)
    per_rank = run_on_ranks(_multi_rank, 8, layout_kwargs, reference, timeout=300)
    if name == ONE_TOKEN_PER_RANK:
        for i, cfg in enumerate(CONFIGS):
            if cfg.get("edge") in _EDGE_ON_RANKS:
                received, sent = zip(*(results[i][-1] for results in per_rank))
                assert _EDGE_ON_RANKS[cfg["edge"]](received, sent), (cfg, received, sent)
    tol = dict(rtol=1e-5, atol=1e-5)
    for rank, results in enumerate(per_rank):
        c = layout.rank_coords(rank)
        replica = c["dp"] * layout.pp + c["pp"]
        for cfg, (weights, per_batch), (out, gx, grads, metrics, positions, _) in zip(CONFIGS, reference, results):
            ref_out, ref_gx, _, ref_metrics = per_batch[replica]
            shard = lambda t: t.index_select(0, positions)  # noqa: E731
            # Tokens per expert and the drop rate describe the replica's whole micro-batch: layout-free.
            assert metrics.tokens_per_expert == ref_metrics.tokens_per_expert, (rank, cfg)
            assert abs(metrics.dropped_fraction - ref_metrics.dropped_fraction) < 1e-12, (rank, cfg)
            torch.testing.assert_close(out, shard(ref_out), **tol, msg=lambda m: f"rank {rank} {cfg} output: {m}")
            torch.testing.assert_close(gx, shard(ref_gx), **tol, msg=lambda m: f"rank {rank} {cfg} input grad: {m}")
            stage = [per_batch[dp * layout.pp + c["pp"]][2] for dp in range(layout.dp)]
            for key, g in grads.items():
                expected = sum(s[key] for s in stage)
                torch.testing.assert_close(g, expected, **tol, msg=lambda m: f"rank {rank} {cfg} grad {key}: {m}")


def _nan_and_globals(rank, world_size):
    layout = FoldedLayout(world_size, tp=2, ep=4, etp=1)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        layer, _ = _build(CONFIGS[1], layout, pgs, None, check_finite=True)  # off by default: no host sync
        layer.set_layer_number(12)
        x = torch.randn(SEQ // 2, BATCH, HIDDEN)
        if rank == 5:
            x[0, 0, 0] = float("nan")
        try:
            layer(x)
            error = None
        except Exception as e:  # noqa: BLE001 - the message is what we check
            error = f"{type(e).__name__}: {e}"
        builder = get_fold_moe_module_spec(use_te=False, num_experts=8)
        refusals = []
        without_ep = copy.copy(pgs)
        without_ep.ep = None
        wrong_ep = dataclasses.replace(layer.config, expert_model_parallel_size=2)
        for kwargs in (dict(config=layer.config), dict(config=layer.config, pg_collection=without_ep),
                       dict(config=wrong_ep, pg_collection=pgs)):
            try:
                builder(**kwargs)
                refusals.append(None)
            except ValueError as e:
                refusals.append(str(e))
        # The default (check_finite=False) lets the NaN through (the output is NaN, nothing raises); metrics=False
        # makes metrics() an error instead of stale numbers.
        unchecked = get_fold_moe_module_spec(use_te=False, num_experts=8, metrics=False)(
            config=layer.config, pg_collection=pgs)
        unchecked.set_layer_number(1)
        ref.load_full_weights(unchecked, ref.full_moe_weights(layer.config, seed=7), pgs)
        out, _ = unchecked(x)
        try:
            unchecked.metrics()
            metrics_off = None
        except RuntimeError as e:
            metrics_off = str(e)
        return error, refusals, bool(torch.isnan(out).any()), metrics_off
    finally:
        parallel_state.destroy_model_parallel()


def test_non_finite_router_scores_and_missing_groups_are_errors():
    # One rank's NaN raises on every rank of the stage (no rank is left blocked in a collective).
    results = run_on_ranks(_nan_and_globals, 8, timeout=60)
    for rank, (error, refusals, nan_out, metrics_off) in enumerate(results):
        local = 1 if rank == 5 else 0
        assert error == (f"NonFiniteRouterScores: MoE layer 12: router scores are NaN or infinite for {local} of 16 "
                         "tokens on this rank (1 on the ranks of this pipeline stage): diverged training or bad "
                         "input; pass check_finite=False to the spec to skip this check")
        no_pgs, no_ep, wrong_ep = refusals
        assert "FoldMoELayer needs the folded ProcessGroupCollection" in no_pgs
        assert "ProcessGroupCollection lacks ['ep']" in no_ep
        assert "expert_model_parallel_size = 2 but pg_collection.ep has 4 ranks" in wrong_ep
        # Unchecked, the NaN stays in its own token's row: only rank 5's output holds it.
        assert nan_out == (rank == 5)
        assert metrics_off == ("MoE layer 1: metrics are off (spec parameter metrics=False, i.e. "
                               "FoldRouter(record_token_counts=False))")
