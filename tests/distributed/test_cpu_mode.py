"""CPU mode: Megatron-Core's own MoELayer on 8 gloo ranks equals single-rank runs; the mode refuses on
CUDA machines and restores everything it patched.

Multi-rank runs: each data-parallel replica gets its own micro-batch [S, B, H], sharded over CP and TP
as Megatron shards it; the loss of a rank is sum(out * w) over its shard. References are single-rank
runs of the same upstream layer with the same full weights:
  - dropless: one run per micro-batch (the whole sequence). A rank's output rows and input gradient
    must equal its shard of that run.
  - token dropping: Megatron-Core decides drops over each rank's own sub-sequence (capacity from the
    rank's local token count), so a whole-sequence run drops different tokens. The reference is a
    single-rank run fed exactly one rank's shard, one run per rank; that rank's output and input
    gradient must equal it. This holds on every layout, which is the point: the oracle is
    layout-independent only at this granularity.
Parameter gradients: after summing each over the groups Megatron reduces it over
(reduce_grads_like_megatron) and reassembling shards (gather_full_grads), every rank's full gradient
must equal the sum of the reference gradients over all reference runs. The expert-bias token counts
(a router buffer) summed over ranks must equal the references' summed counts.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_fold import FoldedLayout, cpu, parallel_state
from megatron_fold.testing import moe_reference as ref
from megatron_fold.testing.multirank import run_on_ranks
from tests.moe.megatron_split import shard_positions

S, B, H = 8, 2, 16
TOL = dict(rtol=1e-5, atol=1e-5)

LAYOUTS = [
    ("tp2-ep4-etp1", dict(tp=2, ep=4, etp=1)),
    ("ep8", dict(ep=8)),
    ("tp2-ep2-etp2", dict(tp=2, ep=2, etp=2)),
    ("cp2-ep4", dict(cp=2, ep=4, etp=1)),
    ("etp2-ep4", dict(ep=4, etp=2)),            # ETP > TP: uneven all-gather over expert TP
]

A2A, AG = dict(moe_token_dispatcher_type="alltoall"), dict(moe_token_dispatcher_type="allgather")
DROP = dict(moe_expert_capacity_factor=1.0)
BIAS_AND_LOSSES = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                       moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
# name -> (reference granularity, config overrides); all top-2 over 8 experts.
CASES = {
    "alltoall": ("sequence", A2A),
    "allgather": ("sequence", AG),
    "alltoall-swiglu-gated-shared": ("sequence", dict(A2A, swiglu=True, shared_expert=True, moe_shared_expert_gate=True)),
    "alltoall-shared-overlap": ("sequence", dict(A2A, shared_expert=True, moe_shared_expert_overlap=True)),
    "alltoall-expert-bias-aux-z-loss": ("sequence", dict(A2A, **BIAS_AND_LOSSES)),
    "allgather-expert-bias-aux-z-loss": ("sequence", dict(AG, **BIAS_AND_LOSSES)),
    "alltoall-drop": ("shard", dict(A2A, **DROP)),
    "alltoall-drop-pad": ("shard", dict(A2A, **DROP, moe_pad_expert_input_to_capacity=True)),
    "allgather-drop": ("shard", dict(AG, **DROP)),
}


def _micro_batch(replica: int):
    g = torch.Generator().manual_seed(1000 + replica)
    return torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)  # input, output weight


def _shard(t, layout, rank):
    """`rank`'s rows of a full [S, B, ...] tensor: Megatron's CP split, then torch.chunk over TP."""
    c = layout.rank_coords(rank)
    return shard_positions(t, c["tp"], layout.tp, c["cp"], layout.cp)


def _reference_inputs(granularity, layout):
    """The (input, output weight) pairs of the single-rank reference runs, in a fixed order."""
    if granularity == "sequence":
        return [_micro_batch(dp) for dp in range(layout.dp)]
    return [tuple(_shard(t, layout, r) for t in _micro_batch(layout.rank_coords(r)["dp"]))
            for r in range(layout.world_size)]


def _forward_backward(layer, x, w):
    """Returns output, input gradient, and the number of (token, expert) assignments kept by the router."""
    kept = []
    hook = layer.router.register_forward_hook(lambda mod, inp, out: kept.append(int(out[1].sum())))
    x = x.clone().requires_grad_(True)
    out, bias = layer(x)
    assert bias is None
    (out * w).sum().backward()
    hook.remove()
    return out.detach(), x.grad.detach(), kept[0]


def _token_counts(layer):
    counts = getattr(layer.router, "local_tokens_per_expert", None)
    return None if counts is None else counts.clone()


def _single_rank(rank, world_size, layout_kwargs):
    layout = FoldedLayout(8, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(1))
    try:
        results = {}
        for name, (granularity, overrides) in CASES.items():
            config = ref.make_moe_config(FoldedLayout(1), hidden_size=H, **overrides)
            weights = ref.full_moe_weights(config, seed=3)
            layer = ref.build_upstream_moe_layer(config, pgs)
            ref.load_full_weights(layer, weights, pgs)
            runs = []
            for x, w in _reference_inputs(granularity, layout):
                layer.zero_grad(set_to_none=True)
                if layer.router.local_tokens_per_expert is not None:
                    layer.router.local_tokens_per_expert.zero_()
                out, gx, kept = _forward_backward(layer, x, w)
                runs.append(dict(out=out, gx=gx, kept=kept, tokens=x.shape[0] * x.shape[1],
                                 grads=ref.gather_full_grads(layer, pgs), counts=_token_counts(layer)))
            results[name] = (weights, runs)
        return results
    finally:
        parallel_state.destroy_model_parallel()


def _multi_rank(rank, world_size, layout_kwargs, reference):
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        x_full, w_full = _micro_batch(layout.rank_coords(rank)["dp"])
        x, w = _shard(x_full, layout, rank), _shard(w_full, layout, rank)
        results = {}
        for name, (_, overrides) in CASES.items():
            config = ref.make_moe_config(layout, hidden_size=H, **overrides)
            layer = ref.build_upstream_moe_layer(config, pgs)
            ref.load_full_weights(layer, reference[name][0], pgs)
            out, gx, _ = _forward_backward(layer, x, w)
            ref.reduce_grads_like_megatron(layer, pgs)
            counts = _token_counts(layer)
            if counts is not None:
                dist.all_reduce(counts)
            results[name] = dict(out=out, gx=gx, grads=ref.gather_full_grads(layer, pgs), counts=counts)
        return results
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("name,layout_kwargs", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_upstream_moe_layer_equals_single_rank(name, layout_kwargs):
    layout = FoldedLayout(8, **layout_kwargs)
    reference = run_on_ranks(_single_rank, 1, layout_kwargs, timeout=120)[0]
    per_rank = run_on_ranks(_multi_rank, 8, layout_kwargs, reference, timeout=120)
    for case, (granularity, overrides) in CASES.items():
        runs = reference[case][1]
        # The dropping cases must really drop (with padding the router's map also marks pad slots).
        if "moe_expert_capacity_factor" in overrides and not overrides.get("moe_pad_expert_input_to_capacity"):
            assert sum(r["kept"] for r in runs) < sum(r["tokens"] for r in runs) * 2, case
        expected_grads = {k: sum(r["grads"][k] for r in runs) for k in runs[0]["grads"]}
        for rank, results in enumerate(per_rank):
            got = results[case]
            where = f"{case}, rank {rank}"
            if granularity == "sequence":
                run = runs[layout.rank_coords(rank)["dp"]]
                want_out, want_gx = _shard(run["out"], layout, rank), _shard(run["gx"], layout, rank)
            else:
                want_out, want_gx = runs[rank]["out"], runs[rank]["gx"]
            torch.testing.assert_close(got["out"], want_out, **TOL, msg=lambda m: f"{where} output: {m}")
            torch.testing.assert_close(got["gx"], want_gx, **TOL, msg=lambda m: f"{where} input grad: {m}")
            assert got["grads"].keys() == expected_grads.keys(), where
            for key, want in expected_grads.items():
                torch.testing.assert_close(got["grads"][key], want, **TOL, msg=lambda m: f"{where} grad {key}: {m}")
            if got["counts"] is not None:
                assert torch.equal(got["counts"], sum(r["counts"] for r in runs)), where


# ---- the uneven all-gather CPU mode supplies, against closed form -----------------------------------

def _uneven_gather(rank, world_size, sizes):
    from megatron.core.tensor_parallel import mappings

    rows = torch.arange(sizes[rank] * 3, dtype=torch.float32).reshape(-1, 3) + 100 * rank  # [n_rank, 3]
    return mappings._gather_along_first_dim(rows, dist.group.WORLD, output_split_sizes=sizes)


def test_uneven_all_gather_returns_every_rank_rows_in_order():
    sizes = [2, 0, 3, 1]
    want = torch.cat([torch.arange(n * 3, dtype=torch.float32).reshape(-1, 3) + 100 * r for r, n in enumerate(sizes)])
    for got in run_on_ranks(_uneven_gather, 4, sizes, timeout=60):
        assert torch.equal(got, want)


# ---- refusal and restoration, each in a forked process so this one is never left altered ----------

def _module_state():
    """Every attribute of the modules CPU mode may touch, and the class attributes caching streams."""
    import importlib

    from megatron.core.models.common.embeddings import rotary_pos_embedding, yarn_rotary_pos_embedding
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    state = {}
    literal_cuda = [importlib.import_module(m) for m in cpu._CUDA_LITERAL_MODULES]
    for module in (torch.cuda, mappings, moe_utils, token_dispatcher, tp_random, rotary_pos_embedding,
                   yarn_rotary_pos_embedding, *literal_cuda):
        for key, value in vars(module).items():
            state[f"{module.__name__}.{key}"] = value
    for key, value in vars(torch.Tensor).items():
        state[f"torch.Tensor.{key}"] = value
    state["MoEAlltoAllTokenDispatcher.cuda_dtoh_stream"] = token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream
    state["SharedExpertMLP.stream"] = SharedExpertMLP.stream
    return state


def _changed(before, after):
    return sorted(k for k in before.keys() | after.keys() if before.get(k, None) is not after.get(k, None))


PATCHED = sorted([
    "torch.cuda.current_device", "torch.cuda.Stream", "torch.cuda.current_stream", "torch.cuda.synchronize",
    "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
    "megatron.core.tensor_parallel.mappings._gather_along_first_dim",
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker",
    "megatron.core.models.common.embeddings.rotary_pos_embedding.get_pos_emb_on_this_cp_rank",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding.get_pos_emb_on_this_cp_rank",
    "torch.Tensor.type", "torch.Tensor.cuda",
    "megatron.core.optimizer.optimizer.torch", "megatron.core.optimizer.clip_grads.torch",
    "megatron.core.utils.torch", "megatron.core.transformer.utils.torch",
    "megatron.core.pipeline_parallel.schedules.torch", "megatron.core.distributed.param_and_grad_buffer.torch",
    "megatron.core.optimizer.distrib_optimizer.torch",
])


def _enable_disable_cycle(rank, world_size):
    assert cpu.is_active()  # tests/conftest.py turns it on on this CUDA-less machine
    cpu.disable_cpu_mode()
    off = _module_state()
    cpu.disable_cpu_mode()  # disabling twice is harmless
    assert not cpu.is_active() and _changed(off, _module_state()) == []
    cpu.enable_cpu_mode()
    cpu.enable_cpu_mode()  # idempotent
    on = _module_state()
    # A layer built in CPU mode caches Megatron's DtoH and shared-expert streams in class attributes.
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(1))
    config = ref.make_moe_config(FoldedLayout(1), hidden_size=H, shared_expert=True,
                                 moe_shared_expert_overlap=True, **A2A)
    layer = ref.build_upstream_moe_layer(config, pgs)
    allocated = torch.empty(2, device=torch.cuda.current_device()).device.type
    cached = _changed(on, _module_state())
    cpu.disable_cpu_mode()
    restored = _changed(off, _module_state())
    with cpu.cpu_mode():
        inside = cpu.is_active()
    after_block = cpu.is_active()
    cpu.enable_cpu_mode()
    with cpu.cpu_mode():
        pass
    still_on = cpu.is_active()
    parallel_state.destroy_model_parallel()
    del layer
    return dict(patched=_changed(off, on), cached=cached, restored=restored, allocated=allocated,
                inside=inside, after_block=after_block, still_on=still_on)


def test_enable_patches_exactly_the_documented_set_and_disable_restores_it():
    r = run_on_ranks(_enable_disable_cycle, 1, timeout=60)[0]
    assert r["patched"] == PATCHED
    assert r["allocated"] == "cpu"  # Megatron's allocation idiom lands on the CPU
    assert r["cached"] == ["MoEAlltoAllTokenDispatcher.cuda_dtoh_stream", "SharedExpertMLP.stream"]
    assert r["restored"] == []  # every patched attribute and every cached CPU stream is back
    assert r["inside"] and not r["after_block"]  # cpu_mode() on an off machine: on inside, off after
    assert r["still_on"]  # cpu_mode() inside an active CPU mode leaves it active


def _with_cuda_reported(rank, world_size, start_active):
    if not start_active:
        cpu.disable_cpu_mode()
    torch_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        before = _module_state()
        errors = []
        for attempt in (cpu.enable_cpu_mode, lambda: cpu.cpu_mode().__enter__()):
            try:
                attempt()
            except cpu.CpuModeRefused as e:
                errors.append(str(e))
        return errors, _changed(before, _module_state()), cpu.is_active()
    finally:
        torch.cuda.is_available = torch_is_available


@pytest.mark.parametrize("start_active", [False, True], ids=["off", "already-on"])
def test_refuses_where_cuda_is_available(start_active):
    errors, changed, active = run_on_ranks(_with_cuda_reported, 1, start_active, timeout=60)[0]
    assert len(errors) == 2 and all("CPU mode is for machines without CUDA" in e for e in errors)
    assert changed == []  # nothing patched, nothing restored
    assert active == start_active
