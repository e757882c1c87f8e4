"""FoldRouter on one rank, against upstream's TopKRouter and brute force.

- Every upstream feature gives upstream's probs, routing map, input and weight gradients (aux losses
  and z-loss act through the backward pass), logged losses and expert-bias counts.
- Subsequence dropping keeps upstream's tokens (probs policy); the position policy keeps as many
  tokens per expert as upstream, the earliest ones (upstream's choice among them is arbitrary).
- Both scopes and both policies equal a brute-force loop over (sequence, expert), exact ties included.
- Nothing FoldRouter does calls torch.cuda: a guard fails the test if it does, while upstream's
  TopKRouter gets torch.cuda.current_device() == "cpu" (it allocates its buffers there).
"""

import contextlib
import functools
import inspect
import math

import pytest
import torch
from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker, get_moe_metrics_tracker
from megatron.core.transformer.moe.router import TopKRouter

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.moe.router import FoldRouter, NonFiniteRouterScores
from megatron_fold.testing import moe_reference as ref
from megatron_fold.testing.multirank import run_on_ranks

S, B, H = 12, 3, 16


# ---- one forked gloo rank per test, and a guard on torch.cuda -----------------------------------------

def on_one_rank(test):
    """Run the test body on a forked world-size-1 gloo rank with Megatron's parallel state, as
    test(pgs=ProcessGroupCollection, **fixtures). The pytest process itself must stay free of process
    groups and Megatron state: after Megatron's initialize/destroy_model_parallel in the parent, later
    forked multi-rank tests hang in group creation."""
    signature = inspect.signature(test)

    @functools.wraps(test)
    def run(**kwargs):
        run_on_ranks(_one_rank, 1, test, kwargs, timeout=60)

    run.__signature__ = signature.replace(parameters=[p for n, p in signature.parameters.items() if n != "pgs"])
    return run


def _one_rank(rank, world_size, test, kwargs):
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(1))
    try:
        test(pgs=pgs, **kwargs)
    finally:
        parallel_state.destroy_model_parallel()


class CudaGuard:
    """torch.cuda answers like a CPU-only machine inside `upstream()`; anywhere else a call fails."""

    PATCHED = [(torch.cuda, "current_device"), (torch.cuda, "current_stream"), (torch.cuda, "Stream"),
               (torch.cuda, "Event"), (torch.cuda, "synchronize"), (torch.cuda, "get_rng_state"),
               (torch.cuda, "set_rng_state"), (torch.cuda.random, "get_rng_state"), (torch.Tensor, "cuda")]

    def __init__(self, monkeypatch):
        self.allowed = False
        for owner, name in self.PATCHED:
            monkeypatch.setattr(owner, name, self._guarded(name))

    def _guarded(self, name):
        def call(*args, **kwargs):
            if self.allowed and name == "current_device":
                return "cpu"
            raise AssertionError(f"torch.cuda.{name} called outside upstream code (FoldRouter must not use CUDA)")
        return call

    @contextlib.contextmanager
    def upstream(self):
        self.allowed = True
        try:
            yield
        finally:
            self.allowed = False


@pytest.fixture
def cuda(monkeypatch):
    return CudaGuard(monkeypatch)


# ---- helpers -----------------------------------------------------------------------------------------

def _config(**overrides):
    return ref.make_moe_config(FoldedLayout(1), hidden_size=H, **overrides)


