"""Megatron MoE flags on 8 folded gloo ranks.

1. Flags that change how, not what, FoldMoELayer computes give equal outputs, input gradients and
   parameter gradients on vs off, rank by rank: moe_shared_expert_overlap (Megatron's overlapped
   shared-expert stages driven by FlexFoldDispatcher around its all-to-alls, with TP > 1 so that the
   shared expert's own sequence-parallel gather and reduce-scatter run in those stages), router and
   permute fusion (the portable path on CPU), the dispatcher type.
2. Quantile balancing is layout-invariant with sequence scope: every rank's output rows and input
   gradients equal a single-rank run of its micro-batch, its accumulated quantile equals the single
   rank's for that micro-batch, and after Megatron's own global-batch update of qb_beta
   (finalize_model_grads._update_router_qb_beta, averaging over DP x CP) the next step, now routed
   with the bias, still equals the single rank's.
"""

import pytest
import torch
from megatron.core.distributed.finalize_model_grads import _update_router_qb_beta

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.testing import moe_reference as ref
from megatron_fold.testing.multirank import run_on_ranks
from tests.moe.test_flags import _forward_backward, _layer

SEQ, BATCH, HIDDEN = 16, 2, 16

LAYOUTS = [
    ("tp2-ep4-etp1", dict(tp=2, ep=4, etp=1)),
    ("tp2-cp2-ep2-etp2", dict(tp=2, cp=2, ep=2, etp=2)),
]

SHARED = dict(moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True, gated_linear_unit=True,
              activation_func=torch.nn.functional.silu, moe_token_dispatcher_type="alltoall")
# name -> (config without the flag, the flag, drop scope)
PARITY = {
    "shared-expert-overlap": (SHARED, dict(moe_shared_expert_overlap=True), "subsequence"),
    "shared-expert-overlap-seq-drop-pad": (
        dict(SHARED, moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True),
        dict(moe_shared_expert_overlap=True), "sequence"),
    "router-fusion-aux-loss": (dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1),
                               dict(moe_router_fusion=True), "subsequence"),
    "permute-fusion-seq-drop": (dict(moe_expert_capacity_factor=1.0), dict(moe_permute_fusion=True), "sequence"),
    "dispatcher-type": (dict(moe_token_dispatcher_type="alltoall"), dict(moe_token_dispatcher_type="allgather"),
                        "subsequence"),
}
QUANTILE = dict(moe_router_load_balancing_type="quantile_balancing", moe_router_quantile_balancing_ema=0.25,
                moe_router_pre_softmax=True)


def _config(layout, base, flag=None):
    config = ref.make_moe_config(layout, hidden_size=HIDDEN, **base)
    # Set after construction: TransformerConfig refuses moe_permute_fusion without Transformer Engine
    # (a GPU configuration run on CPU ranks carries it anyway).
    for name, value in (flag or {}).items():
        setattr(config, name, value)
    return config


def _micro_batch(replica, step=0):
    g = torch.Generator().manual_seed(100 * step + replica)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=g), torch.randn(SEQ, BATCH, HIDDEN, generator=g)


def _quantile_single_rank(rank, world_size, num_replicas):
    """Per step and replica: output and input grad; per step: each replica's quantile."""
    layout = FoldedLayout(1)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        config = _config(layout, QUANTILE)
        weights = ref.full_moe_weights(config, seed=9)
        layer = _layer(config, pgs, weights, "sequence")
        steps = []
        for step in range(2):
            per_replica = []
            for replica in range(num_replicas):
                before = layer.router.qb_beta_accum.clone()
                out, gx, _ = _forward_backward(layer, *_micro_batch(replica, step))
                per_replica.append((out, gx, layer.router.qb_beta_accum - before))
            steps.append(per_replica)
            _update_router_qb_beta([layer], config, dp_cp_group=pgs.dp_cp)  # the mean over all micro-batches
            layer.router.qb_beta_accum.zero_()
            layer.router.qb_beta_count.zero_()
        return weights, steps
    finally:
        parallel_state.destroy_model_parallel()


def _on_ranks(rank, world_size, layout_kwargs, quantile_reference):
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        g = torch.Generator().manual_seed(rank)
        local = SEQ // (pgs.tp.size() * pgs.cp.size())  # this rank's rows of a micro-batch
        x, w = torch.randn(local, BATCH, HIDDEN, generator=g), torch.randn(local, BATCH, HIDDEN, generator=g)
        parity = {}
        for name, (base, flag, scope) in PARITY.items():
            off = _config(layout, base)
            weights = ref.full_moe_weights(off, seed=3)
            layer_on = _layer(_config(layout, base, flag), pgs, weights, scope)
            staged = layer_on.token_dispatcher.shared_experts is not None
            parity[name] = (_forward_backward(_layer(off, pgs, weights, scope), x, w),
                            _forward_backward(layer_on, x, w), staged)

        weights, _ = quantile_reference
        config = _config(layout, QUANTILE)
        layer = _layer(config, pgs, weights, "sequence")
        replica = layout.rank_coords(rank)["dp"]
        shard = lambda t: ref.shard_like_megatron(t, pgs.tp.rank(), pgs.tp.size(), pgs.cp)  # noqa: E731
        positions = shard(torch.arange(SEQ)[:, None])[:, 0]
        quantile = []
        for step in range(2):
            x, w = _micro_batch(replica, step)
            out, gx, _ = _forward_backward(layer, shard(x), shard(w))
            quantile.append((out, gx, layer.router.qb_beta_accum.clone(), layer.router.qb_beta.clone()))
            _update_router_qb_beta([layer], config, dp_cp_group=pgs.dp_cp)  # Megatron's, over DP x CP
            layer.router.qb_beta_accum.zero_()
            layer.router.qb_beta_count.zero_()
        return parity, (positions, replica, quantile)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("name,layout_kwargs", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_flags_on_equal_off_and_quantile_is_layout_invariant(name, layout_kwargs):
    layout = FoldedLayout(8, **layout_kwargs)
    reference = run_on_ranks(_quantile_single_rank, 1, layout.dp, timeout=120)[0]
    results = run_on_ranks(_on_ranks, 8, layout_kwargs, reference, timeout=400)
    _, steps = reference
    for rank, (parity, (positions, replica, quantile)) in enumerate(results):
        for flag, (off, on, staged) in parity.items():
            assert staged == ("overlap" in flag), (rank, flag)
            tol = dict(rtol=1e-6, atol=1e-6) if "overlap" in flag else dict(rtol=0, atol=0)
            for what, a, b in (("output", off[0], on[0]), ("input grad", off[1], on[1])):
                torch.testing.assert_close(b, a, **tol, msg=lambda m: f"rank {rank} {flag} {what}: {m}")
            assert off[2].keys() == on[2].keys(), (rank, flag)
            for key in off[2]:
                torch.testing.assert_close(on[2][key], off[2][key], **tol,
                                           msg=lambda m: f"rank {rank} {flag} grad {key}: {m}")
        for step, (out, gx, accum, beta) in enumerate(quantile):
            ref_out, ref_gx, ref_quantile = steps[step][replica]
            where = f"rank {rank} quantile step {step}"
            torch.testing.assert_close(out, ref_out.index_select(0, positions), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{where} output: {m}")
            torch.testing.assert_close(gx, ref_gx.index_select(0, positions), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{where} input grad: {m}")
            torch.testing.assert_close(accum, ref_quantile, rtol=1e-6, atol=1e-6, msg=lambda m: f"{where} quantile: {m}")
            if step == 1:
                assert beta.abs().sum() > 0, where  # step 1 routed with a bias learnt in step 0
