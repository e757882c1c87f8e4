"""Sequence-scope FoldRouter is layout-invariant: on 8 gloo ranks under attention TP x CP layouts (sequence
parallelism on; DP replicas each route their own micro-batch), every rank's probs, routing map and input
gradient equal the single-rank rows of its tokens; the router-weight gradient, tokens-per-expert
metrics, aux losses, z-loss (logged with upstream's reductions) and the expert-bias update equal the
single-rank values.

References: "replica" cases run one single-rank forward per DP replica's micro-batch (aux_loss,
seq_aux_loss and z-loss normalise per micro-batch); "pooled" cases run one single-rank forward on all
replicas' micro-batches side by side in the batch dimension, which is what global_aux_loss and the
expert-bias update (both reduced over TP x DP x CP upstream) see. Sequence-scope drops are decided per
sequence, so they are the same either way. Each rank's input rows, and the positions compared with the
single-rank rows, are cut by Megatron's own CP split and torch.chunk over TP (moe_reference.shard_like_megatron),
never by megatron_fold.moe.token_order, which the router itself uses to put gathered tokens in order.
"""

import pytest
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker, get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.moe.router import FoldRouter, NonFiniteRouterScores
from megatron_fold.testing import moe_reference as ref
from megatron_fold.testing.multirank import run_on_ranks

S, B, H = 16, 2, 16
MAX_DP = 4

LAYOUTS = [dict(tp=2), dict(cp=2), dict(tp=2, cp=2), dict(tp=4, cp=2), dict(tp=2, cp=4)]
CASES = {  # name: (reference, config overrides); every case drops tokens with sequence scope
    "probs-top2-e8-aux+z": ("replica", dict(moe_expert_capacity_factor=1.0, moe_router_load_balancing_type="aux_loss",
                                            moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)),
    "position-top1-e64-seq-aux": ("replica", dict(num_moe_experts=64, moe_router_topk=1, moe_router_pre_softmax=True,
                                                  moe_expert_capacity_factor=1.0, moe_token_drop_policy="position",
                                                  moe_router_load_balancing_type="seq_aux_loss",
                                                  moe_aux_loss_coeff=0.1)),
    "probs-top1-e64": ("replica", dict(num_moe_experts=64, moe_router_topk=1, moe_router_pre_softmax=True,
                                       moe_expert_capacity_factor=2.0)),
    "position-top2-e8": ("replica", dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy="position")),
    "position-top2-e64": ("replica", dict(num_moe_experts=64, moe_expert_capacity_factor=1.0,
                                          moe_token_drop_policy="position")),
    "probs-top1-e8-sigmoid": ("replica", dict(moe_router_topk=1, moe_router_score_function="sigmoid",
                                              moe_expert_capacity_factor=1.0)),
    "probs-top2-e64-pad": ("replica", dict(num_moe_experts=64, moe_expert_capacity_factor=1.0,
                                           moe_pad_expert_input_to_capacity=True)),
    "probs-top2-e8-exact-ties": ("replica", dict(moe_expert_capacity_factor=0.5)),
    "sigmoid-expert-bias": ("pooled", dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                           moe_expert_capacity_factor=1.0)),
    "probs-top2-e6-uneven-shares": ("replica", dict(num_moe_experts=6, moe_expert_capacity_factor=1.0)),
    "position-top1-e3-fewer-than-members": ("replica", dict(num_moe_experts=3, moe_router_topk=1, moe_router_pre_softmax=True,
                                                            moe_expert_capacity_factor=1.0,
                                                            moe_token_drop_policy="position")),
    "global-aux": ("pooled", dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1,
                                  moe_expert_capacity_factor=0.5)),
}


def _config(layout, name, **extra):
    return ref.make_moe_config(layout, hidden_size=H, **CASES[name][1], **extra)


def _experts(name):
    return CASES[name][1].get("num_moe_experts", 8)


def _weight(name):
    """Router weight; quarters for the tie case, so logits are exact in any summation order."""
    g = torch.Generator().manual_seed(100 + list(CASES).index(name))
    if name.endswith("exact-ties"):
        return torch.randint(-2, 3, (_experts(name), H), generator=g).float() / 4
    return torch.randn(_experts(name), H, generator=g) * 0.5