def _weights(config, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = {"weight": torch.randn(config.num_moe_experts, H, generator=g) * 0.5}
    if config.add_bias_linear:
        w["bias"] = torch.randn(config.num_moe_experts, generator=g) * 0.1
    if config.moe_router_enable_expert_bias:
        w["expert_bias"] = torch.linspace(-0.3, 0.3, config.num_moe_experts)
    return w


def _load(router, weights):
    with torch.no_grad():
        for name, value in weights.items():
            getattr(router, name).copy_(value)
    router.set_layer_number(1)
    router.train()
    return router


def _run(router, x, r, padding_mask=None, seed=5):
    """Forward + backward of sum(probs * r); returns everything a router affects."""
    destroy_moe_metrics_tracker()
    torch.manual_seed(seed)  # input jitter draws random numbers
    x = x.clone().requires_grad_(True)
    probs, routing_map = router(x, padding_mask=padding_mask)
    (probs * r).sum().backward()
    logged = {name: entry.values.clone() for name, entry in get_moe_metrics_tracker().metrics.items()}
    counts = None if router.local_tokens_per_expert is None else router.local_tokens_per_expert.clone()
    return dict(probs=probs.detach(), map=routing_map, gx=x.grad, gw=router.weight.grad.clone(),
                gb=None if router.bias is None else router.bias.grad.clone(), logged=logged, bias_counts=counts)


def _inputs(experts, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, H, generator=g), torch.randn(S * B, experts, generator=g)


def _padding_mask():
    mask = torch.zeros(S, B, dtype=torch.bool)
    mask[-3:, 0] = True  # the end of sequence 0 is padding
    return mask


# ---- every upstream feature equals upstream --------------------------------------------------------------

FEATURES = {
    "softmax": dict(),
    "pre-softmax": dict(moe_router_pre_softmax=True),
    "sigmoid": dict(moe_router_score_function="sigmoid"),
    "sigmoid-expert-bias": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    "scaling-factor": dict(moe_router_topk_scaling_factor=2.5),
    "group-limited": dict(num_moe_experts=16, moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2),
    "group-limited-sigmoid-bias": dict(num_moe_experts=16, moe_router_topk=4, moe_router_num_groups=4,
                                       moe_router_group_topk=2, moe_router_score_function="sigmoid",
                                       moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.0),
    "fp64-router": dict(moe_router_dtype="fp64"),
    "fp32-router": dict(moe_router_dtype="fp32"),
    "router-bias": dict(add_bias_linear=True),
    "z-loss": dict(moe_z_loss_coeff=0.01),
    "aux-loss": dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1),
    "seq-aux-loss": dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.1),
    "global-aux-loss": dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1),
    "three-aux-losses+z": dict(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss", "global_aux_loss"],
                               moe_aux_loss_coeff=[0.1, 0.05, 0.02], moe_z_loss_coeff=0.01),
    "per-token-loss": dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1,
                           moe_z_loss_coeff=0.01, calculate_per_token_loss=True),
    "padding-mask-aux+z": dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1,
                               moe_z_loss_coeff=0.01),
    "jitter": dict(moe_input_jitter_eps=0.1),
    "sinkhorn": dict(moe_router_load_balancing_type="sinkhorn", moe_router_topk=1),
    # Subsequence dropping, probs policy: upstream's apply_router_token_dropping inside TopKRouter.
    "drop-top1-e8": dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_expert_capacity_factor=0.5),
    "drop-top2-e8+aux": dict(moe_expert_capacity_factor=1.0, moe_router_load_balancing_type="aux_loss",
                             moe_aux_loss_coeff=0.1),
    "drop-top2-e64": dict(num_moe_experts=64, moe_expert_capacity_factor=2.0),
    "drop-sigmoid-bias": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                              moe_expert_capacity_factor=0.5),
    "drop-capacity-above-tokens": dict(moe_router_topk=4, moe_expert_capacity_factor=64.0),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@on_one_rank
