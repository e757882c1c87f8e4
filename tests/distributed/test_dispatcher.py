"""FlexFoldDispatcher against a single-process closed form, on 8 gloo ranks and five folded layouts.

The "experts" are known functions: global expert e multiplies its rows by e+1, and the routing
probability is applied the way Megatron-Core 0.19's experts apply it (the activation is scaled by
`permuted_probs`). With ETP > 1 each ETP rank returns a share of that output, the shares summing to
exactly 1 (as fc2's partial sums do), so the combine's reduce-scatter must add them back. Reference:
out[n] = sum over routed e of prob[n, e] * (e+1) * x[n], with autograd for the gradients.

Checked per rank and case: output, gradients w.r.t. hidden states and probabilities, tokens per
local expert (returned and exposed), every collective and byte of forward + backward against the
count the routing requires, and bitwise equality of two identical runs. Capacities (each expert's cap
per rank and the drop-and-pad block size) come from Megatron's get_capacity, its drop-and-pad, and a
brute-force maximum over Megatron's CP split (tests/moe/capacity_oracle.py), not from capacity.py.
"""

import copy

import pytest
import torch
import torch.distributed as dist

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.moe.dispatcher import FlexFoldDispatcher
from megatron_fold.testing import moe_reference as ref
from megatron_fold.testing.multirank import run_on_ranks
from tests.moe.capacity_oracle import megatron_capacity, sequence_padded, subsequence_padded

W, H, S, B = 8, 8, 4, 2
LAYOUTS = {
    "ep8": dict(ep=8),
    "tp2-ep4-etp1": dict(tp=2, ep=4, etp=1),
    "tp2-ep2-etp2": dict(tp=2, ep=2, etp=2),
    "cp2-ep4": dict(cp=2, ep=4),
    "etp2-ep4": dict(ep=4, etp=2),
}
# mode -> (capacity factor, pad, drop scope)
MODES = {
    "dropless": (None, False, "subsequence"),
    "dropping": (1.0, False, "subsequence"),
    "pad-subsequence": (1.0, True, "subsequence"),
    "pad-sequence": (1.0, True, "sequence"),
}
ROUTINGS = [(8, 1), (8, 2), (8, 8), (64, 1), (64, 2), (64, 8)]  # (experts, top-k)
EDGES = ["rank-sends-nothing", "rank-receives-nothing", "expert-without-tokens", "one-token-per-rank",
         "all-dropped-but-one-per-expert"]


def _cases():
    """(name, experts, topk, local seq, batch) for every routing and edge case."""
    out = [(f"E{e}-top{k}", e, k, S, B) for e, k in ROUTINGS]
    for edge in EDGES:
        out.append((edge, 8, 2, 1 if edge == "one-token-per-rank" else S, 1 if edge == "one-token-per-rank" else B))
    return out


def _keep_first(routing_map, cap):
    """Brute-force token dropping: each expert keeps its first `cap` tokens (in row order)."""
    position = routing_map.long().cumsum(dim=0) - 1
    return routing_map & (position < cap)


def _routing(name, rank, E, k, seq, batch, layout, generator):
    n = seq * batch
    scores = torch.rand(n, E, generator=generator)
    routing_map = torch.zeros(n, E, dtype=torch.bool).scatter(1, scores.topk(k, dim=1).indices, True)
    if name == "rank-sends-nothing" and rank == 3:
        routing_map[:] = False
    if name == "rank-receives-nothing":  # no token anywhere for the experts of EP rank 1
        L = E // layout.ep
        routing_map[:, L:2 * L] = False
    if name == "expert-without-tokens":
        routing_map[:, 5] = False
    if name == "all-dropped-but-one-per-expert":
        routing_map[:] = False
        if rank == 0:
            routing_map[torch.arange(E) % n, torch.arange(E)] = True
    return routing_map, scores


def _capacity_for(mode, layout, E, k, seq, batch):
    """The routing map's per-rank cap per expert in `mode` (None: dropless), and the padded size; from
    Megatron's get_capacity and drop-and-pad and the brute force of tests/moe/capacity_oracle.py, never
    from capacity.py (what the dispatcher sizes its blocks with)."""
    cf, pad, scope = MODES[mode]
    if cf is None:
        return None, None
    if not pad:
        return megatron_capacity(seq * batch, k, E, cf), None
    if scope == "subsequence":
        padded = subsequence_padded(seq * batch, k, E, cf)
    else:
        padded = sequence_padded(seq * layout.cp * layout.tp, layout.tp, layout.cp, batch, k, E, cf)
    return padded, padded