def _inputs(name, replica):
    """One replica's micro-batch x [S, B, H] and output weights r [S, B, E] of the test loss sum(probs * r)."""
    g = torch.Generator().manual_seed(1000 * list(CASES).index(name) + replica)
    if name.endswith("exact-ties"):  # tokens repeat (a pool of 4): equal probabilities compete for slots
        pool = torch.randint(-1, 2, (4, H), generator=g).float()
        x = pool[torch.randint(0, 4, (S, B), generator=g)]
    else:
        x = torch.randn(S, B, H, generator=g)
    return x, torch.randn(S, B, _experts(name), generator=g)


def _logged_like_upstream(pgs):
    """Logged losses reduced as MoEMetricsTracker._sync_metrics does: sum over the entry's reduce_group,
    mean over its avg_group, then mean over DP when needs_dp_avg (gloo has no AVG: sum / size)."""
    out = {}
    for name, entry in get_moe_metrics_tracker().metrics.items():
        value = entry.values.clone()
        if entry.reduce_group is not None:
            dist.all_reduce(value, group=entry.reduce_group)
        if entry.avg_group is not None:
            dist.all_reduce(value, group=entry.avg_group)
            value /= dist.get_world_size(entry.avg_group)
        if entry.needs_dp_avg:
            dist.all_reduce(value, group=pgs.dp)
            value /= dist.get_world_size(pgs.dp)
        out[name] = value
    return out


def _route(layout, pgs, name, x, r, grad_group):
    """Forward + backward on this rank's tokens; reductions as Megatron's training loop does them."""
    config = _config(layout, name)
    router = FoldRouter(config, pg_collection=pgs, drop_scope="sequence")
    with torch.no_grad():
        router.weight.copy_(_weight(name))
        if config.moe_router_enable_expert_bias:
            router.expert_bias.copy_(torch.linspace(-0.05, 0.05, config.num_moe_experts))
    router.set_layer_number(1)
    router.train()
    destroy_moe_metrics_tracker()
    x = x.clone().requires_grad_(True)
    probs, routing_map = router(x)
    (probs * r.reshape(-1, config.num_moe_experts)).sum().backward()
    gw = router.weight.grad.clone()
    dist.all_reduce(gw, group=grad_group)  # the sequence-parallel router weight's gradient reduction
    counts = torch.stack([router.last_tokens_per_expert_before_drop, router.last_tokens_per_expert])  # [2, E]
    counts_all_replicas = counts.clone()
    dist.all_reduce(counts_all_replicas, group=pgs.dp)
    out = dict(probs=probs.detach(), map=routing_map, gx=x.grad, gw=gw, counts=counts,
               counts_all_replicas=counts_all_replicas, dropped=router.last_dropped_fraction.clone(),
               logged=_logged_like_upstream(pgs), comm=(dict(router.comm_counter.calls),
                                                         dict(router.comm_counter.bytes_sent)))
    if config.moe_router_enable_expert_bias:  # what finalize_model_grads does at the end of the step
        tokens = router.local_tokens_per_expert.clone()
        out["bias"] = get_updated_expert_bias(tokens, router.expert_bias, config.moe_router_bias_update_rate,
                                              tp_dp_cp_group=pgs.tp_dp_cp)
        out["bias_tokens"] = tokens  # all-reduced over TP x DP x CP in place
    return out


def _single(rank, world_size):
    layout = FoldedLayout(1)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        out = {}
        for name, (kind, _) in CASES.items():
            if kind == "replica":
                out[name] = [_route(layout, pgs, name, *_inputs(name, d), pgs.tp_cp) for d in range(MAX_DP)]
            else:  # keyed by the number of replicas pooled side by side in the batch dimension
                out[name] = {dp: _route(layout, pgs, name,
                                        *(torch.cat(t, dim=1) for t in zip(*(_inputs(name, d) for d in range(dp)))),
                                        pgs.tp_cp)
                             for dp in (1, 2, 4)}
        return out
    finally:
        parallel_state.destroy_model_parallel()


def _shard(t, pgs, sequence_parallel=True):
    """This rank's rows of a full [S, B, ...] tensor, cut by Megatron's CP split and torch.chunk over TP
    (not by megatron_fold.moe.token_order, which the router uses)."""
    tp = pgs.tp.size() if sequence_parallel else 1
    return ref.shard_like_megatron(t, pgs.tp.rank() if sequence_parallel else 0, tp, pgs.cp)


