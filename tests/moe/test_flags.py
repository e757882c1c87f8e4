"""Megatron's MoE flags on one rank: refused ones name the flag, accepted ones take effect or say why not.

- validate_fold_moe_config refuses each option FoldMoELayer cannot run, naming the flag and its value,
  and lists every refused flag at once. FLAG_ROWS holds every refusal and acceptance of docs/moe_flags.md,
  both sides of each condition, one row each (the reference is the documented table, not flags.py).
- Flags that change only how (not what) is computed give equal outputs and gradients on vs off:
  shared-expert overlap (Megatron's overlapped stages driven by FlexFoldDispatcher; and the inline
  fallback where no side stream exists), router and permute fusion (portable path on CPU, with a
  warning naming the flag), dispatcher type.
- Quantile balancing equals Megatron's own TopKRouter (CPU mode) over micro-batches and a qb_beta
  update; force-load-balancing and force-biased logits equal Megatron's for the same RNG tracker state.
- [N, H] input equals the [N, 1, H] run (router, dispatcher, layer); where the sequence axis is
  needed it is refused with the reason.
"""

import warnings
from typing import NamedTuple

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import RandomSTEShared
from megatron.core.transformer.enums import CudaGraphModule
from megatron.core.transformer.moe.router import TopKRouter

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.moe import fused
from megatron_fold.moe.flags import validate_fold_moe_config
from megatron_fold.moe.router import FoldRouter
from megatron_fold.specs import get_fold_moe_module_spec
from megatron_fold.testing import moe_reference as ref
from tests.moe.test_router import on_one_rank  # one forked gloo rank per test

S, B, H = 8, 2, 16


def _config(**overrides):
    late = {k: overrides.pop(k) for k in ("moe_permute_fusion",) if k in overrides}
    config = ref.make_moe_config(FoldedLayout(1), hidden_size=H, **overrides)
    # TransformerConfig refuses moe_permute_fusion without Transformer Engine at construction; a GPU
    # configuration run on a CPU machine carries it anyway (set after construction here).
    for name, value in late.items():
        setattr(config, name, value)
    return config


# ---- the decision table: every refusal and acceptance of docs/moe_flags.md, both sides of each condition --

ACCEPTED = None


class Row(NamedTuple):
    """flags set on a valid one-rank config (after construction: Megatron's own checks are not ours), the
    text the refusal must contain (the flag and its value) or ACCEPTED, and the machine validate sees."""

    flags: dict
    refusal: str | None
    machine: str = "cpu"  # "cpu", or "cuda-without-te" / "cuda-with-te" (CUDA present, TE's MoE kernels not / so)


