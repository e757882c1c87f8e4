"""FlexFoldDispatcher with a closed-form "expert" (expert e multiplies its rows by e+1) on edge cases:
a rank that sends nothing, an expert nobody routes to, one token per rank, everything dropped but one
token per expert; dropless and drop-and-pad; forward, backward and bitwise determinism."""

import pytest
import torch
import torch.distributed as dist

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.dispatcher import FlexFoldDispatcher
from tests import moe_reference as ref
from tests.multirank import run_on_ranks

H, E = 8, 8
LAYOUTS = [dict(ep=8), dict(tp=2, ep=4, etp=1), dict(tp=2, ep=2, etp=2), dict(tp=1, ep=4, etp=2), dict(cp=2, ep=4)]


def _case(name, rank, seq, batch, generator):
    """Routing map [seq*batch, E] and probabilities for one edge case on one rank."""
    n = seq * batch
    scores = torch.rand(n, E, generator=generator)
    top = scores.topk(2, dim=1).indices
    routing_map = torch.zeros(n, E, dtype=torch.bool).scatter(1, top, True)
    if name == "rank-sends-nothing" and rank == 3:
        routing_map[:] = False
    if name == "expert-without-tokens":
        routing_map[:, 5] = False
    if name == "all-dropped-but-one-per-expert":
        routing_map[:] = False
        if rank == 0:  # one token per expert, all from rank 0
            routing_map[torch.arange(E) % n, torch.arange(E)] = True
    probs = torch.where(routing_map, scores, torch.zeros_like(scores))
    return routing_map, probs


CASES = {  # name -> (local seq, batch)
    "random-top2": (4, 2),
    "rank-sends-nothing": (4, 2),
    "expert-without-tokens": (4, 2),
    "one-token-per-rank": (1, 1),
    "all-dropped-but-one-per-expert": (4, 2),
}


def _dispatch_combine(dispatcher, x, routing_map, probs, etp_share):
    hidden, p = dispatcher.dispatch_preprocess(x, routing_map, probs)
    hidden, p = dispatcher.token_dispatch(hidden, p)
    grouped, tokens_per_expert, grouped_p = dispatcher.dispatch_postprocess(hidden, p)
    scale = torch.cat([torch.full((int(n),), float(dispatcher.local_expert_indices[l] + 1))
                       for l, n in enumerate(tokens_per_expert.tolist())] or [torch.zeros(0)])
    # Each ETP rank holds a share of the expert's output (as fc2 partial sums do); the shares sum to 1.
    expert_out = grouped * (scale * grouped_p * etp_share).unsqueeze(1)
    out = dispatcher.combine_preprocess(expert_out)
    out = dispatcher.token_combine(out)
    return dispatcher.combine_postprocess(out), tokens_per_expert


def _run(rank, world_size, layout_kwargs, pad):
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        results = {}
        etp_rank, etp = dist.get_rank(pgs.expt_tp), dist.get_world_size(pgs.expt_tp)
        etp_share = (etp_rank + 1) / (etp * (etp + 1) / 2)
        for name, (seq, batch) in CASES.items():
            extra = dict(moe_expert_capacity_factor=4.0, moe_pad_expert_input_to_capacity=True) if pad else {}
            config = ref.make_moe_config(layout, hidden_size=H, num_moe_experts=E, **extra)
            L = E // layout.ep
            ep_rank = dist.get_rank(pgs.ep)
            runs = []
            for _ in range(2):  # twice: determinism
                g = torch.Generator().manual_seed(rank * 10 + len(name))
                routing_map, probs = _case(name, rank, seq, batch, g)
                x = torch.randn(seq, batch, H, generator=g).requires_grad_(True)
                probs = probs.clone().requires_grad_(True)
                dispatcher = FlexFoldDispatcher(L, list(range(ep_rank * L, (ep_rank + 1) * L)), config, pgs,
                                                drop_scope="sequence" if pad else "subsequence")
                out, tokens_per_expert = _dispatch_combine(dispatcher, x, routing_map, probs, etp_share)
                w = torch.randn(out.shape, generator=g)
                (out * w).sum().backward()
                runs.append((out.detach(), x.grad, probs.grad, routing_map, x.detach(), probs.detach(), w,
                             dict(dispatcher.comm_counter.calls)))
            results[name] = runs
        return results
    finally:
        parallel_state.destroy_model_parallel()


def _reference(x, routing_map, probs, w):
    """out = sum over routed experts e of prob * (e+1) * x, with autograd for the gradients."""
    x = x.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    flat = x.reshape(-1, H)
    factor = (probs * routing_map * torch.arange(1, E + 1)).sum(dim=1, keepdim=True)
    out = (flat * factor).view(x.shape)
    (out * w).sum().backward()
    return out.detach(), x.grad, probs.grad


@pytest.mark.parametrize("pad", [False, True], ids=["dropless", "pad"])
@pytest.mark.parametrize("layout_kwargs", LAYOUTS, ids=["-".join(f"{k}{v}" for k, v in kw.items()) for kw in LAYOUTS])
def test_edge_cases_match_closed_form(layout_kwargs, pad):
    for rank, results in enumerate(run_on_ranks(_run, 8, layout_kwargs, pad, timeout=120)):
        for name, runs in results.items():
            out, gx, gp, routing_map, x, probs, w, calls = runs[0]
            r_out, r_gx, r_gp = _reference(x, routing_map, probs, w)
            where = f"rank {rank} {name}"
            torch.testing.assert_close(out, r_out, rtol=1e-6, atol=1e-6, msg=lambda m: f"{where} output: {m}")
            torch.testing.assert_close(gx, r_gx, rtol=1e-6, atol=1e-6, msg=lambda m: f"{where} input grad: {m}")
            torch.testing.assert_close(gp * routing_map, r_gp * routing_map, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{where} probs grad: {m}")
            for a, b in zip(runs[0][:3], runs[1][:3]):
                assert torch.equal(a, b), f"{where}: two identical runs differ"
            # Drop-and-pad needs no count exchange (static sizes, no host synchronisation).
            assert ("all_to_all_counts" in calls) == (not pad and layout_kwargs.get("ep", 1) * layout_kwargs.get("etp", layout_kwargs.get("tp", 1)) > 1)