def _megatron_input(mode, layout, seq):
    """Whether Megatron could feed this layout `seq` tokens per rank: its CP split needs 2*CP chunks. The
    sequence-scope bound is taken over Megatron's split, so the mode is skipped where there is none."""
    return MODES[mode][2] != "sequence" or layout.cp == 1 or (seq * layout.cp * layout.tp) % (2 * layout.cp) == 0


def _expert_compute(dispatcher, grouped, tokens_per_expert, probs, etp_rank, etp):
    """Local expert l multiplies rows by (global id + 1); probs scale the result as MLP's
    per_token_scale does; this ETP rank returns the share (2t+1)/T^2 of it."""
    scale = torch.cat([torch.full((int(n),), float(dispatcher.local_expert_indices[l] + 1))
                       for l, n in enumerate(tokens_per_expert.tolist())])
    share = (2 * etp_rank + 1) / etp ** 2
    return grouped * (scale * share).unsqueeze(1) * probs.unsqueeze(1)


def _one_pass(dispatcher, x, routing_map, probs, etp_rank, etp):
    hidden, p = dispatcher.dispatch_preprocess(x, routing_map, probs)
    hidden, p = dispatcher.token_dispatch(hidden, p)
    grouped, tokens_per_expert, grouped_p = dispatcher.dispatch_postprocess(hidden, p)
    out = dispatcher.combine_preprocess(_expert_compute(dispatcher, grouped, tokens_per_expert, grouped_p,
                                                        etp_rank, etp))
    out = dispatcher.token_combine(out)
    return dispatcher.combine_postprocess(out), tokens_per_expert


def _run_layout(rank, world_size, layout_kwargs):
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        etp_rank, etp = dist.get_rank(pgs.expt_tp), dist.get_world_size(pgs.expt_tp)
        ep_rank = dist.get_rank(pgs.ep)
        results = {}
        for mode, (cf, pad, scope) in MODES.items():
            for ci, (name, E, k, seq, batch) in enumerate(_cases()):
                if not _megatron_input(mode, layout, seq):
                    continue
                # Megatron-Core 0.19 refuses top-1 routing without pre-softmax (a router matter only).
                config = ref.make_moe_config(layout, hidden_size=H, num_moe_experts=E, moe_router_topk=k,
                                             moe_router_pre_softmax=k == 1, moe_expert_capacity_factor=cf,
                                             moe_pad_expert_input_to_capacity=pad)
                L = E // layout.ep
                g = torch.Generator().manual_seed(1000 * rank + ci)
                routing_map, scores = _routing(name, rank, E, k, seq, batch, layout, g)
                cap, _ = _capacity_for(mode, layout, E, k, seq, batch)
                if cap is not None:
                    routing_map = _keep_first(routing_map, cap)
                probs = torch.where(routing_map, scores, torch.zeros_like(scores))
                x = torch.randn(seq, batch, H, generator=g)
                w = torch.randn(seq, batch, H, generator=g)
                runs = []
                for _ in range(2):  # twice: bitwise determinism
                    xr, pr = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
                    dispatcher = FlexFoldDispatcher(L, list(range(ep_rank * L, (ep_rank + 1) * L)), config, pgs,
                                                    drop_scope=scope)
                    out, tokens_per_expert = _one_pass(dispatcher, xr, routing_map, pr, etp_rank, etp)
                    (out * w).sum().backward()
                    runs.append((out.detach(), xr.grad, pr.grad))
                results[mode, name] = dict(
                    x=x, probs=probs, routing_map=routing_map, w=w, runs=runs,
                    tokens_per_expert=tokens_per_expert, last=dispatcher.last_tokens_per_local_expert.clone(),
                    calls=dict(dispatcher.comm_counter.calls), sent=dict(dispatcher.comm_counter.bytes_sent))
        if layout_kwargs == LAYOUTS["etp2-ep4"]:
            results["errors"] = _bad_input(rank, layout, pgs, ep_rank)
        return results
    finally:
        parallel_state.destroy_model_parallel()