SHARED = dict(moe_shared_expert_intermediate_size=16)
# One line per row; a new refusal adds its row and the row of its accepted neighbour.
FLAG_ROWS = {
    # the dispatcher
    "dispatcher-flex": Row(dict(moe_token_dispatcher_type="flex"), "moe_token_dispatcher_type='flex'"),
    "dispatcher-deepep": Row(dict(moe_token_dispatcher_type="alltoall", moe_enable_deepep=True),
                             "moe_enable_deepep=True"),
    "dispatcher-alltoall": Row(dict(moe_token_dispatcher_type="alltoall"), ACCEPTED),
    "dispatcher-allgather": Row(dict(moe_token_dispatcher_type="allgather"), ACCEPTED),
    "rank-capacity-factor": Row(dict(moe_expert_rank_capacity_factor=1.5), "moe_expert_rank_capacity_factor=1.5"),
    "rank-capacity-factor-unset": Row(dict(moe_expert_rank_capacity_factor=None, moe_paged_stash=False), ACCEPTED),
    "paged-stash": Row(dict(moe_paged_stash=True), "moe_paged_stash=True"),
    "padding-for-quantization": Row(dict(moe_router_padding_for_quantization=True),
                                    "moe_router_padding_for_quantization=True"),
    "padding-for-fp8": Row(dict(moe_router_padding_for_fp8=True), "moe_router_padding_for_fp8"),
    "padding-off": Row(dict(moe_router_padding_for_quantization=False, moe_router_padding_for_fp8=False), ACCEPTED),
    # overlap and capture schemes built around Megatron's own dispatchers
    "ep-overlap": Row(dict(overlap_moe_expert_parallel_comm=True), "overlap_moe_expert_parallel_comm=True"),
    "delay-wgrad": Row(dict(delay_wgrad_compute=True), "delay_wgrad_compute=True"),
    "wgrad-overlap": Row(dict(overlap_dispatch_backward_with_experts_wgrad=True),
                         "overlap_dispatch_backward_with_experts_wgrad=True"),
    "overlaps-off": Row(dict(overlap_moe_expert_parallel_comm=False, delay_wgrad_compute=False,
                             overlap_dispatch_backward_with_experts_wgrad=False), ACCEPTED),
    "inference-optimized": Row(dict(transformer_impl="inference_optimized"), "transformer_impl='inference_optimized'"),
    "inference-padding": Row(dict(moe_pad_experts_for_cuda_graph_inference=True),
                             "moe_pad_experts_for_cuda_graph_inference=True"),
    "impl-local": Row(dict(transformer_impl="local", moe_pad_experts_for_cuda_graph_inference=False), ACCEPTED),
    "impl-te": Row(dict(transformer_impl="transformer_engine"), ACCEPTED),
    "cuda-graph-router": Row(dict(cuda_graph_impl="local", cuda_graph_modules=["moe_router"]),
                             "cuda_graph_impl='local'"),
    "cuda-graph-moe": Row(dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=["attn", "moe"]),
                          "cuda_graph_impl='transformer_engine'"),
    "cuda-graph-preprocess-enum": Row(dict(cuda_graph_impl="local",
                                           cuda_graph_modules=[CudaGraphModule.moe_preprocess]),
                                      "cuda_graph_impl='local'"),
    "cuda-graph-whole-layer": Row(dict(cuda_graph_impl="local", cuda_graph_modules=[]), "cuda_graph_modules=[]"),
    "cuda-graph-full": Row(dict(cuda_graph_impl="local", cuda_graph_modules="full"), "cuda_graph_modules='full'"),
    "cuda-graph-iteration": Row(dict(cuda_graph_impl="full_iteration", cuda_graph_modules=[]),
                                "cuda_graph_impl='full_iteration'"),
    "cuda-graph-attn-mlp": Row(dict(cuda_graph_impl="local", cuda_graph_modules=["attn", "mlp"]), ACCEPTED),
    "cuda-graph-attn-enum": Row(dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=[CudaGraphModule.attn]),
                                ACCEPTED),
    "cuda-graph-none": Row(dict(cuda_graph_impl="none", cuda_graph_modules=["moe"]), ACCEPTED),
    "latent-overlap": Row(dict(**SHARED, moe_shared_expert_overlap=True, moe_latent_size=8),
                          "moe_shared_expert_overlap=True with moe_latent_size=8"),
    "latent-no-overlap": Row(dict(**SHARED, moe_latent_size=8), ACCEPTED),
    "shared-expert-overlap": Row(dict(**SHARED, moe_shared_expert_overlap=True), ACCEPTED),
    # routing
    "load-balancing-unknown": Row(dict(moe_router_load_balancing_type="balanced"), "unknown ['balanced']"),
    "load-balancing-unknown-in-list": Row(dict(moe_router_load_balancing_type=["aux_loss", "z"],
                                               moe_aux_loss_coeff=[0.1, 0.1]), "unknown ['z']"),
    "load-balancing-known": Row(dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1),
                                ACCEPTED),
    "load-balancing-list": Row(dict(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
                                    moe_aux_loss_coeff=[0.1, 0.1]), ACCEPTED),
    "sinkhorn": Row(dict(moe_router_load_balancing_type="sinkhorn"), ACCEPTED),
    "quantile": Row(dict(moe_router_load_balancing_type="quantile_balancing", moe_router_quantile_balancing_ema=0.5),
                    ACCEPTED),
    "quantile-aux": Row(dict(moe_router_load_balancing_type="quantile_balancing", moe_aux_loss_coeff=0.01),
                        "moe_aux_loss_coeff=0.01"),
    "quantile-aux-list": Row(dict(moe_router_load_balancing_type="quantile_balancing", moe_aux_loss_coeff=[0.01]),
                             "moe_aux_loss_coeff=[0.01]"),
    "quantile-with-aux-type": Row(dict(moe_router_load_balancing_type=["quantile_balancing", "aux_loss"],
                                       moe_aux_loss_coeff=[0.0, 0.0]),
                                  "'aux_loss'] with moe_aux_loss_coeff=[0.0, 0.0]"),
    "quantile-groups": Row(dict(moe_router_load_balancing_type="quantile_balancing", moe_router_num_groups=2,
                                moe_router_group_topk=1), "moe_router_num_groups=2"),
    "quantile-group-topk": Row(dict(moe_router_load_balancing_type="quantile_balancing", moe_router_group_topk=1),
                               "moe_router_group_topk=1"),
    "groups-without-quantile": Row(dict(moe_router_num_groups=2, moe_router_group_topk=1), ACCEPTED),
    "quantile-fusion": Row(dict(moe_router_load_balancing_type="quantile_balancing", moe_router_fusion=True),
                           "'quantile_balancing' with moe_router_fusion=True"),
    "force-balancing": Row(dict(moe_router_force_load_balancing=True), ACCEPTED),
    "force-biased": Row(dict(moe_router_force_load_balancing=True, moe_router_force_biased=-0.5), ACCEPTED),
    "force-biased-int": Row(dict(moe_router_force_biased=1), ACCEPTED),
    "force-biased-text": Row(dict(moe_router_force_biased="0.5"), "moe_router_force_biased must be a number"),
    "upstream-routing": Row(dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                 moe_router_topk_scaling_factor=2.0, moe_z_loss_coeff=1e-3, moe_input_jitter_eps=0.01),
                            ACCEPTED),
    # dropping
    "capacity-negative": Row(dict(moe_expert_capacity_factor=-1.0), "moe_expert_capacity_factor must be positive"),
    "capacity-zero": Row(dict(moe_expert_capacity_factor=0.0), "moe_expert_capacity_factor must be positive"),
    "capacity-positive": Row(dict(moe_expert_capacity_factor=0.5), ACCEPTED),
    "drop-policy-unknown": Row(dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="random"),
                               "unknown moe_token_drop_policy 'random'"),
    "drop-policy-probs": Row(dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"), ACCEPTED),
    "drop-policy-position": Row(dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="position"), ACCEPTED),
    "drop-policy-dropless": Row(dict(moe_expert_capacity_factor=None, moe_token_drop_policy="random"), ACCEPTED),
    "pad-without-capacity": Row(dict(moe_pad_expert_input_to_capacity=True),
                                "moe_pad_expert_input_to_capacity=True needs moe_expert_capacity_factor"),
    "pad-to-capacity": Row(dict(moe_pad_expert_input_to_capacity=True, moe_expert_capacity_factor=1.0), ACCEPTED),
    # fusion flags: the portable path on CPU; on CUDA refused without Transformer Engine's kernels
    "router-fusion-cpu": Row(dict(moe_router_fusion=True), ACCEPTED),
    "permute-fusion-cpu": Row(dict(moe_permute_fusion=True), ACCEPTED),
    "router-fusion-cuda-without-te": Row(dict(moe_router_fusion=True),
                                         "moe_router_fusion=True needs Transformer Engine", "cuda-without-te"),
    "permute-fusion-cuda-without-te": Row(dict(moe_permute_fusion=True),
                                          "moe_permute_fusion=True needs Transformer Engine", "cuda-without-te"),
    "fusion-cuda-with-te": Row(dict(moe_router_fusion=True, moe_permute_fusion=True), ACCEPTED, "cuda-with-te"),
    "no-fusion-cuda-without-te": Row(dict(), ACCEPTED, "cuda-without-te"),
}


