"""FoldMoELayer equals Megatron-Core's own MoELayer (run in CPU mode) under the same folded layout.

Both layers get the same full weights and inputs on every rank; outputs, input gradients and every
local parameter gradient must match. Covered: dropless and subsequence-scope dropping (Megatron's
semantics, "probs" policy), with and without padding to capacity, with and without a shared expert,
plain and SwiGLU experts, top-1/2/8 over 8 and 64 experts, against the allgather and alltoall
dispatchers, on 7 folded layouts (TP x CP and PP among them).
"""

import pytest
import torch
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.specs import get_fold_moe_module_spec
from megatron_fold.testing import moe_reference as ref
from megatron_fold.testing.multirank import run_on_ranks

SEQ, BATCH, HIDDEN = 8, 2, 16

LAYOUTS = [
    ("tp2-ep4-etp1", dict(tp=2, ep=4, etp=1)),
    ("tp2-ep2-etp2", dict(tp=2, ep=2, etp=2)),
    ("cp2-ep4", dict(cp=2, ep=4, etp=1)),
    ("ep8", dict(ep=8)),
    ("etp2-ep4", dict(tp=1, ep=4, etp=2)),
    ("tp2-cp2-ep2-etp1", dict(tp=2, cp=2, ep=2, etp=1)),
    ("tp2-pp2-ep4-etp1", dict(tp=2, pp=2, ep=4, etp=1)),
]
MODES = {
    "dropless": dict(),
    "drop": dict(moe_expert_capacity_factor=1.0),
    # No "position" policy here: upstream picks among routed tokens with torch.topk(sorted=False) over
    # a 0/1 map, i.e. an arbitrary subset of equal keys; ours keeps the earliest positions
    # (tests/test_router.py checks it against a brute-force reference).
    "drop-pad": dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True),
    # Without a shared expert, with SwiGLU experts: many experts, wide top-k; and top-1 drop-and-pad.
    "dropless-swiglu-e64-top8": dict(num_moe_experts=64, moe_router_topk=8, shared=False, swiglu=True),
    "drop-pad-top1": dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_expert_capacity_factor=1.5,
                          moe_pad_expert_input_to_capacity=True, shared=False),
}
DISPATCHERS = ["allgather", "alltoall"]


def _forward_backward(layer, x, w):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


def _compare(rank, world_size, layout_kwargs):
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        g = torch.Generator().manual_seed(rank)
        x, w = torch.randn(SEQ, BATCH, HIDDEN, generator=g), torch.randn(SEQ, BATCH, HIDDEN, generator=g)
        results = {}
        for mode, extra in MODES.items():
            extra = dict(extra)
            shared, swiglu = extra.pop("shared", True), extra.pop("swiglu", False)
            for dispatcher in DISPATCHERS:
                config = ref.make_moe_config(layout, hidden_size=HIDDEN, shared_expert=shared, swiglu=swiglu,
                                             moe_token_dispatcher_type=dispatcher, **extra)
                weights = ref.full_moe_weights(config, seed=3)
                upstream = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)(
                    config=config, pg_collection=pgs)
                ours = get_fold_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)(
                    config=config, pg_collection=pgs)
                for layer in (upstream, ours):
                    layer.set_layer_number(1)
                    ref.load_full_weights(layer, weights, pgs)
                results[mode, dispatcher] = (_forward_backward(upstream, x, w), _forward_backward(ours, x, w))
        return results
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("name,layout_kwargs", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_equals_megatron_moe_layer(name, layout_kwargs):
    for rank, results in enumerate(run_on_ranks(_compare, 8, layout_kwargs, timeout=300)):
        for (mode, dispatcher), ((u_out, u_gx, u_grads), (o_out, o_gx, o_grads)) in results.items():
            where = f"rank {rank} {mode} vs upstream {dispatcher}"
            torch.testing.assert_close(o_out, u_out, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where} output: {m}")
            torch.testing.assert_close(o_gx, u_gx, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where} input grad: {m}")
            assert o_grads.keys() == u_grads.keys(), where
            for key in u_grads:
                torch.testing.assert_close(o_grads[key], u_grads[key], rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{where} grad {key}: {m}")
