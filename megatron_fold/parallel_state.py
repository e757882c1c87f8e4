"""Folded process groups, built by Megatron-Core and checked against FoldedLayout.

We never re-implement Megatron's globals: `megatron.core.parallel_state.initialize_model_parallel`
builds the attention grid and the expert grid itself. What we add is a check that every group it built
for this rank is the one FoldedLayout predicts (so `explain` and `plan` describe what really runs), and
the `ProcessGroupCollection` our MoE modules take explicitly instead of reading globals.

Expert parameters: Megatron reduces a parameter's gradient over DP x CP when `param.allreduce` is True
(the default) and over the expert data-parallel group (EDP) when it is False. Megatron-Core 0.19's
linear layers set `allreduce = not (is_expert and (EP > 1 or ETP != TP))`, which is right; expert
modules built outside those layers (custom experts, modules copied from checkpoints) carry no tag and
would silently be reduced over the wrong group. `check_expert_params` finds them (the experts of any
MoELayer, Megatron's experts classes, modules marked `is_fold_expert_module`) before DDP is built.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_fold.layout import GROUP_NAMES, FoldedLayout

__all__ = [
    "initialize_model_parallel",
    "destroy_model_parallel",
    "megatron_group",
    "expert_params_use_edp",
    "check_expert_params",
    "ExpertParamMismatch",
]

# Our group names -> Megatron-Core getters (the ones its modules use).
_MEGATRON_GETTERS = {
    "tp": lambda: mpu.get_tensor_model_parallel_group(),
    "cp": lambda: mpu.get_context_parallel_group(),
    "dp": lambda: mpu.get_data_parallel_group(with_context_parallel=False),
    "dp_cp": lambda: mpu.get_data_parallel_group(with_context_parallel=True),
    "tp_cp": lambda: mpu.get_tensor_and_context_parallel_group(),
    "pp": lambda: mpu.get_pipeline_model_parallel_group(),
    "mp": lambda: mpu.get_model_parallel_group(),
    "tp_dp_cp": lambda: mpu.get_tensor_and_data_parallel_group(with_context_parallel=True),
    "ep": lambda: mpu.get_expert_model_parallel_group(),
    "etp": lambda: mpu.get_expert_tensor_parallel_group(),
    "tp_ep": lambda: mpu.get_expert_tensor_and_model_parallel_group(),
    "tp_ep_pp": lambda: mpu.get_expert_tensor_model_pipeline_parallel_group(),
    "edp": lambda: mpu.get_expert_data_parallel_group(),
}
assert set(_MEGATRON_GETTERS) == set(GROUP_NAMES)

# ProcessGroupCollection fields -> our group names, for the fields FoldedLayout predicts. The other
# fields (embedding groups, the distributed optimizer's instance groups, partial-DP groups, ...) are
# Megatron's own derived groups, taken as Megatron built them.
COLLECTION_TO_LAYOUT = {"tp": "tp", "cp": "cp", "tp_cp": "tp_cp", "pp": "pp", "mp": "mp", "dp": "dp",
                        "dp_cp": "dp_cp", "tp_dp_cp": "tp_dp_cp", "ep": "ep", "expt_tp": "etp",
                        "tp_ep": "tp_ep", "tp_ep_pp": "tp_ep_pp", "expt_dp": "edp"}


def megatron_group(name: str) -> dist.ProcessGroup:
    """This rank's group `name` (one of GROUP_NAMES) as Megatron-Core holds it."""
    return _MEGATRON_GETTERS[name]()