def _on_machine(monkeypatch, machine):
    """What fused.py asks the machine: whether CUDA is there and whether TE's MoE kernels are."""
    if machine == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return
    kernels = {"cuda-without-te": False, "cuda-with-te": True}[machine]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fused, "_have_router_kernels", lambda: kernels)
    monkeypatch.setattr(fused, "_have_permute_kernels", lambda: kernels)


@pytest.mark.parametrize("case", list(FLAG_ROWS))
def test_flag_row(case, monkeypatch):
    flags, refusal, machine = FLAG_ROWS[case]
    config = _config()
    for name, value in flags.items():
        setattr(config, name, value)
    _on_machine(monkeypatch, machine)
    if refusal is ACCEPTED:
        validate_fold_moe_config(config, "sequence")
        return
    with pytest.raises(ValueError, match="MoE options FoldMoELayer cannot run") as error:
        validate_fold_moe_config(config, "sequence")
    assert refusal in str(error.value)


def test_the_rows_cover_both_sides():
    """Every refusal row has an accepted row among the same flags (the other side of its condition)."""
    accepted_flags = {f for row in FLAG_ROWS.values() if row.refusal is ACCEPTED for f in row.flags}
    lonely = [case for case, row in FLAG_ROWS.items() if row.refusal is not ACCEPTED
              and not set(row.flags) & accepted_flags]
    assert not lonely, f"refusal rows without an accepted row over any of their flags: {lonely}"