def _bad_input(rank, layout, pgs, ep_rank):
    """Every rank passes the same bad input, so every rank raises (before or after the same collectives)."""
    E, L = 8, 2
    messages = {}

    def catch(key, fn):
        try:
            fn()
            messages[key] = None
        except (ValueError, RuntimeError) as e:  # RuntimeError: a device-side assert (raised at once on a CPU)
            messages[key] = str(e)

    def dispatch(d, x, routing_map, probs):  # the count checks run where the host reads the counts
        d.token_dispatch(*d.dispatch_preprocess(x, routing_map, probs))

    local = list(range(ep_rank * L, (ep_rank + 1) * L))
    pad_cfg = ref.make_moe_config(layout, hidden_size=H, num_moe_experts=E, moe_router_topk=2,
                                  moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)
    x = torch.randn(S, B, H)
    everything = torch.ones(S * B, E, dtype=torch.bool)  # 8 tokens per expert, blocks hold 2
    d = FlexFoldDispatcher(L, local, pad_cfg, pgs)
    catch("over-capacity", lambda: dispatch(d, x, everything, everything.float()))
    dropless = ref.make_moe_config(layout, hidden_size=H, num_moe_experts=E, moe_router_topk=2)
    d = FlexFoldDispatcher(L, local, dropless, pgs)
    catch("too-many-experts", lambda: dispatch(d, x, everything, everything.float()))
    # Only rank 3's map is malformed: the count exchange carries it, so every rank raises.
    top2 = torch.zeros(S * B, E, dtype=torch.bool)
    top2[:, :2] = True
    catch("one-rank-too-many", lambda: dispatch(d, x, everything if rank == 3 else top2, top2.float()))
    catch("map-shape", lambda: d.dispatch_preprocess(x, everything[:5], everything.float()))
    catch("map-dtype", lambda: d.dispatch_preprocess(x, everything.float(), everything.float()))
    catch("indices", lambda: FlexFoldDispatcher(L, [e + 1 for e in local], dropless, pgs))
    no_cf = copy.copy(dropless)
    no_cf.moe_pad_expert_input_to_capacity = True
    catch("pad-needs-cf", lambda: FlexFoldDispatcher(L, local, no_cf, pgs))
    wrong = copy.copy(pgs)
    wrong.tp_ep = pgs.ep  # not the ETP x EP grid
    catch("tp-ep-order", lambda: FlexFoldDispatcher(L, local, dropless, wrong))
    return messages


# ---- closed-form expectations --------------------------------------------------------------------

def _reference(x, routing_map, probs, w):
    x = x.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    E = routing_map.shape[1]
    factor = (probs * routing_map * torch.arange(1, E + 1)).sum(dim=1, keepdim=True)
    out = (x.reshape(-1, x.shape[-1]) * factor).view(x.shape)
    (out * w).sum().backward()
    return out.detach(), x.grad, probs.grad


def _expected_traffic(layout, maps, rank, E, padded):
    """Per-kind calls and bytes of forward + backward on `rank`, from every rank's routing map.

    Dispatch moves rows of H fp32 values and, in a collective of its own, one fp32 probability per
    row; combine moves rows of H fp32 values.
    """
    P, T = layout.ep, layout.etp
    L = E // P
    hidden_row, prob_row = 4 * H, 4
    ep, etp = layout.group_of("ep", rank), layout.group_of("etp", rank)
    p_me, t_me = ep.index(rank), etp.index(rank)

    def counts(r):  # rows rank r sends to each expert
        return [padded] * E if padded is not None else maps[r].sum(dim=0).tolist()

    def received(r):  # rows rank r receives from each EP source over its EP group
        p_r = layout.group_of("ep", r).index(r)
        return [sum(counts(g)[p_r * L:(p_r + 1) * L]) for g in layout.group_of("ep", r)]

    send = [sum(counts(rank)[p * L:(p + 1) * L]) for p in range(P)]
    recv = received(rank)
    etp_sizes = [sum(received(g)) for g in etp]
    own = etp_sizes[t_me]
    calls, sent = {}, {}

    def add(kind, nbytes):
        calls[kind] = calls.get(kind, 0) + 1
        sent[kind] = sent.get(kind, 0) + nbytes

    if padded is None and P * T > 1:
        add("all_to_all_counts", (P * T - 1) * (L + 2) * 8)  # L counts + the widest and narrowest token, int64
    if P > 1:
        for row in (hidden_row, prob_row):  # dispatch, and the backward of the dispatch
            add("all_to_all_v", (sum(send) - send[p_me]) * row)
            add("all_to_all_v.backward", (sum(recv) - recv[p_me]) * row)
        add("all_to_all_v", (sum(recv) - recv[p_me]) * hidden_row)  # combine
        add("all_to_all_v.backward", (sum(send) - send[p_me]) * hidden_row)
    if T > 1:
        for row in (hidden_row, prob_row):
            add("all_gather_v", (T - 1) * own * row)
            add("all_gather_v.backward", (sum(etp_sizes) - own) * row)
        add("reduce_scatter_v", (sum(etp_sizes) - own) * hidden_row)
        add("reduce_scatter_v.backward", (T - 1) * own * hidden_row)
    return calls, sent