def initialize_model_parallel(layout: FoldedLayout, **megatron_kwargs) -> ProcessGroupCollection:
    """Build the folded groups through Megatron-Core, verify them, return them as a collection.

    `megatron_kwargs` pass through to Megatron (e.g. `virtual_pipeline_model_parallel_size`); the five
    sizes and the order come from `layout` only, so they cannot disagree with it.
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialized before initialize_model_parallel(layout)")
    world = dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(
            f"layout is for world_size {layout.world_size} but torch.distributed has {world} ranks"
        )
    owned = {"tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
             "expert_model_parallel_size", "expert_tensor_parallel_size", "order"}
    clash = owned & set(megatron_kwargs)
    if clash:
        raise ValueError(f"{sorted(clash)} come from the FoldedLayout; do not pass them separately")
    megatron_kwargs.setdefault("create_gloo_process_groups", dist.get_backend() != "gloo")
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        order=layout.order,
        **megatron_kwargs,
    )
    # Every field, not only those the MoE layer reads: DDP, finalize_model_grads (embd, pos_embd),
    # get_megatron_optimizer (intra_dp_cp, intra_expt_dp, intra/inter_dist_opt) and the schedules
    # each require their own, and a field left out is read as "not provided".
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    try:
        verify_groups(layout, pg_collection)
    except RuntimeError:
        mpu.destroy_model_parallel()  # leave no half-trusted global state behind
        raise
    return pg_collection


def verify_groups(layout: FoldedLayout, pg_collection: ProcessGroupCollection | None = None) -> None:
    """Raise on EVERY rank if any group Megatron built for any rank differs from the layout's prediction
    (Megatron's global groups, and the collection's fields that have a layout counterpart).

    A collective (one all_gather_object over the world): a rank whose groups are right would otherwise
    carry on into training and block in its first collective with a rank that raised.
    """
    rank = dist.get_rank()
    differing = []
    for name in GROUP_NAMES:
        try:  # a getter that raises on one rank must not leave the others blocked below
            built = sorted(dist.get_process_group_ranks(megatron_group(name)))
        except Exception as e:  # noqa: BLE001 - reported collectively below
            differing.append(f"{name}: Megatron's getter raised {type(e).__name__}: {e}")
            continue
        predicted = layout.group_of(name, rank)
        if built != predicted:
            differing.append(f"{name}: Megatron built {built}, layout predicts {predicted}")
    for field, name in (COLLECTION_TO_LAYOUT.items() if pg_collection is not None else ()):
        group = getattr(pg_collection, field, None)
        built = sorted(dist.get_process_group_ranks(group)) if group is not None else None
        predicted = layout.group_of(name, rank)
        if built != predicted:
            differing.append(f"pg_collection.{field}: {built}, layout predicts {predicted} ({name})")
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, differing)
    bad = [(r, d) for r, d in enumerate(everyone) if d]
    if bad:
        shown = "\n".join(f"  rank {r}: " + "; ".join(d) for r, d in bad[:4])
        more = f"\n  ... and {len(bad) - 4} more ranks" if len(bad) > 4 else ""
        raise RuntimeError(
            f"Megatron-Core's groups differ from FoldedLayout {layout} on {len(bad)} of "
            f"{len(everyone)} ranks (this is rank {rank}):\n{shown}{more}"
        )


def destroy_model_parallel() -> None:
    mpu.destroy_model_parallel()


# ---- expert parameters ------------------------------------------------------------------------------

def expert_params_use_edp(layout: FoldedLayout) -> bool:
    """Whether expert gradients must be reduced over EDP rather than DP x CP.

    When EP = 1 and ETP = TP the expert grid is the attention grid and both groups are the same ranks;
    otherwise they differ and reducing over DP x CP would average different experts' gradients.
    """
    return layout.ep > 1 or layout.etp != layout.tp


class ExpertParamMismatch(RuntimeError):
    pass


def _expert_param_names(model: torch.nn.Module) -> set[str]:
    """Parameters of routed experts: the `experts` module of every MoELayer (whatever its class),
    Megatron's experts classes wherever they sit, and any module with `is_fold_expert_module = True`
    (for expert modules a custom layer keeps under another name)."""
    from megatron.core.transformer.moe import experts as moe_experts
    from megatron.core.transformer.moe.moe_layer import MoELayer

    expert_types = tuple(
        getattr(moe_experts, n) for n in ("SequentialMLP", "GroupedMLP", "TEGroupedMLP") if hasattr(moe_experts, n)
    )
    names = set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, MoELayer) and isinstance(getattr(mod, "experts", None), torch.nn.Module):
            names.update(f"{prefix}experts.{p}" for p, _ in mod.experts.named_parameters())
        if isinstance(mod, expert_types) or getattr(mod, "is_fold_expert_module", False):
            names.update(prefix + p for p, _ in mod.named_parameters())
    return names


def check_expert_params(model: torch.nn.Module, layout: FoldedLayout, fix: bool = False) -> list[str]:
    """Check (and with `fix`, set) `param.allreduce` so expert gradients reduce over the right group.

    Returns the names of mis-tagged parameters (empty when everything is right). Without `fix`, any
    mis-tagged parameter raises ExpertParamMismatch naming them, since training on would be silently
    wrong. Non-expert parameters must never be tagged expert (that would skip their DP reduction).

    Call it on the bare model, before Megatron's DistributedDataParallel wraps it: DDP sorts parameters
    into its dense and expert gradient buffers by this tag when it is built, so retagging afterwards
    changes nothing (`fix=True` on a wrapped model raises).
    """
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel

    if fix and any(isinstance(m, _BaseDataParallel) for m in model.modules()):
        raise ValueError(
            "check_expert_params(fix=True) on a model already wrapped in DistributedDataParallel: DDP "
            "assigned gradient buffers by param.allreduce when it was built, so retagging now has no "
            "effect; call it on the model before wrapping it")
    expert = _expert_param_names(model)
    want_edp = expert_params_use_edp(layout)
    wrong = []
    for name, param in model.named_parameters():
        is_expert = name in expert
        expected_allreduce = not (is_expert and want_edp)
        actual = getattr(param, "allreduce", True)
        # With EP = 1 and ETP = TP both groups coincide, so either tag reduces correctly.
        if is_expert and not want_edp:
            continue
        if actual != expected_allreduce:
            wrong.append(name)
            if fix:
                param.allreduce = expected_allreduce
    if wrong and not fix:
        raise ExpertParamMismatch(
            f"{len(wrong)} parameter(s) would be reduced over the wrong data-parallel group for layout "
            f"EP {layout.ep} ETP {layout.etp} TP {layout.tp} (expert parameters must have allreduce=False "
            f"and reduce over EDP {layout.edp}; others allreduce=True over DP x CP {layout.dp * layout.cp}): "
            + ", ".join(wrong[:10]) + (" ..." if len(wrong) > 10 else "")
            + "; call check_expert_params(model, layout, fix=True) to retag them"
        )
    return wrong