def test_every_refused_flag_is_listed_and_notes_name_the_dispatcher():
    config = _config()
    config.moe_token_dispatcher_type = "flex"
    config.moe_router_padding_for_quantization = True
    config.delay_wgrad_compute = True
    with pytest.raises(ValueError) as error:
        validate_fold_moe_config(config)
    for refused in ("moe_token_dispatcher_type='flex'", "moe_router_padding_for_quantization=True",
                    "delay_wgrad_compute=True"):
        assert refused in str(error.value)
    accepted = _config(moe_token_dispatcher_type="alltoall", moe_shared_expert_intermediate_size=16,
                       moe_shared_expert_overlap=True, moe_router_fusion=True, moe_permute_fusion=True,
                       moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)
    notes = validate_fold_moe_config(accepted, "sequence")
    assert notes == ["moe_token_dispatcher_type='alltoall': FoldMoELayer dispatches with FlexFoldDispatcher "
                     "(the all-to-all pattern, on the folded expert groups) whichever of 'alltoall' / "
                     "'allgather' is set"]
    assert validate_fold_moe_config(_config(moe_token_dispatcher_type="alltoall")) == notes
    assert validate_fold_moe_config(_config(moe_router_load_balancing_type="sinkhorn")) == [
        notes[0].replace("'alltoall'", "'allgather'", 1)]  # make_moe_config keeps Megatron's default

# ---- flags that must not change the numbers -------------------------------------------------------------

def _layer(config, pgs, weights, drop_scope="subsequence"):
    layer = get_fold_moe_module_spec(use_te=False, num_experts=config.num_moe_experts, drop_scope=drop_scope)(
        config=config, pg_collection=pgs)
    layer.set_layer_number(1)
    ref.load_full_weights(layer, weights, pgs)
    return layer


def _forward_backward(layer, x, w):
    destroy_moe_metrics_tracker()
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


def _assert_same(a, b, what, exact=False):
    (out_a, gx_a, g_a), (out_b, gx_b, g_b) = a, b
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_b, out_a, **tol, msg=lambda m: f"{what} output: {m}")
    torch.testing.assert_close(gx_b, gx_a, **tol, msg=lambda m: f"{what} input grad: {m}")
    assert g_a.keys() == g_b.keys(), what
    for k in g_a:
        torch.testing.assert_close(g_b[k], g_a[k], **tol, msg=lambda m: f"{what} grad {k}: {m}")


