#!/usr/bin/env python
"""Benchmark: FoldMoELayer vs Megatron-Core's alltoall MoELayer (and, with --baseline-rev, vs FoldMoELayer
at another git revision), side by side in one run.

Forward + backward of a Mixtral-like layer (8 experts, top-2) and a Qwen2-MoE-like layer (64 experts,
top-8, shared expert), scaled down, under the same folded layouts and weights on 8 ranks. Per layout,
model and side, per layer (forward + backward):
- time: median over --iters, every side timed in alternation, the order rotated each round, so that
  machine noise, drift and the slot's bias hit all alike; the ratio is to Megatron's;
- syncs: host-device synchronisations a GPU would make (testing.host_sync; on CUDA also the warnings of
  torch.cuda.set_sync_debug_mode);
- colls, KB sent: torch.distributed calls and the bytes this rank puts on the wire (all collectives);
- kernels, copies, KB copied: ATen ops that launch a kernel, those of them that only move values, and
  the bytes those write (testing.op_counter);
and per layout and model: forward hidden-state bytes against the minimum the routing needs, the cost of
ours' NaN check (off by default) in collectives, and the extra time of sequence-scope dropping.

    .venv/bin/python scripts/bench_moe_layer.py [--iters 20] [--seq 64] [--hidden 64] [--baseline-rev REV]
        [--layouts tp2,ep4,etp1 ep8 tp2,ep2,etp2] [--models mixtral-like qwen2-moe-like] [--bf16]
        [--device cpu|cuda] [--dry-run]

--device cpu (the default without CUDA): 8 gloo ranks in CPU mode; ranks sharing a few cores make
timings noisy: read ratios, not milliseconds. --device cuda (the default with CUDA): 8 nccl ranks, one
GPU each, so the all-to-alls cross GPUs; refused with fewer than 8 GPUs. --bf16: bf16 parameters and
activations, fp32 router (what a GPU run uses). --baseline-rev: the layer of that revision of this
repository (git archive; e.g. the commit before a change) as a third side, "before". --dry-run checks
the arguments and the machine, prints the plan and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec  # noqa: E402

from megatron_fold import FoldedLayout, cpu, parallel_state  # noqa: E402
from megatron_fold.plan.command import parse_layout  # noqa: E402
from megatron_fold.specs import get_fold_moe_module_spec  # noqa: E402
from megatron_fold.testing import moe_reference as ref  # noqa: E402  (full weights, sharded loading)
from megatron_fold.testing.baseline import BaselinePackage  # noqa: E402
from megatron_fold.testing.host_sync import HostSyncCounter  # noqa: E402
from megatron_fold.testing.multirank import run_on_ranks  # noqa: E402  (fork-based ranks)
from megatron_fold.testing.op_counter import OpCounter  # noqa: E402
from megatron_fold.train.job import folded_layout  # noqa: E402

WORLD = 8
MODELS = {
    "mixtral-like": dict(num_moe_experts=8, moe_router_topk=2),  # 8 experts top-2
    "qwen2-moe-like": dict(num_moe_experts=64, moe_router_topk=8, shared=True),  # 64 top-8 + shared expert
}
LAYOUTS = ["tp2,ep4,etp1", "ep8", "tp2,ep2,etp2"]

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


# ---- the sides: Megatron's layer, ours, ours at the baseline revision -----------------------------------

class Side:
    """A layer and the import context it runs in (the baseline's modules for "before")."""

    def __init__(self, name, layer, context=contextlib.nullcontext):
        self.name, self.layer, self.context = name, layer, context

    def __call__(self, x):
        with self.context():
            out, _ = self.layer(x.clone().requires_grad_(True))
            return out

    def step(self, x, counter=None):
        """Forward + backward; with a HostSyncCounter, its backward so the mode sees autograd's ops."""
        with self.context():
            self._step(x, counter)

    def timed_step(self, x) -> float:
        """Seconds of one forward + backward, all ranks and the device settled before and after; the
        import context is entered outside the timed span (swapping sys.modules costs milliseconds)."""
        with self.context():
            _settle(x)
            start = time.perf_counter()
            self._step(x)
            _settle(x)
            return time.perf_counter() - start

    def _step(self, x, counter=None):
        out, _ = self.layer(x.clone().requires_grad_(True))
        loss = out.float().sum()
        if counter is not None:
            counter.backward(loss)
        else:
            loss.backward()


def _config(model, layout, hidden, precision, **extra):
    cfg = dict(MODELS[model])
    shared = cfg.pop("shared", False)
    config = ref.make_moe_config(layout, hidden_size=hidden, shared_expert=shared,
                                 moe_token_dispatcher_type="alltoall", **cfg, **precision, **extra)
    config.moe_ffn_hidden_size = config.ffn_hidden_size = 2 * hidden
    if shared:
        config.moe_shared_expert_intermediate_size = 2 * hidden
    return config


def _build(spec_fn, config, pgs, device, dtype, context=contextlib.nullcontext, **spec_kwargs):
    # Built under the sync counter's tagging (counting nothing), so that the host tensors a layer makes at
    # construction (Megatron's chunk-sort indices) are known as such when the syncs are counted.
    with context(), HostSyncCounter(counting=False).watching():
        layer = spec_fn(use_te=False, num_experts=config.num_moe_experts, **spec_kwargs)(config=config,
                                                                                          pg_collection=pgs)
    layer.set_layer_number(1)
    ref.load_full_weights(layer, ref.full_moe_weights(config, seed=0), pgs)
    return layer.to(device=device, dtype=dtype)


def _precision(args):
    return dict(bf16=True, params_dtype=torch.bfloat16, moe_router_dtype="fp32") if args.bf16 else {}


def _sides(model, layout, pgs, args, device, dtype, baseline):
    config = _config(model, layout, args.hidden, _precision(args))
    sides = [Side("upstream", _build(get_moe_module_spec, config, pgs, device, dtype))]
    if baseline is not None:
        spec = baseline.module("megatron_fold.specs").get_fold_moe_module_spec
        sides.append(Side("before", _build(spec, config, pgs, device, dtype, baseline.active), baseline.active))
    sides.append(Side("ours", _build(get_fold_moe_module_spec, config, pgs, device, dtype)))
    return sides, config


def _settle(x):  # every rank, and the GPU's queue, done with what came before
    if x.is_cuda:
        torch.cuda.synchronize()
    dist.barrier()


def _time_alternated(sides, x, iters):
    """Median seconds of each side's forward + backward, the sides timed in turn, the order rotated every
    round (A B C, B C A, C A B, ...): on a loaded machine the slot a side runs in biases its time by a few
    percent, so no side keeps one slot. One untimed round first warms up allocators and caches."""
    times = {side.name: [] for side in sides}
    for round_ in range(iters + 1):
        shift = round_ % len(sides)
        for side in sides[shift:] + sides[:shift]:
            seconds = side.timed_step(x)
            if round_:
                times[side.name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def _counts(side, x):
    """Per layer, forward + backward: collectives, bytes sent, kernels, copies, bytes copied, syncs."""
    with CollectiveCounter() as fwd:
        with torch.no_grad():
            side(x)
    ops = OpCounter()
    with CollectiveCounter() as total, ops:
        side.step(x)
    syncs = HostSyncCounter()
    with syncs.watching():
        side.step(x, syncs)
    row = dict(fwd_bytes=fwd.bytes, calls=total.calls, bytes=total.bytes, kernels=ops.kernels, copies=ops.copies,
               copy_bytes=ops.copy_bytes, syncs=syncs.count)
    if x.is_cuda:  # the device's own account of synchronising calls
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                side.step(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        row["cuda_syncs"] = sum("synchronizing" in str(w.message) for w in caught)
    return row


def _min_forward_bytes(layer, x, layout, pgs):
    """Hidden-state bytes the routing forces off this rank in one forward: each (token, expert) pair
    whose expert lives on another EP rank goes there and comes back; with ETP, each pair also reaches
    the other ETP-1 ranks of its expert and their partial outputs come back."""
    with torch.no_grad():
        _, routing_map = layer.router(x)
    E, P = routing_map.shape[1], layout.ep
    owner = torch.arange(E, device=routing_map.device) // (E // P)
    me = dist.get_rank(pgs.ep)
    pairs_remote = int(routing_map[:, owner != me].sum())
    pairs = int(routing_map.sum())
    row = x.shape[-1] * x.element_size()
    return 2 * pairs_remote * row + 2 * (layout.etp - 1) * pairs * row


def _rank(rank, world_size, layout_kwargs, args, baseline=None):
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        c = layout.rank_coords(rank)
        g = torch.Generator().manual_seed(c["dp"])
        x_full = torch.randn(args.seq, 2, args.hidden, generator=g)
        x = ref.shard_like_megatron(x_full, pgs.tp.rank(), pgs.tp.size(), pgs.cp).to(device=device, dtype=dtype)
        rows = {}
        for model in args.models:
            sides, config = _sides(model, layout, pgs, args, device, dtype, baseline)
            res = {side.name: _counts(side, x) for side in sides}
            for name, seconds in _time_alternated(sides, x, args.iters).items():
                res[name]["time"] = seconds
            # The NaN check (off by default, ours alone: upstream has no such check) costs an all-reduce.
            checked = Side("checked", _build(get_fold_moe_module_spec, config, pgs, device, dtype, check_finite=True))
            with CollectiveCounter() as total:
                checked.step(x)
            extra = dict(checked_calls=total.calls, min_fwd_bytes=_min_forward_bytes(sides[-1].layer, x, layout, pgs))
            dropping = _config(model, layout, args.hidden, _precision(args), moe_expert_capacity_factor=1.0)
            scope_sides = [Side(scope, _build(get_fold_moe_module_spec, dropping, pgs, device, dtype, drop_scope=scope))
                           for scope in ("subsequence", "sequence")]
            scope_times = _time_alternated(scope_sides, x, args.iters)
            extra["seq_extra"] = scope_times["sequence"] / scope_times["subsequence"] - 1
            rows[model] = (res, extra)
        return rows
    finally:
        parallel_state.destroy_model_parallel()


# ---- the command ------------------------------------------------------------------------------------------

def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seq", type=int, default=64, help="sequence length per data-parallel replica")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layouts", nargs="+", default=LAYOUTS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--baseline-rev", default=None, help="also time FoldMoELayer at this git revision ('before')")
    p.add_argument("--bf16", action="store_true", help="bf16 parameters and activations, fp32 router")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="cpu: gloo ranks in CPU mode; cuda: nccl ranks, one GPU each (default: cuda where available)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and the machine, print the plan")
    args = p.parse_args(argv)
    have_cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if have_cuda else "cpu")
    if args.device == "cuda" and (not have_cuda or torch.cuda.device_count() < WORLD):
        p.exit(2, f"bench_moe_layer.py: --device cuda runs {WORLD} ranks with one GPU each, but this machine has "
                  f"{torch.cuda.device_count() if have_cuda else 0} GPU(s); use --device cpu\n")
    if args.device == "cpu" and have_cuda:
        p.exit(2, "bench_moe_layer.py: --device cpu needs a machine without CUDA (CPU mode answers Megatron's CUDA "
                  "calls only there); on this GPU node use --device cuda\n")
    if args.iters < 1 or args.seq < 1 or args.hidden < 8:
        p.exit(2, f"bench_moe_layer.py: --iters {args.iters} and --seq {args.seq} must be >= 1, --hidden "
                  f"{args.hidden} >= 8\n")
    try:
        args.layout_kwargs = []
        for text in args.layouts:
            layout = folded_layout(WORLD, parse_layout(text))
            args.layout_kwargs.append(dict(tp=layout.tp, cp=layout.cp, pp=layout.pp, ep=layout.ep, etp=layout.etp))
            if layout.pp > 1:
                raise ValueError(f"layout {text!r}: one MoE layer has no pipeline; leave out pp")
            for model in args.models:
                experts = MODELS[model]["num_moe_experts"]
                if experts % layout.ep:
                    raise ValueError(f"layout {text!r}: {model} has {experts} experts, not divisible by EP {layout.ep}")
            if args.seq % (2 * layout.cp if layout.cp > 1 else 1) or (args.seq // layout.cp) % layout.tp:
                raise ValueError(f"layout {text!r}: --seq {args.seq} does not split over CP {layout.cp} and TP "
                                 f"{layout.tp} (sequence parallelism)")
    except ValueError as e:
        p.exit(2, f"bench_moe_layer.py: {e}\n")
    args.baseline = None
    if args.baseline_rev:
        try:  # opened here, before any rank starts (the ranks fork with it): a bad revision is one line
            args.baseline = BaselinePackage(args.baseline_rev)
        except (ValueError, RuntimeError) as e:
            p.exit(2, f"bench_moe_layer.py: {e}\n")
    return args


def _plan(args) -> str:
    sides = "Megatron's alltoall MoELayer, " + (f"ours at {args.baseline_rev} = {args.baseline.commit} (before), "
                                                 if args.baseline else "")
    return (f"would time {args.iters} forward+backward iterations of {', '.join(args.models)} under "
            f"{', '.join(args.layouts)} on {WORLD} "
            f"{'nccl ranks, one GPU each' if args.device == 'cuda' else 'gloo ranks in CPU mode'}, "
            f"{'bf16' if args.bf16 else 'fp32'}, seq {args.seq} x batch 2 per replica, hidden {args.hidden}: "
            f"{sides}ours, alternated; and count syncs, collectives, bytes, kernels and copies per layer")


def main(argv=None):
    args = _parse(argv)
    try:
        _run(args)
    finally:
        if args.baseline is not None:
            args.baseline.close()


def _run(args):
    if args.dry_run:
        print(_plan(args))
        return
    if args.device == "cpu":
        cpu.enable_cpu_mode()
    print(f"{WORLD} {'GPU nccl' if args.device == 'cuda' else 'CPU gloo'} ranks, {'bf16' if args.bf16 else 'fp32'}, "
          f"seq {args.seq} x batch 2 per replica, hidden {args.hidden}, median of {args.iters} fwd+bwd iterations, "
          f"the sides timed in alternation (max over ranks)" +
          (f"; before = FoldMoELayer at {args.baseline_rev}" if args.baseline_rev else "") + "\n")
    cuda = args.device == "cuda"
    cuda_header = f"{'cuda':>5}" if cuda else ""
    header = (f"{'layout':<14} {'model':<15} {'side':<9} {'time/up':>7} {'syncs':>5}{cuda_header} "
              f"{'colls':>5} {'KB sent':>9} {'kernels':>7} {'copies':>6} {'KB copied':>9}")
    print(header)
    print("-" * len(header))
    notes = []
    for text, layout_kwargs in zip(args.layouts, args.layout_kwargs):
        per_rank = run_on_ranks(_rank, WORLD, layout_kwargs, args, args.baseline, timeout=1800,
                                backend="nccl" if cuda else "gloo")
        for model in args.models:
            rs = [r[model] for r in per_rank]
            up_time = max(r[0]["upstream"]["time"] for r in rs)
            for name in rs[0][0]:
                side = [r[0][name] for r in rs]
                worst = {k: max(s[k] for s in side) for k in side[0]}  # the slowest / busiest rank
                cuda_col = f" {worst['cuda_syncs']:>4}" if cuda else ""
                print(f"{text:<14} {model:<15} {name:<9} {worst['time'] / up_time:>7.2f} {worst['syncs']:>5}{cuda_col} "
                      f"{side[0]['calls']:>5} {worst['bytes'] / 1024:>9.1f} {worst['kernels']:>7} "
                      f"{worst['copies']:>6} {worst['copy_bytes'] / 1024:>9.1f}")
            b_min = sum(r[1]["min_fwd_bytes"] for r in rs)
            b_ours = sum(r[0]["ours"]["fwd_bytes"] for r in rs)
            b_up = sum(r[0]["upstream"]["fwd_bytes"] for r in rs)
            ratio = (lambda b: f"{b / b_min:.2f}" if b_min else "n/a")
            notes.append(f"{text:<14} {model:<15} forward bytes / minimum: ours {ratio(b_ours)}, upstream "
                         f"{ratio(b_up)}; NaN check on: {rs[0][1]['checked_calls']} colls (off: "
                         f"{rs[0][0]['ours']['calls']}); sequence-scope dropping "
                         f"{max(r[1]['seq_extra'] for r in rs):+.1%} time over subsequence scope")
    print("\n" + "\n".join(notes))
    print("\ntime/up: median forward+backward time over Megatron's (slowest rank); syncs: host-device "
          "synchronisations a GPU would make (testing.host_sync" + ("; cuda: torch.cuda.set_sync_debug_mode's count"
                                                                    if cuda else "") +
          "); colls: torch.distributed calls on rank 0; KB sent: bytes put on the wire, forward and backward "
          "(busiest rank); kernels: ATen ops that launch a kernel; copies / KB copied: those that only move values "
          "and the bytes they write (testing.op_counter, busiest rank).")


if __name__ == "__main__":
    main()
