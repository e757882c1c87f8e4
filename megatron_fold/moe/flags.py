"""Which of Megatron-Core 0.19's MoE options FoldMoELayer runs, and the reason for each one it refuses.

Why one function: a user moving a Megatron-LM MoE run to the plugin keeps their flags, so every flag
that changes what is computed or how fast must either take effect or be refused before anything is
built, with the reason; none may be dropped without a word. `validate_fold_moe_config` is that one
decision. FoldMoELayer, FoldRouter and FlexFoldDispatcher call it on construction, and the Megatron-LM
integration calls it at argument time (its name is stable). docs/moe_flags.md is the full table:
each flag, what the plugin does with it on CPU and on GPU, and the test that shows it.

Flags not named here reach Megatron's own code unchanged (score functions, group-limited routing,
aux / z losses, expert bias, jitter, router dtype, experts, shared experts, recomputation).
"""

from __future__ import annotations

from megatron_fold.moe.capacity import DropScope

__all__ = ["validate_fold_moe_config", "load_balancing_types", "DROP_POLICIES"]

DROP_POLICIES = ("probs", "position")

# CUDA-graph capture regions that would contain FoldRouter or FlexFoldDispatcher.
_MOE_GRAPH_MODULES = {"moe", "moe_router", "moe_preprocess"}


def load_balancing_types(config) -> list[str]:
    """moe_router_load_balancing_type as a list (Megatron accepts one name or a list of aux losses)."""
    types = config.moe_router_load_balancing_type
    return list(types) if isinstance(types, (list, tuple)) else [types]