BASE = dict(moe_token_dispatcher_type="alltoall", moe_shared_expert_intermediate_size=16, gated_linear_unit=True,
            activation_func=torch.nn.functional.silu, moe_shared_expert_gate=True)
# (flag overrides, extra routing), compared with the same config without the flag.
NUMERICS_FREE = {
    "shared-expert-overlap": dict(moe_shared_expert_overlap=True),
    "shared-expert-overlap-drop-pad": dict(moe_shared_expert_overlap=True, moe_expert_capacity_factor=1.0,
                                           moe_pad_expert_input_to_capacity=True),
    "router-fusion": dict(moe_router_fusion=True, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1),
    "permute-fusion": dict(moe_permute_fusion=True),
    "dispatcher-allgather": dict(moe_token_dispatcher_type="allgather"),
}
ROUTING = {"moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity", "moe_router_load_balancing_type",
           "moe_aux_loss_coeff"}


@pytest.mark.parametrize("flag", list(NUMERICS_FREE))
@on_one_rank
def test_flag_on_equals_off(pgs, flag):
    on = {**BASE, **NUMERICS_FREE[flag]}
    off = {**BASE, **{k: v for k, v in on.items() if k in ROUTING}}
    config_on, config_off = _config(**on), _config(**off)
    weights = ref.full_moe_weights(config_off, seed=4)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer_on = _layer(config_on, pgs, weights)
        result_on = _forward_backward(layer_on, x, w)
    result_off = _forward_backward(_layer(config_off, pgs, weights), x, w)
    # Overlap changes only the order in which the input gradient's two parts are added.
    _assert_same(result_off, result_on, flag, exact="overlap" not in flag)
    if "overlap" in flag:
        assert layer_on.shared_expert_overlap and layer_on.token_dispatcher.shared_experts is layer_on.shared_experts
    fusion = {"router-fusion": "moe_router_fusion=True: router logits are on cpu",
              "permute-fusion": "moe_permute_fusion=True: hidden states are on cpu"}.get(flag)
    if fusion is not None:  # the portable path ran, and said so
        fused._warned.clear()
        assert any(fusion in str(c.message) for c in caught), [str(c.message) for c in caught]


@on_one_rank
def test_overlap_runs_inline_without_side_streams(pgs, monkeypatch):
    """Where no stream can exist (no CUDA, CPU mode off), the shared expert is built plainly and runs in
    line (what MoELayer does without overlap): same numbers as the overlapped stages."""
    monkeypatch.setattr(fused, "side_streams_available", lambda: False)
    config = _config(**BASE, moe_shared_expert_overlap=True)
    weights = ref.full_moe_weights(config, seed=4)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)
    inline = _layer(config, pgs, weights)
    assert not inline.shared_expert_overlap and inline.token_dispatcher.shared_experts is None
    monkeypatch.undo()
    staged = _layer(config, pgs, weights)
    assert staged.shared_expert_overlap
    _assert_same(_forward_backward(inline, x, w), _forward_backward(staged, x, w), "inline vs staged")


# ---- routing options against Megatron's own router ------------------------------------------------------

def _routers(config, pgs, seed=3):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(config.num_moe_experts, H, generator=g) * 0.5
    ours, upstream = FoldRouter(config, pg_collection=pgs), TopKRouter(config, pg_collection=pgs)
    for router in (ours, upstream):
        with torch.no_grad():
            router.weight.copy_(weight)
        router.set_layer_number(1)
        router.train()
    return ours, upstream


def _route(router, x, r):
    destroy_moe_metrics_tracker()
    x = x.clone().requires_grad_(True)
    router.weight.grad = None
    probs, routing_map = router(x)
    (probs * r).sum().backward()
    return probs.detach(), routing_map, x.grad, router.weight.grad.clone()