def _expected_tokens(layout, maps, rank, E):
    """Rows each local expert of `rank` receives: its tokens from every rank of its ETP x EP group."""
    L = E // layout.ep
    p_me = layout.group_of("ep", rank).index(rank)
    total = sum(maps[g].sum(dim=0) for g in layout.group_of("tp_ep", rank))
    return total[p_me * L:(p_me + 1) * L]


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_dispatch_combine_matches_closed_form(layout_name):
    layout_kwargs = LAYOUTS[layout_name]
    layout = FoldedLayout(W, **layout_kwargs)
    for mode in MODES:  # brute force once here; the forked ranks inherit the cache
        for _, E, k, seq, batch in _cases():
            if _megatron_input(mode, layout, seq):
                _capacity_for(mode, layout, E, k, seq, batch)
    results = run_on_ranks(_run_layout, W, layout_kwargs, timeout=120)
    skipped = 0
    for mode, (cf, pad, scope) in MODES.items():
        for name, E, k, seq, batch in _cases():
            if not _megatron_input(mode, layout, seq):
                skipped += 1
                continue
            maps = [results[r][mode, name]["routing_map"] for r in range(W)]
            _, padded = _capacity_for(mode, layout, E, k, seq, batch)
            for rank in range(W):
                res = results[rank][mode, name]
                where = f"{layout_name} {mode} {name} rank {rank}"
                out, gx, gp = res["runs"][0]
                r_out, r_gx, r_gp = _reference(res["x"], res["routing_map"], res["probs"], res["w"])
                torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where} output: {m}")
                torch.testing.assert_close(gx, r_gx, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where} grad x: {m}")
                torch.testing.assert_close(gp, r_gp, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where} grad probs: {m}")
                for a, b in zip(res["runs"][0], res["runs"][1]):
                    assert torch.equal(a, b), f"{where}: two identical runs differ"
                tokens = _expected_tokens(layout, maps, rank, E)
                assert torch.equal(res["last"], tokens), f"{where}: last_tokens_per_local_expert"
                T_P = layout.etp * layout.ep
                returned = torch.full_like(tokens, padded * T_P) if pad else tokens
                assert torch.equal(res["tokens_per_expert"], returned), f"{where}: tokens_per_expert"
                calls, sent = _expected_traffic(layout, maps, rank, E, padded)
                assert res["calls"] == calls, f"{where}: collectives {res['calls']} != {calls}"
                assert res["sent"] == sent, f"{where}: bytes {res['sent']} != {sent}"
    # Only one case has no Megatron CP split: one token per rank, sequence scope, under CP.
    assert skipped == (1 if layout.cp > 1 else 0), skipped
    if layout_name == "etp2-ep4":
        for rank in range(W):
            msgs = results[rank]["errors"]
            assert "more tokens than the drop-and-pad blocks hold (2)" in msgs["over-capacity"]
            assert "routed to 8 experts but moe_router_topk is 2" in msgs["too-many-experts"]
            mine = 8 if rank == 3 else 2
            assert (f"routed to 8 experts but moe_router_topk is 2 ({mine} on this rank, 8 on the ranks of its "
                    "ETP x EP group)") in msgs["one-rank-too-many"]
            assert "[tokens, experts] = [8, 8], got torch.bool [5, 8]" in msgs["map-shape"]
            assert "got torch.float32 [8, 8]" in msgs["map-dtype"]
            assert "local_expert_indices=" in msgs["indices"]
            assert "needs moe_expert_capacity_factor" in msgs["pad-needs-cf"]
            assert "is not the ETP x EP grid" in msgs["tp-ep-order"]