def validate_fold_moe_config(config, drop_scope: DropScope | str = DropScope.SUBSEQUENCE) -> list[str]:
    """Refuse the MoE options FoldMoELayer cannot honour; return notes on those it runs differently.

    Raises ValueError listing every refused flag with its value, the reason and what to set instead.
    Returns human-readable notes (one per accepted flag whose mechanism differs from Megatron's, e.g.
    the dispatcher type FlexFoldDispatcher replaces); FoldMoELayer logs them once per process.
    """
    scope = DropScope.parse(drop_scope)
    errors: list[str] = []
    notes: list[str] = []
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731

    # ---- the dispatcher ------------------------------------------------------------------------------
    dispatcher = get("moe_token_dispatcher_type")
    if dispatcher == "flex" or get("moe_enable_deepep", False):
        errors.append(
            f"moe_token_dispatcher_type={dispatcher!r} (moe_flex_dispatcher_backend="
            f"{get('moe_flex_dispatcher_backend')!r}, moe_enable_deepep={get('moe_enable_deepep', False)}) "
            "selects DeepEP / HybridEP / NCCL-EP fused GPU kernels, which dispatch over Megatron's coupled "
            "expert groups; FoldMoELayer always dispatches with FlexFoldDispatcher (all-to-all-v over EP, "
            "all-gather-v over ETP, on the folded groups). Set moe_token_dispatcher_type='alltoall' "
            "(--moe-token-dispatcher-type alltoall)")
    elif dispatcher in ("alltoall", "allgather"):
        notes.append(
            f"moe_token_dispatcher_type={dispatcher!r}: FoldMoELayer dispatches with FlexFoldDispatcher "
            "(the all-to-all pattern, on the folded expert groups) whichever of 'alltoall' / 'allgather' is set")
    if get("moe_expert_rank_capacity_factor") is not None or get("moe_paged_stash", False):
        errors.append(
            f"moe_expert_rank_capacity_factor={get('moe_expert_rank_capacity_factor')!r} / moe_paged_stash="
            f"{get('moe_paged_stash', False)} belong to the HybridEP flex dispatcher, which FoldMoELayer "
            "does not use; unset them")
    if get("moe_router_padding_for_quantization", False) or get("moe_router_padding_for_fp8", False):
        errors.append(
            "moe_router_padding_for_quantization=True (or moe_router_padding_for_fp8) pads the routing map "
            "to FP8/FP4 grouped-GEMM alignment, which FlexFoldDispatcher does not implement; set it to False "
            "(TEGroupedMLP pads its inputs itself)")

    # ---- overlap and capture schemes built around Megatron's own dispatchers ------------------------------
    if get("overlap_moe_expert_parallel_comm", False) or get("delay_wgrad_compute", False):
        errors.append(
            f"overlap_moe_expert_parallel_comm={get('overlap_moe_expert_parallel_comm', False)} / "
            f"delay_wgrad_compute={get('delay_wgrad_compute', False)}: the combined 1F1B all-to-all "
            "overlap schedules Megatron's own dispatcher's sub-steps on a communication stream; "
            "FlexFoldDispatcher does not expose them. Unset both (--moe-shared-expert-overlap overlaps "
            "the shared expert with FlexFoldDispatcher's all-to-all)")
    if get("overlap_dispatch_backward_with_experts_wgrad", False):
        errors.append(
            "overlap_dispatch_backward_with_experts_wgrad=True delays the experts' weight gradients "
            "behind Megatron's dispatcher backward with CUDA events; FoldMoELayer does not support it: "
            "set it to False")
    if get("moe_pad_experts_for_cuda_graph_inference", False) or get("transformer_impl") == "inference_optimized":
        errors.append(
            f"moe_pad_experts_for_cuda_graph_inference={get('moe_pad_experts_for_cuda_graph_inference', False)} "
            f"/ transformer_impl={get('transformer_impl')!r}: Megatron's inference-optimized MoE path "
            "swaps in its own inference dispatchers; FoldMoELayer is for training. Use Megatron's MoELayer "
            "for inference-optimized serving")
    graph_impl = get("cuda_graph_impl", "none")
    if graph_impl not in (None, "none"):
        modules = get("cuda_graph_modules", [])
        names = {getattr(m, "name", m) for m in (modules if isinstance(modules, (list, tuple)) else [modules])}
        whole_layer = graph_impl == "full_iteration" or not names or "full" in names
        if whole_layer or names & _MOE_GRAPH_MODULES:
            errors.append(
                f"cuda_graph_impl={graph_impl!r} with cuda_graph_modules={modules!r} captures the MoE layer, "
                "but FoldRouter and FlexFoldDispatcher synchronise with the host (finite check, count "
                "exchange, sequence-scope token order), which a CUDA graph cannot replay; capture only "
                "'attn' / 'mlp' modules, or set cuda_graph_impl='none'")

    if get("moe_shared_expert_overlap", False) and get("moe_latent_size") and get("moe_shared_expert_intermediate_size"):
        errors.append(
            f"moe_shared_expert_overlap=True with moe_latent_size={get('moe_latent_size')}: Megatron overlaps a "
            "latent MoE's shared expert only in its NVLS inference dispatcher and refuses it in training; "
            "set moe_shared_expert_overlap=False")

    # ---- routing -----------------------------------------------------------------------------------------
    types = load_balancing_types(config)
    known = {"aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "quantile_balancing", "none"}
    unknown = [t for t in types if t not in known]
    if unknown:
        errors.append(f"moe_router_load_balancing_type={config.moe_router_load_balancing_type!r}: unknown "
                      f"{unknown}; choose from {sorted(known)}")
    if "quantile_balancing" in types:
        coeff = config.moe_aux_loss_coeff
        if len(types) > 1 or any(c > 0 for c in (coeff if isinstance(coeff, (list, tuple)) else [coeff])):
            errors.append(
                f"moe_router_load_balancing_type={config.moe_router_load_balancing_type!r} with "
                f"moe_aux_loss_coeff={coeff!r}: quantile balancing balances load through its per-expert bias "
                "and Megatron requires the aux losses off; set moe_aux_loss_coeff=0 and use "
                "'quantile_balancing' alone")
        if config.moe_router_num_groups is not None or config.moe_router_group_topk is not None:
            errors.append(
                f"moe_router_load_balancing_type='quantile_balancing' with moe_router_num_groups="
                f"{config.moe_router_num_groups!r}, moe_router_group_topk={config.moe_router_group_topk!r}: "
                "Megatron's quantile balancing has no group-limited routing; unset the group options")
        if config.moe_router_fusion:
            errors.append(
                "moe_router_load_balancing_type='quantile_balancing' with moe_router_fusion=True: Megatron's "
                "quantile balancing picks experts itself and has no fused kernel; set moe_router_fusion=False")
    biased = get("moe_router_force_biased")
    if biased is not None and not isinstance(biased, (int, float)):
        errors.append(f"moe_router_force_biased must be a number (the bias std) or None, got {biased!r}")

    # ---- dropping ------------------------------------------------------------------------------------------
    cf = config.moe_expert_capacity_factor
    if cf is not None:
        if cf <= 0:
            errors.append(f"moe_expert_capacity_factor must be positive (or None for dropless), got {cf!r}")
        if config.moe_token_drop_policy not in DROP_POLICIES:
            errors.append(f"unknown moe_token_drop_policy {config.moe_token_drop_policy!r}; choose one of "
                          f"{', '.join(DROP_POLICIES)}")
    if config.moe_pad_expert_input_to_capacity and cf is None:
        errors.append("moe_pad_expert_input_to_capacity=True needs moe_expert_capacity_factor (the capacity to "
                      "pad to); set a capacity factor or turn padding off")

    from megatron_fold.moe import fused  # the GPU boundary: whether this machine's GPUs have the kernels

    errors.extend(fused.te_refusals(config))
    unavailable = fused.fusion_unavailable_reason(config)
    if unavailable:
        errors.append(unavailable)

    if errors:
        raise ValueError(f"MoE options FoldMoELayer cannot run (drop scope {scope.value}): " + "; ".join(errors))
    return notes