def _assert_routes_equal(ours, upstream, what):
    for name, a, b in zip(("probs", "map", "input grad", "weight grad"), ours, upstream):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what} {name}: {m}")


@on_one_rank
def test_quantile_balancing_equals_megatron(pgs):
    # (Megatron's TransformerConfig refuses a capacity factor with quantile balancing.)
    config = _config(moe_router_load_balancing_type="quantile_balancing", moe_router_quantile_balancing_ema=0.5)
    ours, upstream = _routers(config, pgs)
    g = torch.Generator().manual_seed(11)
    batches = [(torch.randn(S, B, H, generator=g), torch.randn(S * B, 8, generator=g)) for _ in range(3)]
    for step, (x, r) in enumerate(batches):
        _assert_routes_equal(_route(ours, x, r), _route(upstream, x, r), f"micro-batch {step}")
        torch.testing.assert_close(ours.qb_beta_accum, upstream.qb_beta_accum, rtol=1e-6, atol=1e-7)
        assert int(ours.qb_beta_count) == int(upstream.qb_beta_count) == (step + 1 if step < 2 else 1)
        if step == 0:
            continue  # a global batch of two micro-batches, then one of one
        # Megatron's global-batch update (finalize_model_grads._update_router_qb_beta without its DP
        # average, a no-op on one rank): the next micro-batch routes with the new bias.
        for router in (ours, upstream):
            with torch.no_grad():
                mean = router.qb_beta_accum / router.qb_beta_count
                beta = 0.5 * router.qb_beta + 0.5 * mean
                router.qb_beta.copy_(beta - beta.mean())
                router.qb_beta_accum.zero_()
                router.qb_beta_count.zero_()
    assert ours.qb_beta.abs().sum() > 0  # the bias moved, so the last micro-batches routed with it
    state = ours.state_dict()
    assert "qb_beta" in state and "qb_beta_accum" not in state  # checkpointed like upstream's


@pytest.mark.parametrize("option", [dict(moe_router_force_load_balancing=True),
                                    dict(moe_router_force_biased=0.5), dict(moe_router_force_biased=-0.5)])
@on_one_rank
def test_force_balancing_options_equal_megatron(pgs, option):
    config = _config(**option)
    ours, upstream = _routers(config, pgs)
    g = torch.Generator().manual_seed(12)
    x, r = torch.randn(S, B, H, generator=g), torch.randn(S * B, 8, generator=g)
    results = []
    for router in (ours, upstream):
        tensor_parallel.model_parallel_cuda_manual_seed(77)  # the same RNG streams for both routers
        RandomSTEShared._cache.clear()
        results.append([_route(router, x, r), _route(router, x, r)])  # twice: fresh (or cached) draws
    for step in range(2):
        _assert_routes_equal(results[0][step], results[1][step], f"{option} call {step}")
    plain = _route(_routers(_config(), pgs)[0], x, r)
    assert not torch.equal(plain[1], results[0][0][1])  # the random logits did change the routing


# ---- [tokens, hidden] input ----------------------------------------------------------------------------

@pytest.mark.parametrize("routing", [dict(), dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True),
                                     dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1)])
@on_one_rank
def test_flat_input_equals_one_sequence(pgs, routing):
    config = _config(moe_shared_expert_intermediate_size=16, **routing)
    weights = ref.full_moe_weights(config, seed=5)
    g = torch.Generator().manual_seed(2)
    N = S * B
    x, w = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    layer = _layer(config, pgs, weights)
    flat = _forward_backward(layer, x, w)
    flat_rows = (layer.token_dispatcher.last_tokens_per_local_expert.clone(), sum(layer.token_dispatcher._send))
    column = _forward_backward(layer, x.unsqueeze(1), w.unsqueeze(1))
    column_rows = (layer.token_dispatcher.last_tokens_per_local_expert.clone(), sum(layer.token_dispatcher._send))
    _assert_same((column[0].squeeze(1), column[1].squeeze(1), column[2]), flat, f"[N, H] vs [N, 1, H] {routing}",
                 exact=True)
    assert flat[0].shape == (N, H)
    # Rows sent and received: [N, H] is one sequence of N tokens, not N sequences of H tokens.
    assert torch.equal(flat_rows[0], column_rows[0]) and flat_rows[1] == column_rows[1], (flat_rows, column_rows)
    if routing.get("moe_pad_expert_input_to_capacity"):
        assert flat_rows[1] == 8 * 4  # 8 experts x ceil(16 tokens * top-2 / 8 experts * 1.0) rows


