"""Enumerate every folded layout a model admits on a cluster, estimate each, rank those that fit.

Validity comes from FoldedLayout (Megatron's own grid rules); the model adds its divisibility rules
(heads and query groups by TP, the shared expert's FFN by TP, experts by EP, the expert FFN by ETP,
layers by PP x VPP, the sequence by 2*CP for load-balanced ring attention and the CP-local sequence
by TP for sequence parallelism), and Megatron-Core's schedules add the batch rules (the global batch
by DP x micro-batch; with interleaving, micro-batches by PP). The cheap integer checks run before a
FoldedLayout is built, and placement is computed once per layout, so 1,024 GPUs plan in seconds.
"""

from __future__ import annotations

from megatron_fold.layout import FoldedLayout, LayoutError
from megatron_fold.plan.cost import Choice, Estimate, estimate, interleaving_violation, memory_gb
from megatron_fold.plan.hardware import GPUSpec
from megatron_fold.plan.models import ModelSpec

__all__ = ["model_violations", "model_admits", "is_coupled", "batch_violations", "candidate_layouts",
           "candidate_choices", "plan"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def model_violations(m: ModelSpec, seq: int, tp: int, cp: int, pp: int, ep: int, etp: int) -> list[str]:
    """Every rule of the model (not of the grid: FoldedLayout checks those) that the sizes break."""
    out = []
    if m.num_heads % tp or m.num_query_groups % tp:
        out.append(f"TP {tp} must divide the {m.num_heads} attention heads and {m.num_query_groups} query "
                   f"groups; TP values that fit: {_common_divisors(m.num_heads, m.num_query_groups)}")
    if m.shared_expert_ffn and m.shared_expert_ffn % tp:
        out.append(f"TP {tp} must divide the shared expert's FFN size {m.shared_expert_ffn}")
    if m.num_experts % ep:
        out.append(f"EP {ep} must divide the {m.num_experts} experts; EP values that fit: "
                   f"{_divisors(m.num_experts)}")
    if m.moe_ffn % etp:
        out.append(f"ETP {etp} must divide the expert FFN size {m.moe_ffn}")
    if m.num_layers % pp:
        out.append(f"PP {pp} must divide the {m.num_layers} layers; PP values that fit: {_divisors(m.num_layers)}")
    if cp > 1 and seq % (2 * cp):
        out.append(f"context parallelism splits the sequence into 2*CP chunks: 2*CP = {2 * cp} must divide "
                   f"the sequence length {seq}")
    elif (seq // cp) % tp:
        out.append(f"sequence parallelism splits each CP rank's {seq // cp} tokens over TP {tp}, which must "
                   "divide them")
    return out


def _common_divisors(a: int, b: int) -> list[int]:
    return [d for d in _divisors(a) if b % d == 0]


def model_admits(m: ModelSpec, seq: int, tp: int, cp: int, pp: int, ep: int, etp: int) -> bool:
    return not model_violations(m, seq, tp, cp, pp, ep, etp)


def is_coupled(layout: FoldedLayout) -> bool:
    """A layout Megatron-Core could build before MoE Parallel Folding (see FoldedLayout.is_folded)."""
    return not layout.is_folded


def candidate_layouts(m: ModelSpec, world: int, gpus_per_node: int, seq: int,
                      no_fold: bool = False) -> list[FoldedLayout]:
    """Every FoldedLayout of `world` GPUs the model admits (no_fold: only the coupled ones, is_coupled)."""
    out = []
    ds = _divisors(world)
    for tp in ds:
        for cp in ds:
            for pp in ds:
                if world % (tp * cp * pp):
                    continue
                for ep in ds:
                    for etp in ds:
                        if world % (etp * ep * pp) or not model_admits(m, seq, tp, cp, pp, ep, etp):
                            continue
                        try:
                            layout = FoldedLayout(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp,
                                                  gpus_per_node=gpus_per_node, num_experts=m.num_experts)
                        except LayoutError:
                            continue
                        if no_fold and not is_coupled(layout):
                            continue
                        out.append(layout)
    return out


def batch_violations(m: ModelSpec, layout: FoldedLayout, global_batch: int, vpp: int, micro_batch: int) -> list[str]:
    """Rules of the batch and the pipeline schedule for one layout."""
    if global_batch % (layout.dp * micro_batch):
        fit = _divisors(global_batch // layout.dp) if global_batch % layout.dp == 0 else []
        return [f"global batch {global_batch} is not divisible by DP {layout.dp} x micro-batch {micro_batch}; "
                f"micro-batch sizes that fit: {fit or 'none (change the global batch or DP)'}"]
    out = []
    if m.num_layers % (layout.pp * vpp):
        out.append(f"PP {layout.pp} x VPP {vpp} must divide the {m.num_layers} layers")
    why = interleaving_violation(layout.pp, vpp, global_batch // (layout.dp * micro_batch))
    if why:
        out.append(why)
    return out


def candidate_choices(m: ModelSpec, layout: FoldedLayout, global_batch: int):
    """Every (VPP, micro-batch, recompute) that Megatron accepts for this layout."""
    if global_batch % layout.dp:
        return
    vpps = _divisors(m.num_layers // layout.pp)
    for mbs in _divisors(global_batch // layout.dp):
        for vpp in vpps:
            if batch_violations(m, layout, global_batch, vpp, mbs):
                continue
            for recompute in (False, True):
                yield Choice(layout, vpp=vpp, micro_batch=mbs, recompute=recompute)


def plan(m: ModelSpec, gpu: GPUSpec, world: int, gpus_per_node: int, seq: int, global_batch: int,
         capacity_factor: float | None, no_fold: bool = False) -> tuple[list[Estimate], int]:
    """(estimates that fit, fastest first; number of choices evaluated)."""
    # Never empty: TP = CP = PP = EP = ETP = 1 (pure data parallelism) is always a valid layout.
    layouts = candidate_layouts(m, world, gpus_per_node, seq, no_fold)
    fitting, evaluated, smallest = [], 0, (float("inf"), None)
    for layout in layouts:
        for choice in candidate_choices(m, layout, global_batch):
            evaluated += 1
            # Memory needs no placement; time does (groups of every kind over every rank), so a
            # choice that cannot fit is never timed and a layout with none that fits is never placed.
            memory = memory_gb(m, choice, seq, global_batch, capacity_factor)
            total = sum(memory[1].values())
            if total > gpu.memory_gb:
                smallest = min(smallest, (total, choice.label()))
                continue
            fitting.append(estimate(m, gpu, choice, seq, global_batch, capacity_factor, memory))
    if not evaluated:
        dps = sorted({l.dp for l in layouts})
        raise ValueError(
            f"global batch {global_batch} is not divisible by the data-parallel size of any of the "
            f"{len(layouts)} layouts of {m.name} on {world} GPUs (DP sizes: {dps}); choose a global batch "
            "that one of them divides"
        )
    if not fitting:
        raise ValueError(
            f"none of the {evaluated} choices ({len(layouts)} layouts x VPP x micro-batch x recompute) of {m.name} on {world} {gpu.name} GPUs fits in {gpu.memory_gb:g} GB "
            f"(global batch {global_batch}, sequence {seq}); the smallest, {smallest[1]}, needs {smallest[0]:.1f} GB "
            "per GPU: use more GPUs or a GPU with more memory"
        )
    # Ties (e.g. CP and micro-batch trading places at equal tokens per GPU): prefer simpler layouts.
    fitting.sort(key=lambda est: (round(est.step_time_s, 9), est.choice.layout.cp, est.choice.vpp,
                                  est.choice.micro_batch, est.choice.recompute))
    return fitting, evaluated
