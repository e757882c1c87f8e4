"""FoldRouter: Megatron's TopKRouter without CUDA-only calls, with layout-invariant token dropping.

Upstream's TopKRouter allocates its buffers on the current CUDA device and moves its weight to
the GPU in `gating`; everything else (score functions, group-limited routing, expert bias, the three
aux losses, z-loss, input jitter, router dtype) is device-agnostic and reused as is.

Token dropping, with `moe_expert_capacity_factor`, has two scopes (see capacity.py):
- subsequence: Megatron's semantics, capacity from this rank's shard. Same kept tokens as upstream's
  `apply_router_token_dropping`, except that ties are broken deterministically (lower position first;
  upstream's torch.topk(sorted=False) leaves the choice among equal scores to the kernel).
- sequence: routing scores are all-gathered over the attention TP x CP group (one collective of
  [tokens, E] floats: far smaller than hidden states), put back in true token order (undoing sequence
  parallelism and CP's load-balanced chunks), drops decided per (sequence, expert) over the whole
  sequence, and this rank's rows kept. Every layout then drops exactly the same tokens.

Padding: this router never returns a padded routing map (upstream turns the map into the capacity
mask, routing zero-probability tokens to fill every expert). The dispatcher pads each (rank, expert)
block with zero rows to a static size instead; padding rows carry probability 0, so outputs and
gradients are the same as upstream's.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    router_gating_linear,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_fold.capacity import DropScope, expert_capacity
from megatron_fold.comm import CommCounter
from megatron_fold.token_order import local_token_positions

__all__ = ["FoldRouter", "NonFiniteRouterScores"]


class NonFiniteRouterScores(FloatingPointError):
    """Router logits contained NaN or infinity (diverged training or corrupted input)."""


class FoldRouter(TopKRouter):
    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *,
                 drop_scope: DropScope | str = DropScope.SUBSEQUENCE, check_finite: bool = True):
        if pg_collection is None:
            raise ValueError("FoldRouter needs the folded ProcessGroupCollection; it never falls back to globals")
        if config.moe_router_fusion:
            raise ValueError("moe_router_fusion needs Transformer Engine's CUDA kernels; FoldRouter runs the "
                             "unfused (device-agnostic) path: set moe_router_fusion=False")
        if config.moe_router_load_balancing_type == "quantile_balancing":
            raise ValueError("quantile_balancing routing is not supported by FoldRouter; use aux losses or "
                             "moe_router_enable_expert_bias")
        # Upstream allocates the expert-bias and global-aux-loss buffers on the current CUDA device.
        # Build without them and register them below on the weight's device.
        build_config = copy.copy(config)
        build_config.moe_router_enable_expert_bias = False
        build_config.moe_aux_loss_coeff = 0.0
        super().__init__(build_config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.config = config
        device = self.weight.device
        self.enable_expert_bias = config.moe_router_enable_expert_bias
        zeros = lambda: torch.zeros(self.num_experts, dtype=torch.float32, device=device)  # noqa: E731
        if self.enable_expert_bias:
            self._replace_with_buffer("local_tokens_per_expert", zeros(), persistent=False)
            self._replace_with_buffer("expert_bias", zeros(), persistent=True)
        if self.get_aux_loss_coeff("global_aux_loss") > 0:
            self._replace_with_buffer("global_tokens_per_expert", zeros(), persistent=False)
            self._replace_with_buffer("ga_steps", torch.tensor(0.0, device=device), persistent=False)

        self.drop_scope = DropScope.parse(drop_scope)
        self.check_finite = check_finite
        # The ranks that hold distinct tokens of one micro-batch: TP x CP with sequence parallelism;
        # without it (evaluation with TP > 1) TP ranks hold the same tokens, so only CP splits them.
        if config.sequence_parallel:
            self.token_group, self.tp_size, self.tp_rank = self.tp_cp_group, dist.get_world_size(self.tp_group), \
                dist.get_rank(self.tp_group)
        else:
            self.token_group, self.tp_size, self.tp_rank = self.cp_group, 1, 0
        self.cp_size, self.cp_rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        self.comm_counter = CommCounter()
        self._member_coords: list[tuple[int, int]] | None = None  # (tp rank, cp rank) of each token-group member
        self._local_counts: torch.Tensor | None = None  # [2, E]: routed before / after dropping, this rank

    def _replace_with_buffer(self, name: str, value: torch.Tensor, persistent: bool) -> None:
        delattr(self, name)  # upstream set it to None as a plain attribute
        self.register_buffer(name, value, persistent=persistent)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Upstream's gate without moving the weight to a CUDA device: it stays where it lives."""
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        return router_gating_linear(input, self.weight, self.bias, router_dtype)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Upstream's TopKRouter.routing with the finite check and our drop scopes. [S, B, E] -> [S*B, E] x2"""
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if self.check_finite:
            self._check_finite(logits)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)

        if self.routing_type == "sinkhorn":
            probs, routing_map = self.sinkhorn_load_balancing(logits)
        else:
            probs, routing_map = topk_routing_with_score_function(
                logits, self.topk,
                use_pre_softmax=self.config.moe_router_pre_softmax,
                num_groups=self.config.moe_router_num_groups,
                group_topk=self.config.moe_router_group_topk,
                scaling_factor=self.config.moe_router_topk_scaling_factor,
                score_function=self.score_function,
                expert_bias=self.expert_bias,
                fused=False,
                router_replay=self.router_replay,
            )
        before_drop = routing_map
        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = self._drop(probs, routing_map, seq_length, bsz)
        self._record_metrics(before_drop, routing_map)

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            map_for_aux, scores_for_aux = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, fused=False, padding_mask=padding_mask)
            with_mask = padding_mask is not None
            probs = self._apply_aux_loss(probs, scores_for_aux, map_for_aux, with_padding_mask=with_mask)
            probs = self._apply_seq_aux_loss(probs, scores_for_aux, map_for_aux, seq_length, bsz,
                                             with_padding_mask=with_mask)
            probs = self._apply_global_aux_loss(probs, scores_for_aux, map_for_aux, with_padding_mask=with_mask)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map

    # ---- checks and metrics ---------------------------------------------------------------------------
    def _check_finite(self, logits: torch.Tensor) -> None:
        """Raise on every rank of this pipeline stage when any of them sees NaN/inf router scores.

        A rank that raised alone would leave its peers blocked in the dispatcher's collectives, so the
        count of bad tokens is all-reduced over TP x DP x CP (every rank that runs this layer; the expert
        groups lie inside it). Costs one small all-reduce and one host synchronisation per layer; turn
        it off with check_finite=False.
        """
        local_bad = (~torch.isfinite(logits)).any(dim=-1).sum().reshape(1)
        total_bad = local_bad.clone()
        if dist.get_world_size(self.tp_dp_cp_group) > 1:
            dist.all_reduce(total_bad, group=self.tp_dp_cp_group)
            self.comm_counter.record("all_reduce_finite_check", total_bad.numel() * total_bad.element_size())
        total, local = int(total_bad.item()), int(local_bad.item())
        if total:
            raise NonFiniteRouterScores(
                f"MoE layer {self.layer_number}: router scores are NaN or infinite for {local} of "
                f"{logits.shape[0]} tokens on this rank ({total} on the ranks of this pipeline stage): "
                "diverged training or bad input; pass check_finite=False to the spec to skip this check"
            )

    def _record_metrics(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Keep this rank's counts; token_counts() reduces them only when someone asks (no collective
        on the training path)."""
        with torch.no_grad():
            self._local_counts = torch.stack([before.sum(dim=0), after.sum(dim=0)]).to(torch.float64)

    def token_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens per expert over the layer's whole input (the TP x CP group's tokens) of the latest
        forward, before and after dropping. A collective: call it on every rank of the TP x CP group."""
        if self._local_counts is None:
            raise RuntimeError(f"MoE layer {self.layer_number}: token_counts() before the first forward")
        counts = self._local_counts.clone()
        if dist.get_world_size(self.token_group) > 1:
            dist.all_reduce(counts, group=self.token_group)
        return counts[0], counts[1]

    # ---- token dropping -------------------------------------------------------------------------------
    def _drop(self, probs: torch.Tensor, routing_map: torch.Tensor, seq_length: int, bsz: int):
        cf = self.config.moe_expert_capacity_factor
        with torch.no_grad():
            if self.drop_scope is DropScope.SUBSEQUENCE:
                capacity = expert_capacity(probs.shape[0], self.topk, self.num_experts, cf)
                keep = _keep_top(self._drop_key(probs, routing_map), capacity, dim=0)
            else:
                keep = self._sequence_keep(probs, routing_map, seq_length, bsz, cf)
            final_map = routing_map & keep
        return probs * final_map, final_map

    def _drop_key(self, probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        """What a token competes on for a slot: its probability, or just being routed (position policy)."""
        policy = self.config.moe_token_drop_policy
        if policy == "probs":
            return torch.where(routing_map, probs.detach(), torch.full_like(probs, -1.0))
        if policy == "position":
            return routing_map.to(probs.dtype)
        raise ValueError(f"unknown moe_token_drop_policy {policy!r}; choose 'probs' or 'position'")

    def _sequence_keep(self, probs, routing_map, seq_length, bsz, cf) -> torch.Tensor:
        """Keep mask for this rank's rows, decided per (sequence, expert) over whole sequences."""
        E = self.num_experts
        key = self._drop_key(probs, routing_map).view(seq_length, bsz, E)
        group_size = dist.get_world_size(self.token_group)
        full_len = seq_length * self.tp_size * self.cp_size
        if group_size > 1:
            parts = [torch.empty_like(key) for _ in range(group_size)]
            dist.all_gather(parts, key.contiguous(), group=self.token_group)
            self.comm_counter.record("all_gather_scores", key.numel() * key.element_size() * (group_size - 1))
            full = key.new_empty(full_len, bsz, E)
            for (tp_rank, cp_rank), part in zip(self._coords(), parts):
                full[local_token_positions(full_len, tp_rank, self.tp_size, cp_rank, self.cp_size, key.device)] = part
        else:
            full = key
        capacity = expert_capacity(full_len, self.topk, E, cf)
        keep_full = _keep_top(full, capacity, dim=0)  # [S_full, B, E]
        mine = local_token_positions(full_len, self.tp_rank, self.tp_size, self.cp_rank, self.cp_size, key.device)
        return keep_full.index_select(0, mine).reshape(-1, E)

    def _coords(self) -> list[tuple[int, int]]:
        """(tp rank, cp rank) of every member of the token group, in group order (gathered once)."""
        if self._member_coords is None:
            mine = torch.tensor([self.tp_rank, self.cp_rank], dtype=torch.long)
            parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.token_group))]
            dist.all_gather(parts, mine, group=self.token_group)
            self._member_coords = [tuple(p.tolist()) for p in parts]
        return self._member_coords


def _keep_top(key: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Mask of the k largest entries along `dim`, ties to the lower index (a stable sort)."""
    n = key.shape[dim]
    if k >= n:
        return torch.ones_like(key, dtype=torch.bool)
    order = torch.sort(key, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    return torch.zeros_like(key, dtype=torch.bool).scatter(dim, order, True)