@on_one_rank
def test_flat_input_refused_where_the_sequence_axis_matters(pgs):
    N = S * B
    config = _config(moe_expert_capacity_factor=1.0)
    router = FoldRouter(config, pg_collection=pgs, drop_scope="sequence")
    router.set_layer_number(3)
    with pytest.raises(ValueError, match=r"MoE layer 3: FoldRouter got hidden states \[tokens, hidden\] = \[16, 16\], "
                                         r"without a sequence axis, but drop_scope='sequence' with "
                                         r"moe_expert_capacity_factor=1.0 decides drops per whole sequence"):
        router(torch.randn(N, H))
    seq_aux = FoldRouter(_config(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.1),
                         pg_collection=pgs)
    with pytest.raises(ValueError, match="'seq_aux_loss' computes its loss per sequence"):
        seq_aux(torch.randn(N, H))
    # Sequence scope without dropping needs no sequence axis: [N, H] routes as [N, 1, H].
    dropless = FoldRouter(_config(), pg_collection=pgs, drop_scope="sequence")
    x = torch.randn(N, H)
    assert torch.equal(dropless(x)[1], dropless(x.unsqueeze(1))[1])
    # The dispatcher checks its input either way.
    padded = _config(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)
    layer = _layer(padded, pgs, ref.full_moe_weights(padded, seed=1), drop_scope="sequence")
    probs = torch.zeros(N, 8)
    routing_map = torch.zeros(N, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"FlexFoldDispatcher got hidden states \[tokens, hidden\] = \[16, 16\] "
                                         "without a sequence axis, but drop_scope='sequence' with "
                                         "moe_pad_expert_input_to_capacity=True"):
        layer.token_dispatcher.dispatch_preprocess(torch.randn(N, H), routing_map, probs)
    with pytest.raises(ValueError, match=r"FlexFoldDispatcher expects hidden states \[seq_local, batch, hidden=16\] "
                                         r"or \[tokens, hidden=16\], got shape \(16, 1, 1, 16\)"):
        layer.token_dispatcher.dispatch_preprocess(torch.randn(N, 1, 1, H), routing_map, probs)


# ---- what Transformer Engine refuses at its first forward, refused before anything is built ----------

def _refusal(config) -> str:
    with pytest.raises(ValueError) as e:
        validate_fold_moe_config(config)
    return str(e.value)


def test_fp64_router_dtype_with_router_fusion_is_refused_on_every_machine():
    message = _refusal(_config(moe_router_fusion=True, moe_router_dtype="fp64"))
    assert "moe_router_fusion=True with moe_router_dtype='fp64'" in message
    assert "set moe_router_dtype='fp32' or moe_router_fusion=False" in message
    validate_fold_moe_config(_config(moe_router_fusion=True, moe_router_dtype="fp32"))
    validate_fold_moe_config(_config(moe_router_fusion=False, moe_router_dtype="fp64"))


@pytest.mark.parametrize("installed,refused", [("2.12.1", True), ("2.13.0", False), ("2.15.0", False), (None, False)])
def test_fused_sqrtsoftplus_needs_te_2_13(monkeypatch, installed, refused):
    from packaging.version import Version

    monkeypatch.setattr(fused, "te_version", lambda: None if installed is None else Version(installed))
    config = _config(moe_router_fusion=True, moe_router_score_function="sqrtsoftplus")
    if refused:
        assert ("moe_router_fusion=True with moe_router_score_function='sqrtsoftplus' needs Transformer Engine "
                ">= 2.13.0 (installed: 2.12.1); upgrade it or set moe_router_fusion=False") in _refusal(config)
    else:  # without TE (None) a CPU run takes the portable path, with a warning at the first forward
        validate_fold_moe_config(config)
    validate_fold_moe_config(_config(moe_router_fusion=False, moe_router_score_function="sqrtsoftplus"))


