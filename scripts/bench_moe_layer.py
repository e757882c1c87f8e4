#!/usr/bin/env python
"""Benchmark: FoldMoELayer vs Megatron-Core's alltoall MoELayer, side by side in one run.

Forward + backward of a Mixtral-like layer (8 experts, top-2) and a Qwen2-MoE-like layer (64 experts,
top-8, shared expert), scaled down to fit 8 CPU gloo ranks, under the same folded layouts and weights.
Prints per layout: time ratio ours / upstream, collectives per layer for each (counted by wrapping
torch.distributed, so both sides are counted the same way), hidden-state bytes sent in the forward
pass against the minimum the routing requires, and the extra time of sequence-scope dropping over
subsequence-scope dropping. With a GPU, it also times one rank on it in bf16.

    .venv/bin/python scripts/bench_moe_layer.py [--iters 20] [--seq 64] [--hidden 64]

Timings on 8 ranks sharing 2 cores are dominated by scheduling noise; read ratios, not milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec  # noqa: E402

from megatron_fold import FoldedLayout, cpu, parallel_state  # noqa: E402
from megatron_fold.specs import get_fold_moe_module_spec  # noqa: E402
from megatron_fold.testing import moe_reference as ref  # noqa: E402  (full weights, sharded loading)
from megatron_fold.testing.host_sync import HostSyncCounter  # noqa: E402
from megatron_fold.testing.multirank import run_on_ranks  # noqa: E402  (fork-based gloo ranks)

MODELS = {
    "mixtral-like (8e top-2)": dict(num_moe_experts=8, moe_router_topk=2),
    "qwen2-moe-like (64e top-8 +shared)": dict(num_moe_experts=64, moe_router_topk=8, shared=True),
}
LAYOUTS = {
    "TP2 EP4 ETP1": dict(tp=2, ep=4, etp=1),
    "EP8": dict(ep=8),
    "TP2 EP2 ETP2": dict(tp=2, ep=2, etp=2),
}

_COLLECTIVES = ["all_to_all_single", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "reduce_scatter", "all_reduce", "_all_gather_base", "_reduce_scatter_base",
                "batch_isend_irecv"]  # our uneven all-gather: point-to-point sends of one buffer


class CollectiveCounter:
    """Wraps torch.distributed's collectives: calls and bytes of the tensors handed to them."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0
        self._orig = {}

    def __enter__(self):
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                self._orig[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(self._orig[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    def _wrap(self, fn):
        name = fn.__name__

        def counted(*args, **kwargs):
            self.calls += 1
            self.bytes += _bytes_leaving_rank(name, args, kwargs)
            return fn(*args, **kwargs)
        return counted


def _bytes_leaving_rank(name, args, kwargs):
    """Bytes this rank puts on the wire (direct sends; rings for all-reduce), not counting self-copies."""
    if name == "batch_isend_irecv":  # one call: the tensors of its send operations leave this rank
        return sum(op.tensor.numel() * op.tensor.element_size() for op in args[0] if op.op is dist.isend)
    group = kwargs.get("group")
    size, me = dist.get_world_size(group), dist.get_rank(group)
    if size == 1:
        return 0
    if name == "all_to_all_single":
        out, inp = args[0], args[1]
        in_splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
        row = inp[:1].numel() * inp.element_size() if inp.shape[0] else 0
        splits = list(in_splits) if in_splits is not None and len(in_splits) else [inp.shape[0] // size] * size
        return row * (sum(splits) - splits[me])
    tensors = [a for a in args if torch.is_tensor(a)]
    nbytes = tensors[-1].numel() * tensors[-1].element_size()
    if name in ("all_gather", "all_gather_into_tensor", "_all_gather_base"):
        return nbytes * (size - 1)
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return nbytes * (size - 1) // size
    if name == "reduce_scatter":
        return sum(t.numel() * t.element_size() for t in args[1]) * (size - 1) // size
    return 2 * nbytes * (size - 1) // size  # all_reduce on a ring


def _build(kind, model, layout, pgs, hidden, extra, drop_scope="subsequence", check_finite=False):
    cfg = dict(MODELS[model])
    shared = cfg.pop("shared", False)
    config = ref.make_moe_config(layout, hidden_size=hidden, shared_expert=shared,
                                 moe_token_dispatcher_type="alltoall", **cfg, **extra)
    config.moe_ffn_hidden_size = config.ffn_hidden_size = 2 * hidden
    if shared:
        config.moe_shared_expert_intermediate_size = 2 * hidden
    # Built under the sync counter's tagging (counting nothing), so that the host tensors a layer makes at
    # construction (Megatron's chunk-sort indices) are known as such when the syncs are counted.
    with HostSyncCounter(counting=False).watching():
        if kind == "upstream":
            layer = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)(
                config=config, pg_collection=pgs)
        else:
            layer = get_fold_moe_module_spec(use_te=False, num_experts=config.num_moe_experts, drop_scope=drop_scope,
                                             check_finite=check_finite)(config=config, pg_collection=pgs)
    layer.set_layer_number(1)
    ref.load_full_weights(layer, ref.full_moe_weights(config, seed=0), pgs)
    return layer


def _fwd_bwd_seconds(layer, x):
    def settle():  # every rank, and the GPU's queue, done with what came before
        if x.is_cuda:
            torch.cuda.synchronize()
        dist.barrier()

    settle()
    start = time.perf_counter()
    out, _ = layer(x.clone().requires_grad_(True))
    out.sum().backward()
    settle()
    return time.perf_counter() - start


def _time_side_by_side(layer_a, layer_b, x, iters):
    """Medians of A and B timed in alternation (A B A B ...), so machine noise and drift hit both alike.
    One untimed round first warms up allocators and caches."""
    _fwd_bwd_seconds(layer_a, x), _fwd_bwd_seconds(layer_b, x)
    times_a, times_b = [], []
    for _ in range(iters):
        times_a.append(_fwd_bwd_seconds(layer_a, x))
        times_b.append(_fwd_bwd_seconds(layer_b, x))
    return statistics.median(times_a), statistics.median(times_b)


def _min_forward_bytes(layer, x, layout, pgs):
    """Hidden-state bytes the routing forces off this rank in one forward: each (token, expert) pair
    whose expert lives on another EP rank goes there and comes back; with ETP, each pair also reaches
    the other ETP-1 ranks of its expert and their partial outputs come back."""
    with torch.no_grad():
        _, routing_map = layer.router(x)
    E, P = routing_map.shape[1], layout.ep
    owner = torch.arange(E) // (E // P)
    me = dist.get_rank(pgs.ep)
    pairs_remote = int(routing_map[:, owner != me].sum())
    pairs = int(routing_map.sum())
    row = x.shape[-1] * x.element_size()
    return 2 * pairs_remote * row + 2 * (layout.etp - 1) * pairs * row


def _rank(rank, world_size, layout_kwargs, args):
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        c = layout.rank_coords(rank)
        g = torch.Generator().manual_seed(c["dp"])
        x_full = torch.randn(args.seq, 2, args.hidden, generator=g)
        x = ref.shard_like_megatron(x_full, pgs.tp.rank(), pgs.tp.size(), pgs.cp)  # Megatron's CP + SP split
        rows = {}
        for model in MODELS:
            res, layers = {}, {}
            for kind in ("upstream", "ours"):
                layer = layers[kind] = _build(kind, model, layout, pgs, args.hidden, {})
                with CollectiveCounter() as fwd:
                    out, _ = layer(x.clone())
                with CollectiveCounter() as total:
                    out, _ = layer(x.clone().requires_grad_(True))
                    out.sum().backward()
                res[kind] = dict(fwd_calls=fwd.calls, calls=total.calls, fwd_bytes=fwd.bytes)
            # The NaN check (off by default, ours alone: upstream has no such check) costs an all-reduce.
            checked = _build("ours", model, layout, pgs, args.hidden, {}, check_finite=True)
            with CollectiveCounter() as total:
                out, _ = checked(x.clone().requires_grad_(True))
                out.sum().backward()
            res["ours_checked_calls"] = total.calls
            for kind, layer in layers.items():  # host syncs a GPU would make (the layers are warm by now)
                syncs = HostSyncCounter()
                with syncs.watching():
                    out, _ = layer(x.clone().requires_grad_(True))
                    syncs.backward(out.sum())
                res[kind]["syncs"] = syncs.count
            res["upstream"]["time"], res["ours"]["time"] = _time_side_by_side(
                layers["upstream"], layers["ours"], x, args.iters)
            res["min_fwd_bytes"] = _min_forward_bytes(layers["ours"], x, layout, pgs)
            drop = dict(moe_expert_capacity_factor=1.0)
            res["sub_time"], res["seq_time"] = _time_side_by_side(
                _build("ours", model, layout, pgs, args.hidden, drop, "subsequence"),
                _build("ours", model, layout, pgs, args.hidden, drop, "sequence"), x, args.iters)
            rows[model] = res
        return rows
    finally:
        parallel_state.destroy_model_parallel()


def _gpu_single_rank(args):
    """One GPU rank, bf16: ours vs upstream (alltoall) on the same layer; prints the time ratio."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    layout = FoldedLayout(1)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        x = torch.randn(args.gpu_seq, 4, args.gpu_hidden, device="cuda", dtype=torch.bfloat16)
        for model in MODELS:
            up, ours = (_build(kind, model, layout, pgs, args.gpu_hidden, dict(params_dtype=torch.bfloat16, bf16=True))
                        .cuda().to(torch.bfloat16) for kind in ("upstream", "ours"))
            t_up, t_ours = _time_side_by_side(up, ours, x, args.iters)
            print(f"GPU 1 rank bf16  {model:<36} ours/upstream time {t_ours / t_up:.2f} "
                  f"({t_ours * 1e3:.2f} ms vs {t_up * 1e3:.2f} ms, median of {args.iters})")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seq", type=int, default=64, help="sequence length per data-parallel replica")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--gpu-seq", type=int, default=4096)
    p.add_argument("--gpu-hidden", type=int, default=2048)
    args = p.parse_args()

    if torch.cuda.is_available():
        _gpu_single_rank(args)
        return
    cpu.enable_cpu_mode()
    print(f"8 CPU gloo ranks, fp32, seq {args.seq} x batch 2 per replica, hidden {args.hidden}, "
          f"median of {args.iters} fwd+bwd iterations, the two sides timed in alternation (max over ranks)\n")
    header = (f"{'layout':<14} {'model':<36} {'time ours/up':>12} {'syncs ours/up':>13} {'colls ours/NaN-check/up':>24} "
              f"{'fwd bytes ours/min':>19} {'fwd bytes up/min':>17} {'seq-scope extra':>16}")
    print(header)
    print("-" * len(header))
    for lname, lk in LAYOUTS.items():
        per_rank = run_on_ranks(_rank, 8, lk, args, timeout=600)
        for model in MODELS:
            rs = [r[model] for r in per_rank]
            t_ours = max(r["ours"]["time"] for r in rs)
            t_up = max(r["upstream"]["time"] for r in rs)
            b_min = sum(r["min_fwd_bytes"] for r in rs)
            b_ours = sum(r["ours"]["fwd_bytes"] for r in rs)
            b_up = sum(r["upstream"]["fwd_bytes"] for r in rs)
            seq_extra = max(r["seq_time"] for r in rs) / max(r["sub_time"] for r in rs) - 1
            calls = f"{rs[0]['ours']['calls']}/{rs[0]['ours_checked_calls']}/{rs[0]['upstream']['calls']}"
            syncs = f"{max(r['ours']['syncs'] for r in rs)}/{max(r['upstream']['syncs'] for r in rs)}"
            print(f"{lname:<14} {model:<36} {t_ours / t_up:>12.2f} {syncs:>13} {calls:>24} "
                  f"{b_ours / b_min if b_min else float('nan'):>19.2f} "
                  f"{b_up / b_min if b_min else float('nan'):>17.2f} {seq_extra:>+15.1%}")
    print("\nsyncs: host-device synchronisations a GPU would make per layer (forward + backward, most over "
          "ranks; testing.host_sync); colls: torch.distributed calls per layer on rank 0 (forward + backward, "
          "incl. small count exchanges), ours by default and with its NaN check (check_finite=True); bytes: "
          "tensors handed to collectives in the forward pass, summed over ranks, against the hidden-state bytes "
          "the routing requires.")


if __name__ == "__main__":
    main()
