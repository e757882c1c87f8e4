"""The single-rank reference is itself checked against closed-form math.

Megatron-Core's MoELayer on one rank (CPU mode), loaded with `full_moe_weights`, must equal a dense
few-line MoE written from those full weights: router top-k, per-token weighted expert MLPs (gelu, or
SwiGLU with the gate half first), shared expert with its sigmoid gate. Its gradients, read through
`gather_full_grads`, must equal autograd's through the dense version. This pins down the meaning of
every full-weight name that the multi-rank tests rely on.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.testing import moe_reference as ref
from megatron_fold.testing.multirank import run_on_ranks

S, B, H = 6, 2, 16

CASES = {
    "softmax-top2-gelu": dict(moe_token_dispatcher_type="alltoall"),
    "pre-softmax-top1": dict(moe_token_dispatcher_type="allgather", moe_router_topk=1, moe_router_pre_softmax=True),
    "swiglu-gated-shared": dict(moe_token_dispatcher_type="alltoall", swiglu=True, shared_expert=8,
                                moe_shared_expert_gate=True),
    "sigmoid-expert-bias-top3": dict(moe_token_dispatcher_type="allgather", moe_router_topk=3,
                                     moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
}


def _mlp(x, fc1, fc2, glu):
    """[T, H] -> [T, H]; with gated linear units the first half of fc1's rows is the activated gate."""
    h = x @ fc1.T
    if glu:
        gate, linear = h.chunk(2, dim=-1)
        h = F.silu(gate) * linear
    else:
        h = F.gelu(h)
    return h @ fc2.T


def dense_moe(x, w, config):
    """The MoE layer written out for one rank and full weights. x: [S, B, H] -> [S, B, H]."""
    tokens = x.reshape(-1, x.shape[-1])  # [T, H], token t = s * B + b as Megatron flattens
    logits = tokens @ w["router.weight"].T  # [T, E]
    k = config.moe_router_topk
    if config.moe_router_score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        bias = w.get("router.expert_bias", torch.zeros(logits.shape[-1]))
        idx = torch.topk(scores + bias, k, dim=-1).indices
        probs = scores.gather(1, idx)
        probs = probs / probs.sum(-1, keepdim=True) if k > 1 else probs
    elif config.moe_router_pre_softmax:
        probs, idx = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    else:
        top, idx = torch.topk(logits, k, dim=-1)
        probs = torch.softmax(top, dim=-1)
    glu = config.gated_linear_unit
    out = torch.zeros_like(tokens)
    for e in range(config.num_moe_experts):
        weight = (probs * (idx == e)).sum(-1, keepdim=True)  # [T, 1], zero where e is not chosen
        out = out + weight * _mlp(tokens, w[f"experts.{e}.fc1"], w[f"experts.{e}.fc2"], glu)
    if "shared.fc1" in w:
        shared = _mlp(tokens, w["shared.fc1"], w["shared.fc2"], glu)
        if "shared.gate" in w:
            shared = shared * torch.sigmoid(tokens @ w["shared.gate"].T)
        out = out + shared
    return out.reshape(x.shape)


def _upstream_vs_dense(rank, world_size, overrides):
    layout = FoldedLayout(1)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        config = ref.make_moe_config(layout, hidden_size=H, **overrides)
        weights = ref.full_moe_weights(config, seed=11)
        layer = ref.build_upstream_moe_layer(config, pgs)
        ref.load_full_weights(layer, weights, pgs)
        g = torch.Generator().manual_seed(5)
        x, w_out = torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)

        xu = x.clone().requires_grad_(True)
        out, _ = layer(xu)
        (out * w_out).sum().backward()

        params = {n: t.clone().requires_grad_(n != "router.expert_bias") for n, t in weights.items()}
        xd = x.clone().requires_grad_(True)
        dense = dense_moe(xd, params, config)
        (dense * w_out).sum().backward()
        dense_grads = {n: p.grad for n, p in params.items() if p.requires_grad}
        return out.detach(), xu.grad, ref.gather_full_grads(layer, pgs), dense.detach(), xd.grad, dense_grads
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("name", list(CASES))
def test_single_rank_upstream_equals_dense_moe(name):
    out, gx, grads, d_out, d_gx, d_grads = run_on_ranks(_upstream_vs_dense, 1, CASES[name], timeout=60)[0]
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, d_out, **tol)
    torch.testing.assert_close(gx, d_gx, **tol)
    assert grads.keys() == d_grads.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], d_grads[key], **tol, msg=lambda m: f"grad {key}: {m}")
    # The routing is not degenerate: several experts receive gradient.
    assert sum(bool(grads[f"experts.{e}.fc2"].abs().sum() > 0) for e in range(8)) >= 4


def _bad_inputs(rank, world_size):
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(1))
    errors = {}
    try:
        config = ref.make_moe_config(FoldedLayout(1), hidden_size=H, moe_token_dispatcher_type="alltoall")
        layer = ref.build_upstream_moe_layer(config, pgs)
        weights = ref.full_moe_weights(config, seed=1)
        for what, bad in [("missing", {k: v for k, v in weights.items() if k != "experts.3.fc2"}),
                          ("shape", {**weights, "experts.0.fc1": torch.zeros(8, H)})]:
            try:
                ref.load_full_weights(layer, bad, pgs)
            except (KeyError, ValueError) as e:
                errors[what] = str(e)
        try:
            ref.build_upstream_moe_layer(config, pgs, dispatcher="flexible")
        except ValueError as e:
            errors["dispatcher"] = str(e)
        swiglu = ref.make_moe_config(FoldedLayout(1), hidden_size=H, swiglu=True)
        try:  # non-gated weights into a gated layer: fc1 has half the rows
            ref.load_full_weights(ref.build_upstream_moe_layer(swiglu, pgs), weights, pgs)
        except ValueError as e:
            errors["glu"] = str(e)
        return errors
    finally:
        parallel_state.destroy_model_parallel()


def test_bad_weights_and_options_are_named():
    errors = run_on_ranks(_bad_inputs, 1, timeout=60)[0]
    assert "weights have no 'experts.3.fc2'" in errors["missing"]
    assert "experts.0.fc1: this rank's shard of the full weight (8, 16) is (8, 16), but the layer holds (16, 16)" \
        in errors["shape"]
    assert "dispatcher must be 'alltoall' or 'allgather', got 'flexible'" in errors["dispatcher"]
    assert "experts.0.fc1" in errors["glu"] and "(32, 16)" in errors["glu"]


def _config_sizes(rank, world_size):
    layout = FoldedLayout(world_size, tp=2, ep=4, etp=1)
    parallel_state.initialize_model_parallel(layout)
    try:
        active = ref.make_moe_config()  # no layout: the active parallel state's sizes
        explicit = ref.make_moe_config(layout)
        fields = ("tensor_model_parallel_size", "context_parallel_size", "expert_model_parallel_size",
                  "expert_tensor_parallel_size", "sequence_parallel")
        return [getattr(active, f) for f in fields], [getattr(explicit, f) for f in fields]
    finally:
        parallel_state.destroy_model_parallel()


def test_make_moe_config_follows_the_active_layout():
    for active, explicit in run_on_ranks(_config_sizes, 8, timeout=60):
        assert active == explicit == [2, 1, 4, 1, True]
    no_state = ref.make_moe_config()
    assert (no_state.tensor_model_parallel_size, no_state.expert_model_parallel_size, no_state.sequence_parallel) \
        == (1, 1, False)