def _dispatch_combine(dispatcher, x, routing_map, probs):
    """Through every dispatcher stage with experts that only apply the probabilities."""
    rows, p = dispatcher.dispatch_preprocess(x, routing_map, probs)
    rows, p = dispatcher.token_dispatch(rows, p)
    rows, _, p = dispatcher.dispatch_postprocess(rows, p)
    return dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(rows * p.unsqueeze(-1))))


@on_one_rank
def test_zero_output_rows_never_reach_te_fused_permute(pgs, monkeypatch):
    """TE >= 2.15 asserts num_out_tokens > 0 in its fused permute. A stand-in for TE's kernels (Megatron's
    unfused permute / unpermute, which order rows the same way) asserts the same; the dispatcher must
    take the portable path for a rank whose tokens were all dropped, and TE's path otherwise."""
    from megatron.core.transformer.moe import moe_utils

    from megatron_fold.moe.dispatcher import FlexFoldDispatcher

    calls = []

    def te_permute(hidden, probs, routing_map, num_out):
        assert num_out > 0, "num_out_tokens must be greater than 0"  # TE 2.15's assert
        calls.append(num_out)
        rows, row_probs, row_map, _, _ = moe_utils.permute(hidden, routing_map, probs=probs, num_out_tokens=num_out)
        return rows, row_probs, row_map

    def te_unpermute(rows, row_map, routing_map, num_tokens):
        return moe_utils.unpermute(rows, row_map, restore_shape=torch.Size((num_tokens, rows.shape[-1])),
                                   routing_map=routing_map)

    monkeypatch.setattr(fused, "permute_fusion",  # "a GPU with TE"
                        lambda config, hidden, padded: config.moe_permute_fusion and not padded)
    monkeypatch.setattr(fused, "fused_permute", te_permute)
    monkeypatch.setattr(fused, "fused_unpermute", te_unpermute)
    g = torch.Generator().manual_seed(0)
    x, scores = torch.randn(S, B, H, generator=g), torch.rand(S * B, 8, generator=g)
    top2 = torch.zeros(S * B, 8, dtype=torch.bool).scatter(1, scores.topk(2, dim=1).indices, True)
    probs = scores * top2
    dropping = _config(moe_permute_fusion=True, moe_expert_capacity_factor=1.0)
    plain = _config(moe_expert_capacity_factor=1.0)
    for routing_map, expected_calls in ((torch.zeros_like(top2), []), (top2, [2 * S * B])):
        calls.clear()
        out = _dispatch_combine(FlexFoldDispatcher(8, list(range(8)), dropping, pgs), x, routing_map, probs)
        reference = _dispatch_combine(FlexFoldDispatcher(8, list(range(8)), plain, pgs), x, routing_map, probs)
        assert calls == expected_calls
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
        # Closed form: each token's input times the sum of its routed probabilities.
        torch.testing.assert_close(out, x * (probs * routing_map).sum(dim=1).view(S, B, 1), rtol=1e-6, atol=1e-6)
    # Dropless: TE's output is sized for exactly top-k rows a token (Megatron's contract), so a map that
    # routes a token to fewer experts is refused by name before any all-to-all.
    dropless = _config(moe_permute_fusion=True)
    short = top2.clone()
    short[0] = False
    with pytest.raises(ValueError, match="sizes Transformer Engine's permutation for exactly moe_router_topk=2 "
                                         "experts a token .* but a token is routed to 0"):
        _dispatch_combine(FlexFoldDispatcher(8, list(range(8)), dropless, pgs), x, short, probs)