def _multi(rank, world_size, layout_kwargs):
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        c = layout.rank_coords(rank)
        out = {}
        for name, (kind, _) in CASES.items():
            x, r = (_shard(t, pgs) for t in _inputs(name, c["dp"]))
            out[name] = _route(layout, pgs, name, x, r, pgs.tp_cp if kind == "replica" else pgs.tp_dp_cp)
        return dict(cases=out, positions=_shard(torch.arange(S)[:, None], pgs)[:, 0])
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def single():
    return run_on_ranks(_single, 1, timeout=120)[0]


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("layout_kwargs", LAYOUTS, ids=["-".join(f"{k}{v}" for k, v in kw.items()) for kw in LAYOUTS])
def test_sequence_scope_is_layout_invariant(single, layout_kwargs):
    layout = FoldedLayout(8, **layout_kwargs)
    results = run_on_ranks(_multi, 8, layout_kwargs, timeout=120)
    for rank, result in enumerate(results):
        c = layout.rank_coords(rank)
        positions = result["positions"]  # the sequence positions of this rank's rows, as Megatron cuts them

        for name, got in result["cases"].items():
            kind = CASES[name][0]
            want = single[name][c["dp"]] if kind == "replica" else single[name][layout.dp]
            columns = slice(0, B) if kind == "replica" else slice(c["dp"] * B, (c["dp"] + 1) * B)

            def mine(t):  # this rank's rows of a single-rank tensor [S*B', ...] or [S, B', ...]
                full = t.reshape(S, -1, *t.shape[(2 if t.dim() == 3 else 1):])[:, columns]
                return full.index_select(0, positions)

            where = f"rank {rank} {name}"
            E = _experts(name)
            assert torch.equal(got["map"], mine(want["map"]).reshape(-1, E)), where
            _close(got["probs"], mine(want["probs"]).reshape(-1, E), f"{where} probs")
            _close(got["gx"], mine(want["gx"]), f"{where} input grad")
            _close(got["gw"], want["gw"], f"{where} router weight grad")
            if kind == "replica":
                assert torch.equal(got["counts"], want["counts"]), where
                assert got["dropped"].item() == want["dropped"].item(), where
            else:
                assert torch.equal(got["counts_all_replicas"], want["counts"]), where
            assert got["logged"].keys() == want["logged"].keys(), where
            for loss, value in got["logged"].items():
                if kind == "replica":  # upstream's DP mean of the replicas' micro-batch losses
                    expected = torch.stack([single[name][d]["logged"][loss] for d in range(layout.dp)]).mean(dim=0)
                else:
                    expected = want["logged"][loss]
                _close(value, expected, f"{where} logged {loss}")
            if "bias" in want:
                assert torch.equal(got["bias_tokens"], want["bias_tokens"]), where
                assert torch.equal(got["bias"], want["bias"]), where


def test_losses_and_drops_are_exercised(single):
    """Guards the invariance test against vacuity: each case drops tokens and logs the losses it names."""
    for name, (kind, overrides) in CASES.items():
        runs = single[name] if kind == "replica" else list(single[name].values())
        assert all(run["counts"][1].sum() < run["counts"][0].sum() for run in runs), f"{name}: nothing dropped"
        logged = set(runs[0]["logged"])
        expected = {"load_balancing_loss"} if overrides.get("moe_router_load_balancing_type") == "aux_loss" else set()
        expected |= {"z_loss"} if overrides.get("moe_z_loss_coeff") else set()
        expected |= {"seq_load_balancing_loss"} if "seq-aux" in name else set()
        expected |= {"global_load_balancing_loss"} if "global-aux" in name else set()
        assert logged == expected, name
    biases = single["sigmoid-expert-bias"]
    assert not torch.equal(biases[4]["bias"], biases[1]["bias"])  # pooled counts move the bias differently


