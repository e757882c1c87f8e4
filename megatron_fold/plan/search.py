"""Enumerate every folded layout a model admits on a cluster, estimate each, rank those that fit.

Validity comes from FoldedLayout (Megatron's own grid rules); the model adds its divisibility rules
(heads and query groups by TP, the shared expert's FFN by TP, experts by EP, the expert FFN by ETP,
layers by PP x VPP, the sequence by 2*CP for load-balanced ring attention and the CP-local sequence
by TP for sequence parallelism), and Megatron-Core's schedules add the batch rules (the global batch
by DP x micro-batch; with interleaving, micro-batches by PP). The cheap integer checks run before a
FoldedLayout is built, and placement is computed once per layout, so 1,024 GPUs plan in seconds.
"""

from __future__ import annotations

from megatron_fold.layout import DEFAULT_ORDER, TP_PP_DP_ORDER, FoldedLayout, LayoutError
from megatron_fold.plan.cost import Choice, Estimate, estimate, interleaving_violation, memory_gb
from megatron_fold.plan.profile import Profile
from megatron_fold.plan.models import ModelSpec

__all__ = ["model_violations", "model_admits", "layout_violations", "batch_admits_some_layout", "is_coupled", "batch_violations", "candidate_layouts",
           "candidate_choices", "plan"]


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def model_violations(m: ModelSpec, seq: int, tp: int, cp: int, pp: int, ep: int, etp: int) -> list[str]:
    """Every rule of the model (not of the grid: FoldedLayout checks those) that the sizes break, as
    rules without hints: which values pass is for the caller to say, against all of its rules
    (layout_violations)."""
    out = []
    if m.num_heads % tp or m.num_query_groups % tp:
        out.append(f"TP {tp} must divide the {m.num_heads} attention heads and {m.num_query_groups} query groups")
    if m.shared_expert_ffn and m.shared_expert_ffn % tp:
        out.append(f"TP {tp} must divide the shared expert's FFN size {m.shared_expert_ffn}")
    if m.num_experts % ep:
        out.append(f"EP {ep} must divide the {m.num_experts} experts")
    if m.moe_ffn % etp:
        out.append(f"ETP {etp} must divide the expert FFN size {m.moe_ffn}")
    if m.num_layers % pp:
        out.append(f"PP {pp} must divide the {m.num_layers} layers")
    if cp > 1 and seq % (2 * cp):
        out.append(f"context parallelism splits the sequence into 2*CP chunks: 2*CP = {2 * cp} must divide "
                   f"the sequence length {seq}")
    elif (seq // cp) % tp:
        out.append(f"sequence parallelism splits each CP rank's {seq // cp} tokens over TP {tp}, which must "
                   "divide them")
    return out


def model_admits(m: ModelSpec, seq: int, tp: int, cp: int, pp: int, ep: int, etp: int) -> bool:
    return not model_violations(m, seq, tp, cp, pp, ep, etp)


_SIZES = ("tp", "cp", "pp", "ep", "etp", "vpp", "mbs")


def _rules(m: ModelSpec, world: int, gpus_per_node: int, seq: int, global_batch: int,
           sizes: dict) -> tuple[FoldedLayout | None, list[str]]:
    """(the layout or None, every grid, model and batch rule the sizes break). sizes["etp"] None:
    ETP follows TP, as in Megatron."""
    etp = sizes["etp"] if sizes["etp"] is not None else sizes["tp"]
    try:
        layout = FoldedLayout(world, tp=sizes["tp"], cp=sizes["cp"], pp=sizes["pp"], ep=sizes["ep"],
                              etp=sizes["etp"], gpus_per_node=gpus_per_node, num_experts=m.num_experts)
        rules = []
    except LayoutError as e:
        layout, rules = None, list(e.rules)
    if min(sizes["tp"], sizes["cp"], sizes["pp"], sizes["ep"], etp) < 1:
        return layout, rules  # FoldedLayout named the non-positive size; no arithmetic on it
    for rule in model_violations(m, seq, sizes["tp"], sizes["cp"], sizes["pp"], sizes["ep"], etp):
        if sizes["etp"] is None and rule.startswith("ETP "):
            rule += f" (ETP not set: it follows TP {etp})"
        rules.append(rule)
    if sizes["vpp"] < 1 or sizes["mbs"] < 1:
        rules.append(f"VPP and micro-batch size must be positive, got vpp {sizes['vpp']}, mbs {sizes['mbs']}")
    elif layout is not None:
        rules += batch_violations(m, layout, global_batch, sizes["vpp"], sizes["mbs"])
    return layout, rules


def layout_violations(m: ModelSpec, world: int, gpus_per_node: int, seq: int, global_batch: int,
                      sizes: dict) -> tuple[FoldedLayout | None, list[str]]:
    """Check one user-given layout (`plan --layout`): (the layout, []) when it passes every rule, else
    (None, the rules it breaks followed by one line of values that pass *every* rule, grid, model and
    batch, changing one size at a time, so a suggestion is never refused in turn). `sizes` has the keys
    of _SIZES; sizes["etp"] None means ETP follows TP."""
    layout, rules = _rules(m, world, gpus_per_node, seq, global_batch, sizes)
    if not rules:
        return layout, []
    candidates = {"vpp": _divisors(m.num_layers), "mbs": _divisors(global_batch)}
    fits = []
    for key in _SIZES:
        good = [v for v in candidates.get(key, _divisors(world))
                if v != sizes[key] and not _rules(m, world, gpus_per_node, seq, global_batch,
                                                  sizes | {key: v})[1]]
        if good:
            fits.append(f"{key.upper()} {', '.join(map(str, good))}")
    rules.append("values that pass every check, changing one size at a time: " + "; ".join(fits) if fits else
                 "no change of one size alone passes every check; `megatron-fold plan` without --layout lists "
                 "the layouts that do")
    return None, rules


def is_coupled(layout: FoldedLayout) -> bool:
    """A layout Megatron-Core could build before MoE Parallel Folding (see FoldedLayout.is_folded)."""
    return not layout.is_folded


def _admitted_sizes(m: ModelSpec, world: int, seq: int) -> tuple[list[int], ...]:
    """Divisors of the world that each size may take on its own (TP: heads, query groups and shared
    FFN; CP: 2*CP divides the sequence; PP: layers; EP: experts; ETP: expert FFN)."""
    ds = _divisors(world)
    return ([t for t in ds if m.num_heads % t == 0 and m.num_query_groups % t == 0
             and (not m.shared_expert_ffn or m.shared_expert_ffn % t == 0)],
            [c for c in ds if c == 1 or seq % (2 * c) == 0],
            [p for p in ds if m.num_layers % p == 0],
            [e for e in ds if m.num_experts % e == 0],
            [u for u in ds if m.moe_ffn % u == 0])


def batch_admits_some_layout(m: ModelSpec, world: int, seq: int, global_batch: int) -> None:
    """Fail fast: ValueError when no DP = world / (TP*CP*PP) the model admits divides the global batch.
    Integer arithmetic over a few dozen sizes, so `--gpus 1000000` is refused in milliseconds instead
    of after building every layout of a million ranks. (ETP = EP = 1 always completes a valid TP, CP,
    PP, so this is exact.)"""
    tps, cps, pps, _, _ = _admitted_sizes(m, world, seq)
    dps = sorted({world // (t * c * p) for t in tps for c in cps for p in pps
                  if world % (t * c * p) == 0 and (seq // c) % t == 0})
    if not any(global_batch % dp == 0 for dp in dps):
        shown = ", ".join(map(str, dps[:12])) + (f", ... ({len(dps)} sizes)" if len(dps) > 12 else "")
        raise ValueError(
            f"global batch {global_batch} is not divisible by the data-parallel size DP = GPUs / (TP*CP*PP) of "
            f"any layout {m.name} admits on {world} GPUs (DP sizes: {shown}); choose a global batch that one "
            "of them divides, or a GPU count for which DP divides the global batch")


def candidate_layouts(m: ModelSpec, world: int, gpus_per_node: int, seq: int,
                      no_fold: bool = False) -> list[FoldedLayout]:
    """Every FoldedLayout of `world` GPUs the model admits, in both Megatron-LM rank orders (no_fold:
    only the coupled ones, is_coupled)."""
    out = []
    tps, cps, pps, eps, etps = _admitted_sizes(m, world, seq)
    for tp in tps:
        for cp in cps:
            for pp in pps:
                if world % (tp * cp * pp):
                    continue
                for ep in eps:
                    for etp in etps:
                        if world % (etp * ep * pp) or not model_admits(m, seq, tp, cp, pp, ep, etp):
                            continue
                        # Megatron-LM's two rank orders: --use-tp-pp-dp-mapping builds other groups only
                        # with PP > 1 and DP > 1, where it needs EDP = DP (ETP*EP = TP*CP) and puts PP
                        # stages on nearer ranks than DP replicas.
                        swap = pp > 1 and world > tp * cp * pp and etp * ep == tp * cp
                        orders = [DEFAULT_ORDER] + ([TP_PP_DP_ORDER] if swap else [])
                        for order in orders:
                            try:
                                layout = FoldedLayout(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order,
                                                      gpus_per_node=gpus_per_node, num_experts=m.num_experts)
                            except LayoutError:
                                continue
                            if no_fold and not is_coupled(layout):
                                continue
                            out.append(layout)
    return out


def batch_violations(m: ModelSpec, layout: FoldedLayout, global_batch: int, vpp: int, micro_batch: int) -> list[str]:
    """Rules of the batch and the pipeline schedule for one layout (rules only, see layout_violations)."""
    if global_batch % (layout.dp * micro_batch):
        return [f"global batch {global_batch} is not divisible by DP {layout.dp} x micro-batch {micro_batch}"]
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


def plan(m: ModelSpec, gpu: Profile, world: int, gpus_per_node: int, seq: int, global_batch: int,
         capacity_factor: float | None, no_fold: bool = False,
         drop_scope: str = "subsequence") -> tuple[list[Estimate], int]:
    """(estimates that fit, fastest first; number of choices evaluated)."""
    # Never empty: TP = CP = PP = EP = ETP = 1 (pure data parallelism) is always a valid layout.
    batch_admits_some_layout(m, world, seq, global_batch)
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
            fitting.append(estimate(m, gpu, choice, seq, global_batch, capacity_factor, memory, drop_scope))
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