def test_feature_equals_upstream(pgs, cuda, feature):
    config = _config(**FEATURES[feature])
    weights = _weights(config)
    x, r = _inputs(config.num_moe_experts)
    mask = _padding_mask() if feature.startswith("padding-mask") else None
    with cuda.upstream():
        upstream = _run(_load(TopKRouter(config, pg_collection=pgs), weights), x, r, mask)
    ours = _run(_load(FoldRouter(config, pg_collection=pgs), weights), x, r, mask)

    assert torch.equal(ours["map"], upstream["map"])
    for key in ("probs", "gx", "gw", "gb"):
        if upstream[key] is None:
            assert ours[key] is None
        else:
            torch.testing.assert_close(ours[key], upstream[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{key}: {m}")
    assert set(ours["logged"]) == set(upstream["logged"])  # the same losses, logged under the same names
    for name, value in upstream["logged"].items():
        torch.testing.assert_close(ours["logged"][name], value, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    if upstream["bias_counts"] is not None:  # expert-bias token counts (after dropping)
        assert torch.equal(ours["bias_counts"], upstream["bias_counts"])
    if config.moe_aux_loss_coeff or config.moe_z_loss_coeff:
        assert upstream["logged"], "the loss under test was not logged: the comparison would be vacuous"


@on_one_rank
def test_expert_bias_counts_skip_padding(pgs, cuda):
    """Upstream's count fails to broadcast a padding mask ([tokens, E] & [tokens]); ours masks rows."""
    config = _config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    weights = _weights(config)
    x, r = _inputs(8)
    mask = _padding_mask()
    ours = _run(_load(FoldRouter(config, pg_collection=pgs), weights), x, r, mask)
    expected = (ours["map"] & ~mask.reshape(-1, 1)).sum(dim=0).float()
    assert torch.equal(ours["bias_counts"], expected)
    assert expected.sum() == (S * B - 3) * config.moe_router_topk  # closed form: valid tokens x top-k


@pytest.mark.parametrize("scope", ["subsequence", "sequence"])
@on_one_rank
def test_token_counts_skip_padding(pgs, cuda, scope):
    """Padding tokens compete for capacity (as upstream) but are not counted as routed or kept."""
    config = _config(moe_expert_capacity_factor=0.5)
    weights = _weights(config)
    x, r = _inputs(8)
    mask = _padding_mask()
    router = _load(FoldRouter(config, pg_collection=pgs, drop_scope=scope), weights)
    dropless = _load(FoldRouter(_config(), pg_collection=pgs), weights)
    routed = _run(dropless, x, r, mask)["map"]
    kept = _run(router, x, r, mask)["map"]
    unmasked = _run(_load(FoldRouter(config, pg_collection=pgs, drop_scope=scope), weights), x, r)["map"]
    assert torch.equal(kept, unmasked)  # the mask does not change which tokens are dropped
    valid = ~mask.reshape(-1, 1)
    assert torch.equal(router.last_tokens_per_expert, (kept & valid).sum(dim=0))
    assert torch.equal(router.last_tokens_per_expert_before_drop, (routed & valid).sum(dim=0))
    assert router.last_tokens_per_expert_before_drop.sum() == (S * B - 3) * 2  # valid tokens x top-k
    assert router.last_dropped_fraction.item() == pytest.approx(
        1 - (kept & valid).sum().item() / (routed & valid).sum().item(), abs=1e-12)


@on_one_rank
def test_pad_to_capacity_returns_the_dropped_map(pgs, cuda):
    """Upstream returns the capacity mask (zero-probability tokens fill each expert); we return the
    dropped map and leave the padding to the dispatcher. Probabilities and gradients are the same."""
    base = dict(num_moe_experts=8, moe_expert_capacity_factor=0.5)
    config, pad_config = _config(**base), _config(**base, moe_pad_expert_input_to_capacity=True)
    weights = _weights(config)
    x, r = _inputs(8)
    with cuda.upstream():
        upstream = _run(_load(TopKRouter(config, pg_collection=pgs), weights), x, r)
        upstream_pad = _run(_load(TopKRouter(pad_config, pg_collection=pgs), weights), x, r)
    ours = _run(_load(FoldRouter(pad_config, pg_collection=pgs), weights), x, r)
    assert torch.equal(ours["map"], upstream["map"])
    assert torch.equal(ours["map"], upstream_pad["map"] & ours["map"])  # upstream's padded map only adds rows
    capacity = math.ceil(S * B * 2 / 8 * 0.5)
    assert upstream_pad["map"].sum(dim=0).tolist() == [capacity] * 8  # what upstream pads to
    for key in ("probs", "gx", "gw"):
        torch.testing.assert_close(ours[key], upstream_pad[key], rtol=1e-6, atol=1e-7)


# ---- dropping against brute force ------------------------------------------------------------------------

def brute_force_keep(key, routed, seq, batch, capacity):
    """Per (sequence b, expert e): the `capacity` routed tokens with the largest key, earlier first on ties."""
    key, routed = key.view(seq, batch, -1), routed.view(seq, batch, -1)
    keep = torch.zeros_like(routed)
    for b in range(batch):
        for e in range(key.shape[-1]):
            candidates = sorted((s for s in range(seq) if routed[s, b, e]), key=lambda s: (-float(key[s, b, e]), s))
            for s in candidates[:capacity]:
                keep[s, b, e] = True
    return keep.view(seq * batch, -1)


def _tied_inputs(experts, seed):
    """Tokens drawn from a pool of 4 vectors with entries in {-1, 0, 1}, weights in quarters: logits are
    exact in any summation order, so repeated tokens have bitwise-equal probabilities (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(-1, 2, (4, H), generator=g).float()
    x = pool[torch.randint(0, 4, (S, B), generator=g)]  # [S, B, H]
    weight = torch.randint(-2, 3, (experts, H), generator=g).float() / 4
    return x, weight


DROPS = [("probs", 1, 8, 0.5), ("probs", 2, 8, 1.0), ("probs", 2, 64, 2.0), ("probs", 8, 64, 0.25),
         ("position", 1, 8, 0.5), ("position", 2, 8, 0.5), ("position", 2, 64, 1.0)]


@pytest.mark.parametrize("scope", ["subsequence", "sequence"])
@pytest.mark.parametrize("tied", [False, True], ids=["random", "exact-ties"])
@pytest.mark.parametrize("policy,topk,experts,cf", DROPS, ids=[f"{p}-top{k}-e{e}-cf{c}" for p, k, e, c in DROPS])
@on_one_rank
def test_dropping_equals_brute_force(pgs, cuda, scope, tied, policy, topk, experts, cf):
    routing = dict(num_moe_experts=experts, moe_router_topk=topk, moe_router_pre_softmax=topk == 1)
    config = _config(**routing, moe_expert_capacity_factor=cf, moe_token_drop_policy=policy)
    if tied:
        x, weight = _tied_inputs(experts, seed=topk * experts)
    else:
        x, weight = _inputs(experts)[0], _weights(config)["weight"]
    router = _load(FoldRouter(config, pg_collection=pgs, drop_scope=scope), {"weight": weight})
    dropless = _load(FoldRouter(_config(**routing), pg_collection=pgs), {"weight": weight})
    probs, routing_map = router(x)
    ref_probs, routed = dropless(x)
    ref_probs = ref_probs.detach()

    key = ref_probs if policy == "probs" else torch.zeros_like(ref_probs)
    if scope == "sequence":
        expected = brute_force_keep(key, routed, S, B, math.ceil(S * topk / experts * cf))
    else:  # all local rows compete as one "sequence", in row order s*B + b
        expected = brute_force_keep(key, routed, S * B, 1, math.ceil(S * B * topk / experts * cf))
    if tied and policy == "probs":
        pairs = ref_probs[routed]
        assert pairs.unique().numel() < pairs.numel(), "the tied input has no tie: the test would not test ties"
    assert not torch.equal(expected, routed), "nothing dropped: the case would not test dropping"
    assert torch.equal(routing_map, expected)
    torch.testing.assert_close(probs, ref_probs * expected, rtol=0, atol=0)
    # Metrics: closed form from the maps.
    assert torch.equal(router.last_tokens_per_expert, expected.sum(dim=0))
    assert torch.equal(router.last_tokens_per_expert_before_drop, routed.sum(dim=0))
    fraction = 1 - expected.sum().item() / routed.sum().item()
    assert router.last_dropped_fraction.item() == pytest.approx(fraction, abs=1e-12)
    assert torch.equal(dropless.last_tokens_per_expert, routed.sum(dim=0))
    assert dropless.last_dropped_fraction.item() == 0.0


@on_one_rank
def test_position_policy_against_upstream(pgs, cuda):
    """Upstream keeps as many tokens per expert as we do; which ones is up to torch.topk over a 0/1 map
    (on CPU not the earliest), so only the counts and the kept-within-routed property are compared."""
    config = _config(moe_expert_capacity_factor=0.5, moe_token_drop_policy="position")
    weights = _weights(config)
    x, r = _inputs(8)
    with cuda.upstream():
        upstream = _run(_load(TopKRouter(config, pg_collection=pgs), weights), x, r)
    ours = _run(_load(FoldRouter(config, pg_collection=pgs), weights), x, r)
    dropless = _run(_load(FoldRouter(_config(), pg_collection=pgs), weights), x, r)
    assert not torch.equal(dropless["map"], ours["map"]), "nothing dropped: the comparison would be vacuous"
    assert torch.equal(ours["map"].sum(dim=0), upstream["map"].sum(dim=0))
    assert not (upstream["map"] & ~dropless["map"]).any() and not (ours["map"] & ~dropless["map"]).any()
    torch.testing.assert_close(ours["probs"], dropless["probs"] * ours["map"], rtol=0, atol=0)


# ---- checks ---------------------------------------------------------------------------------------------

@on_one_rank
def test_non_finite_logits_name_the_layer(pgs, cuda):
    config = _config()
    x = _inputs(8)[0]
    x[3, 1, 0] = float("nan")
    x[5, 0, 2] = float("inf")
    strict = _load(FoldRouter(config, pg_collection=pgs, check_finite=True), _weights(config))
    strict.set_layer_number(7)
    with pytest.raises(NonFiniteRouterScores, match=r"MoE layer 7: router scores are NaN or infinite for 2 of 36 "
                                                     r"tokens on this rank \(2 on the ranks"):
        strict(x)
    lenient = _load(FoldRouter(config, pg_collection=pgs), _weights(config))  # the default: no check, no sync
    probs, _ = lenient(x)
    bad_rows = torch.isnan(probs).any(dim=-1).view(S, B)
    assert bad_rows[3, 1] and bad_rows[5, 0]  # the check is off: the NaN reaches the output
    assert bad_rows.sum() == 2


BAD = {
    "no-groups": (dict(), dict(pg_collection=None), "needs the folded ProcessGroupCollection"),
    # Accepted since issue 13 (fusion, quantile balancing, force-balancing: tests/moe/test_flags.py);
    # what Megatron itself refuses in combination is refused up front, naming the flags.
    "quantile-with-aux-loss": (dict(moe_router_load_balancing_type="quantile_balancing", moe_aux_loss_coeff=0.1), {},
                               "moe_router_load_balancing_type='quantile_balancing' with moe_aux_loss_coeff=0.1"),
    "flex-dispatcher": (dict(moe_token_dispatcher_type="flex"), {}, "moe_token_dispatcher_type='flex'"),
    "scope": (dict(), dict(drop_scope="document"),
              "unknown drop scope 'document'; choose one of: subsequence, sequence"),
}


@pytest.mark.parametrize("case", list(BAD))
@on_one_rank
def test_bad_construction_is_explained(pgs, cuda, case):
    overrides, kwargs, message = BAD[case]
    kwargs = {"pg_collection": pgs, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FoldRouter(_config(**overrides), **kwargs)


@on_one_rank
def test_bad_input_shape_is_explained(pgs, cuda):
    router = _load(FoldRouter(_config(), pg_collection=pgs), _weights(_config()))
    with pytest.raises(ValueError, match=r"MoE layer 1: FoldRouter expects hidden states \[seq_local, batch, "
                                         r"hidden=16\] or \[tokens, hidden=16\], got shape \(36, 1, 1, 16\)"):
        router(torch.zeros(S * B, 1, 1, H))
    with pytest.raises(ValueError, match=r"got shape \(36, 15\)"):
        router(torch.zeros(S * B, H - 1))


# ---- bf16: the gate GEMM and the drop decision -------------------------------------------------------

@on_one_rank
def test_bf16_gate_is_megatrons_router_gating_linear_with_fp32_logits(pgs, cuda, monkeypatch):
    """16-bit input and weight, fp32 logits through Megatron's own function (TE's bf16-in / fp32-out GEMM
    on GPUs); equal to the fp32 product of the same bf16 values."""
    from megatron.core.transformer.moe import moe_utils

    calls = []
    original = moe_utils.router_gating_linear
    monkeypatch.setattr(moe_utils, "router_gating_linear", lambda *a: calls.append(a[3]) or original(*a))
    config = _config(moe_router_dtype="fp32", params_dtype=torch.bfloat16, bf16=True)
    router = _load(FoldRouter(config, pg_collection=pgs), _weights(config)).to(torch.bfloat16)
    x = _inputs(8)[0].to(torch.bfloat16).requires_grad_(True)
    logits = router.gating(x)
    assert calls == [torch.float32] and logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ router.weight.float().t(), rtol=1e-6, atol=1e-6)
    logits.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and router.weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("scope", ["subsequence", "sequence"])
@on_one_rank
def test_drop_decision_uses_fp32_scores_in_bf16(pgs, cuda, scope):
    """Two tokens compete for one slot of expert 0. In bf16 their probabilities round to the same value
    (187/256), so the earlier token would win the tie; in fp32 the later one is likelier
    (1/(1+e^-1) = 0.7311 against 1/(1+e^-0.9922) = 0.7295) and must keep the slot."""
    config = _config(moe_expert_capacity_factor=1.0, params_dtype=torch.bfloat16, bf16=True)  # capacity 1
    router = _load(FoldRouter(config, pg_collection=pgs, drop_scope=scope), _weights(config))
    logits = torch.full((2, 1, 8), -4.0)
    logits[:, 0, 0] = 2.0
    logits[0, 0, 1], logits[1, 0, 1] = 1.0078125, 1.0  # token 0 is a little less sure of expert 0
    logits = logits.to(torch.bfloat16)
    router.gating = lambda inp: logits
    probs, kept = router(torch.zeros(2, 1, H, dtype=torch.bfloat16))
    bf16_probs = torch.softmax(logits.view(2, 8)[:, :2], dim=-1, dtype=torch.float32).to(torch.bfloat16)
    assert bf16_probs[0, 0] == bf16_probs[1, 0] == 187 / 256  # the premise: a tie in bf16
    assert probs.dtype == torch.bfloat16 and probs[1, 0] == 187 / 256 and probs[0, 0] == 0
    assert kept[:, 0].tolist() == [False, True], kept  # fp32 decides: the later, likelier token
    assert kept[:, 1].tolist() == [True, False], kept  # expert 1: token 0 (0.2705 > 0.2689) either way