def test_sequence_scope_collectives(single):
    """One all-gather of E floats per token and one of the kept sets' thresholds (B x ceil(E/G) x 2 plus
    2 x ceil(E/G) float64 per member), plus a one-time coordinate gather; the finite check is off by
    default; token counts travel with the thresholds, without a collective of their own."""
    layout = FoldedLayout(8, tp=2, cp=2)
    results = run_on_ranks(_multi, 8, dict(tp=2, cp=2), timeout=120)
    for rank, result in enumerate(results):
        calls, sent = result["cases"]["probs-top2-e8-aux+z"]["comm"]
        local_tokens = S // (layout.tp * layout.cp) * B
        G = layout.tp * layout.cp
        assert calls == {"all_gather_coords": 1, "all_gather_scores": 1, "all_gather_drop_thresholds": 1}, rank
        assert sent["all_gather_scores"] == local_tokens * 8 * 4 * (G - 1), rank
        assert sent["all_gather_drop_thresholds"] == (B * (8 // G) * 2 + 2 * (8 // G)) * 8 * (G - 1), rank


# ---- without sequence parallelism, subsequence scope, non-finite logits ----------------------------------

def _no_sequence_parallel(rank, world_size):
    """TP 2 without sequence parallelism (evaluation): TP ranks hold the same tokens, CP splits them."""
    layout = FoldedLayout(world_size, tp=2, cp=2)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        c = layout.rank_coords(rank)
        name = "position-top2-e8"
        router = FoldRouter(_config(layout, name, sequence_parallel=False), pg_collection=pgs, drop_scope="sequence")
        with torch.no_grad():
            router.weight.copy_(_weight(name))
        router.set_layer_number(1)
        x, _ = _inputs(name, c["dp"])
        probs, routing_map = router(_shard(x, pgs, sequence_parallel=False))
        return routing_map, router.last_tokens_per_expert, _shard(torch.arange(S)[:, None], pgs, False)[:, 0]
    finally:
        parallel_state.destroy_model_parallel()


def test_tensor_parallel_without_sequence_parallel(single):
    layout = FoldedLayout(8, tp=2, cp=2)
    for rank, (routing_map, tokens, positions) in enumerate(run_on_ranks(_no_sequence_parallel, 8, timeout=120)):
        c = layout.rank_coords(rank)
        want = single["position-top2-e8"][c["dp"]]
        assert torch.equal(routing_map, want["map"].reshape(S, B, -1).index_select(0, positions).reshape(-1, 8)), rank
        assert torch.equal(tokens, want["counts"][1]), rank  # TP copies are not counted twice


def _subsequence(rank, world_size):
    layout = FoldedLayout(world_size, tp=2, cp=2)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        c = layout.rank_coords(rank)
        name = "probs-top2-e8-exact-ties"
        router = FoldRouter(_config(layout, name), pg_collection=pgs)  # subsequence scope, Megatron's semantics
        with torch.no_grad():
            router.weight.copy_(_weight(name))
        router.set_layer_number(1)
        x, _ = _inputs(name, c["dp"])
        probs, routing_map = router(_shard(x, pgs))
        return routing_map, router.last_tokens_per_expert, router.last_tokens_per_expert_before_drop
    finally:
        parallel_state.destroy_model_parallel()


def test_subsequence_token_counts_sum_the_replica(single):
    """Subsequence scope drops per rank (layout-dependent) but still reports the replica's whole count."""
    layout = FoldedLayout(8, tp=2, cp=2)
    results = run_on_ranks(_subsequence, 8, timeout=120)
    for d in range(layout.dp):
        replica = [r for r in range(8) if layout.rank_coords(r)["dp"] == d]
        kept = sum(results[r][0].sum(dim=0) for r in replica)
        for r in replica:
            assert torch.equal(results[r][1], kept), r
            assert torch.equal(results[r][2], single["probs-top2-e8-exact-ties"][d]["counts"][0]), r
    # The sequence scope keeps a different set: the two scopes really differ on this input.
    sequence_kept = single["probs-top2-e8-exact-ties"]
    assert any(not torch.equal(results[r][1], sequence_kept[layout.rank_coords(r)["dp"]]["counts"][1]) for r in range(8))


def _one_rank_nan(rank, world_size):
    layout = FoldedLayout(world_size, tp=2, cp=2)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        router = FoldRouter(_config(layout, "position-top2-e8"), pg_collection=pgs, drop_scope="sequence",
                            check_finite=True)
        router.set_layer_number(4)
        x = torch.randn(S // 4, B, H)
        if rank == 5:
            x[1, 0, 3] = float("nan")
        try:
            router(x)
        except NonFiniteRouterScores as e:
            return str(e)
        return None
    finally:
        parallel_state.destroy_model_parallel()


def test_one_rank_non_finite_raises_on_every_rank():
    for rank, error in enumerate(run_on_ranks(_one_rank_nan, 8, timeout=60)):
        local = 1 if rank == 5 else 0
        assert error is not None and error.startswith(
            f"MoE layer 4: router scores are NaN or infinite for {local} of 8 tokens on this rank "
            "(1 on the ranks of this pipeline stage)"), (rank, error)
