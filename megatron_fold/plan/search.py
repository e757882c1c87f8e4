"""Enumerate every folded layout a model admits on a cluster, estimate each, rank those that fit.

Validity comes from FoldedLayout (Megatron's own grid rules); the model adds its divisibility rules
(heads and query groups by TP, experts by EP, expert FFN by ETP, layers by PP x VPP, the sequence by
2*CP and the CP-local sequence by TP for sequence parallelism). Cheap integer checks run before a
FoldedLayout is built, so 1,024 GPUs plan in about a second.
"""

from __future__ import annotations

from megatron_fold.layout import FoldedLayout, LayoutError
from megatron_fold.plan.cost import Choice, Estimate, estimate
from megatron_fold.plan.hardware import GPUSpec
from megatron_fold.plan.models import ModelSpec

__all__ = ["model_admits", "candidate_layouts", "candidate_choices", "plan"]

MICRO_BATCHES = (1, 2, 4)
MAX_VPP = 8


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def model_admits(m: ModelSpec, seq: int, tp: int, cp: int, pp: int, ep: int, etp: int) -> bool:
    return (m.num_heads % tp == 0 and m.num_query_groups % tp == 0 and m.num_experts % ep == 0
            and m.moe_ffn % etp == 0 and m.num_layers % pp == 0
            and (cp == 1 or seq % (2 * cp) == 0) and (seq // cp) % tp == 0)


def candidate_layouts(m: ModelSpec, world: int, gpus_per_node: int, seq: int, no_fold: bool = False) -> list[FoldedLayout]:
    """Every FoldedLayout of `world` GPUs the model admits (TP and ETP kept inside a node)."""
    out = []
    ds = _divisors(world)
    for tp in (d for d in ds if d <= gpus_per_node):
        for cp in ds:
            for pp in ds:
                if world % (tp * cp * pp):
                    continue
                for ep in ds:
                    for etp in (d for d in ds if d <= gpus_per_node):
                        if world % (etp * ep * pp) or not model_admits(m, seq, tp, cp, pp, ep, etp):
                            continue
                        try:
                            layout = FoldedLayout(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp,
                                                  gpus_per_node=gpus_per_node, num_experts=m.num_experts)
                        except LayoutError:
                            continue
                        if no_fold and layout.is_folded:
                            continue
                        out.append(layout)
    return out


def candidate_choices(m: ModelSpec, layout: FoldedLayout, global_batch: int):
    layers_per_stage = m.num_layers // layout.pp
    vpps = [1] + ([v for v in _divisors(layers_per_stage) if 1 < v <= MAX_VPP] if layout.pp > 1 else [])
    for mbs in MICRO_BATCHES:
        if global_batch % (layout.dp * mbs):
            continue
        for vpp in vpps:
            for recompute in (False, True):
                yield Choice(layout, vpp=vpp, micro_batch=mbs, recompute=recompute)


def plan(m: ModelSpec, gpu: GPUSpec, world: int, gpus_per_node: int, seq: int, global_batch: int,
         capacity_factor: float | None, no_fold: bool = False) -> tuple[list[Estimate], int]:
    """(estimates that fit, fastest first; number of choices evaluated)."""
    layouts = candidate_layouts(m, world, gpus_per_node, seq, no_fold)
    if not layouts:
        raise ValueError(
            f"no parallel layout of {world} GPUs ({gpus_per_node} per node) fits {m.name}: TP must divide "
            f"heads {m.num_heads} and query groups {m.num_query_groups}, EP the {m.num_experts} experts, PP the "
            f"{m.num_layers} layers, and world = TP*CP*PP*DP = ETP*EP*PP*EDP"
        )
    fitting, evaluated = [], 0
    for layout in layouts:
        for choice in candidate_choices(m, layout, global_batch):
            evaluated += 1
            est = estimate(m, gpu, choice, seq, global_batch, capacity_factor)
            if est.fits:
                fitting.append(est)
    if not fitting:
        raise ValueError(
            f"none of the {evaluated} layouts of {m.name} on {world} {gpu.name} GPUs fits in {gpu.memory_gb:g} GB "
            f"(global batch {global_batch}, sequence {seq}); use more GPUs or a GPU with more memory"
        )
    # Ties (e.g. CP and micro-batch trading places at equal tokens per GPU): prefer simpler layouts.
    fitting.sort(key=lambda est: (round(est.step_time_s, 9), est.choice.layout.cp, est.choice.vpp,
                                  est.choice.micro_batch, est.choice.recompute))
    return fitting, evaluated
