"""FoldRouter: Megatron's TopKRouter without CUDA-only calls, with layout-invariant token dropping.

Why a subclass: upstream's score functions, group-limited routing, expert bias, the three aux losses,
z-loss, input jitter, router dtype, quantile balancing and the benchmark-only random logits
(moe_router_force_load_balancing / moe_router_force_biased, drawn from Megatron's RNG tracker) are
device-agnostic and stay upstream's code. What is not: `TopKRouter.__init__` allocates its buffers on
the current CUDA device, `gating` moves the weight there (and uses Transformer Engine's GEMM when
installed), and `_apply_expert_bias` is torch.compile'd. Those few pieces are replaced here; buffers
live on the weight's device, which follows the input's device. moe_router_fusion reaches TE's fused
kernels through fused.py (the GPU boundary) when the logits are on a CUDA device.
Which configurations run at all is decided by flags.validate_fold_moe_config.

Token dropping (`moe_expert_capacity_factor`) has two scopes (see capacity.py):
- subsequence: Megatron's semantics, capacity = ceil(local_tokens * topk / E * cf) from this rank's
  shard; the same kept tokens as upstream's `apply_router_token_dropping` wherever upstream's choice
  is well defined (see "Differences" below).
- sequence: the drop keys (routing probabilities, E floats per token: small next to hidden states)
  are all-gathered over the ranks holding one micro-batch's tokens (attention TP x CP with sequence
  parallelism, CP alone without it), put back in true token order (undoing sequence parallelism and
  CP's load-balanced chunks), drops decided per (sequence, expert) with capacity
  ceil(seq_len * topk / E * cf), and this rank's rows kept; each member of the token group sorts only
  a share of the experts and the members exchange the kept sets' thresholds (sequence_drop.py). Every
  layout then drops the same tokens
  (given the same router scores: a gating GEMM whose rounding changed with the layout could still
  flip a near-tie).
Drop decisions are made without gradient; the probabilities of kept tokens keep their graph.

Padding (`moe_pad_expert_input_to_capacity`): this router NEVER returns a padded routing map.
Upstream returns the capacity mask, i.e. routes zero-probability tokens to experts to fill them up.
We return the dropped map; FlexFoldDispatcher pads every (rank, expert) block with probability-0
rows to the static size `capacity.padded_tokens_per_expert(...)`. Padding rows contribute zero to
outputs and gradients, so both equal upstream's.

Differences from upstream, all in cases where upstream's result is left to a kernel:
- Ties are broken by position (the lower row index, i.e. the earlier token, wins). Upstream uses
  torch.topk(sorted=False), whose choice among equal keys is unspecified.
- "position" policy: upstream runs that topk over the 0/1 routing map, so which routed tokens it keeps
  is arbitrary (on CPU, e.g. rows 9, 0 and 7 rather than 0, 1, 2). We keep the earliest tokens, as the
  policy's name promises; the number kept per expert is the same.
- "probs" policy: a routed token with probability exactly 0 always beats an unrouted slot.
- Expert-bias counts with drop-and-pad: upstream counts its returned map, i.e. the capacity mask, so
  every expert counts exactly its capacity and aux-loss-free balancing never moves the bias. Ours
  counts the tokens each expert really kept (padding is the dispatcher's business, see above).
Like upstream, padding tokens (padding_mask) compete for capacity; they are excluded from the token
counts, the expert-bias counts and the aux losses. Upstream's expert-bias count with a padding mask
fails to broadcast ([tokens, E] & [tokens]); ours masks rows.

Metrics of the latest forward (detached; layout-invariant with sequence scope):
`last_tokens_per_expert` and `last_tokens_per_expert_before_drop` ([E] int64, the layer's whole input,
i.e. summed over the token group), `last_dropped_fraction` (0-d float64 tensor, no host sync).
Sequence scope derives them from the gathered keys and thresholds it exchanges anyway. Otherwise the forward keeps this rank's
counts and the first read after it all-reduces 2*E counts over the token group (TP x CP): metrics are
for logging steps, so the training path pays no collective for them (as upstream, which reduces its
token counts only when it logs). Such a read is a collective: make it on every rank of that group.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_fold.moe import fused
from megatron_fold.moe.capacity import DropScope, expert_capacity
from megatron_fold.moe.comm import CommCounter
from megatron_fold.moe.flags import load_balancing_types, validate_fold_moe_config
from megatron_fold.moe.sequence_drop import expert_shares, keep_mask, share_record
from megatron_fold.moe.token_order import local_token_positions

__all__ = ["FoldRouter", "NonFiniteRouterScores"]

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# Drop key of a (token, expert) pair the token is not routed to: below every probability, so routed
# pairs always win a slot first.
_UNROUTED = -1.0


class NonFiniteRouterScores(FloatingPointError):
    """Router logits contained NaN or infinity (diverged training or corrupted input)."""


class FoldRouter(TopKRouter):
    """TopKRouter for folded layouts: device-agnostic, with `subsequence` or `sequence` drop scope.

    Input hidden states [S_local, B, H] (or [N, H], routed as [N, 1, H]); outputs probs [S_local*B, E]
    and routing_map [S_local*B, E] (bool, after dropping, never padded), row = s*B + b as upstream's
    .view(-1, E).
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *,
                 drop_scope: DropScope | str = DropScope.SUBSEQUENCE, check_finite: bool = False,
                 record_token_counts: bool = True):
        _check_supported(config, pg_collection, drop_scope)
        self.drop_scope = DropScope.parse(drop_scope)
        # Build with expert bias, aux losses and quantile balancing off (so upstream allocates no buffer on a CUDA
        # device), then restore the real config and register those buffers on the weight's device.
        build_config = copy.copy(config)
        build_config.moe_router_enable_expert_bias = False
        build_config.moe_router_load_balancing_type = "none"
        super().__init__(build_config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.config = config
        self.routing_type = config.moe_router_load_balancing_type
        self.enable_expert_bias = config.moe_router_enable_expert_bias
        device = self.weight.device
        zeros = lambda: torch.zeros(self.num_experts, dtype=torch.float32, device=device)  # noqa: E731
        if self.enable_expert_bias:
            self._register_buffer_over_attribute("local_tokens_per_expert", zeros(), persistent=False)
            self._register_buffer_over_attribute("expert_bias", zeros(), persistent=True)
        if self.get_aux_loss_coeff("global_aux_loss") > 0:
            self._register_buffer_over_attribute("global_tokens_per_expert", zeros(), persistent=False)
            self._register_buffer_over_attribute(
                "ga_steps", torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        if self.routing_type == "quantile_balancing":
            # Upstream's buffers: the bias (checkpointed), this global batch's quantile sum and count
            # (finalize_model_grads averages them over DP x CP and updates qb_beta).
            self._register_buffer_over_attribute("qb_beta", zeros(), persistent=True)
            self._register_buffer_over_attribute("qb_beta_accum", zeros(), persistent=False)
            self._register_buffer_over_attribute(
                "qb_beta_count", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self._unfused: tuple | None = None  # (config, its copy with moe_router_fusion off)

        self.check_finite = check_finite
        self.record_token_counts = record_token_counts
        # The ranks holding distinct tokens of one micro-batch. With sequence parallelism TP x CP; without
        # it (evaluation with TP > 1) TP ranks hold the same tokens, so only CP splits the sequence.
        self.cp_size, self.cp_rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        if config.sequence_parallel:
            self.token_group = self.tp_cp_group
            self.seq_tp_size, self.seq_tp_rank = dist.get_world_size(self.tp_group), dist.get_rank(self.tp_group)
        else:
            self.token_group, self.seq_tp_size, self.seq_tp_rank = self.cp_group, 1, 0
        self.comm_counter = CommCounter()
        self._member_coords: list[tuple[int, int]] | None = None  # (seq tp rank, cp rank) per token-group rank
        self._order_cache: tuple | None = None  # ((sequence length, device), _token_order(...))
        self._columns_cache: tuple | None = None  # (shares key, _share_columns(...))

        self._counts: torch.Tensor | None = None  # [2, E] int64: routed, kept (padding excluded)
        self._counts_reduced = False  # whether _counts already cover the whole token group

    def _register_buffer_over_attribute(self, name: str, value: torch.Tensor, persistent: bool) -> None:
        delattr(self, name)  # upstream set it to None as a plain attribute
        self.register_buffer(name, value, persistent=persistent)

    # ---- forward pieces upstream runs on CUDA only --------------------------------------------------
    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """[S_local, B, H] -> probs, routing_map, both [S_local*B, E].

        Also [N, H] (tokens without a sequence axis, as Megatron's router accepts), routed exactly as
        [N, 1, H]: one sequence of N tokens. Refused where a decision needs the sequence axis:
        sequence-scope dropping (capacity per whole sequence) and seq_aux_loss (loss per sequence).
        """
        H = self.config.hidden_size
        if input.dim() == 2 and input.shape[-1] == H:
            self._check_flat_input_allowed(tuple(input.shape))
            if padding_mask is not None and tuple(padding_mask.shape) != (input.shape[0],):
                raise ValueError(f"MoE layer {self.layer_number}: padding_mask has shape {tuple(padding_mask.shape)}, "
                                 f"expected [tokens] = [{input.shape[0]}] for input [tokens, hidden]")
            return self.forward(input.unsqueeze(1), None if padding_mask is None else padding_mask.unsqueeze(1))
        if input.dim() != 3 or input.shape[-1] != H:
            raise ValueError(
                f"MoE layer {self.layer_number}: FoldRouter expects hidden states [seq_local, batch, "
                f"hidden={H}] or [tokens, hidden={H}], got shape {tuple(input.shape)}")
        if padding_mask is not None and tuple(padding_mask.shape) != tuple(input.shape[:2]):
            raise ValueError(f"MoE layer {self.layer_number}: padding_mask has shape {tuple(padding_mask.shape)}, "
                             f"expected [seq_local, batch] = {tuple(input.shape[:2])}")
        if self.weight.device != input.device:
            # Upstream moves a CPU weight to the current CUDA device on first use; the device-agnostic
            # equivalent follows the input (parameters keep their identity; buffers move along).
            self.to(input.device)
        # Upstream's forward: jitter, gate, the benchmark options moe_router_force_load_balancing /
        # moe_router_force_biased (random logits from Megatron's RNG tracker; in CPU mode its CPU
        # counterpart, megatron_fold.portable.rng), then our routing().
        return super().forward(input, padding_mask)

    def _check_flat_input_allowed(self, shape: tuple[int, ...]) -> None:
        """[tokens, hidden] carries no sequence axis: refuse it where routing needs one."""
        needs = []
        if self.drop_scope is DropScope.SEQUENCE and self.config.moe_expert_capacity_factor is not None:
            needs.append(f"drop_scope='sequence' with moe_expert_capacity_factor={self.config.moe_expert_capacity_factor} "
                         "decides drops per whole sequence")
        if "seq_aux_loss" in load_balancing_types(self.config):
            needs.append("moe_router_load_balancing_type 'seq_aux_loss' computes its loss per sequence")
        if needs:
            raise ValueError(
                f"MoE layer {self.layer_number}: FoldRouter got hidden states [tokens, hidden] = {list(shape)}, "
                f"without a sequence axis, but {' and '.join(needs)}: pass [seq_local, batch, hidden] "
                "(or use drop_scope='subsequence')")

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Upstream's gate: logits in moe_router_dtype from Megatron's own router_gating_linear, i.e.
        Transformer Engine's GEMM with 16-bit inputs and fp32 output on GPUs (no fp32 copy of the input
        or weight), its torch fallback elsewhere. Only CPU tensors on a machine with TE take
        _RouterGate (TE's GEMM needs CUDA tensors); the numbers are the same fallback's."""
        router_dtype = _ROUTER_DTYPES.get(self.config.moe_router_dtype, input.dtype)
        if fused.gating_gemm_can_run(input):
            return moe_utils.router_gating_linear(input, self.weight, self.bias, router_dtype)
        return _RouterGate.apply(input, self.weight, self.bias, router_dtype)

    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Count routed tokens for the expert-bias update (upstream's, uncompiled, masking whole rows).

        The counts stay per rank; finalize_model_grads all-reduces them over TP x DP x CP before the
        sign update (megatron.core.transformer.moe.moe_utils.get_updated_expert_bias).
        """
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & ~padding_mask.unsqueeze(-1)
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    # ---- routing ----------------------------------------------------------------------------------
    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Upstream's TopKRouter.routing with the finite check, our drop scopes and token counts.

        logits [S, B, E] -> probs, routing_map [S*B, E]; padding_mask [S, B] (True = padding).
        """
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.num_experts)  # [S*B, E]
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)  # [S*B]
        if self.check_finite:
            self._check_finite(logits)
        # moe_router_fusion: TE's kernels where they can run (see fused.py), upstream's torch ops otherwise;
        # upstream's aux-loss helpers read the flag from self.config, so it holds the decision meanwhile.
        use_fused = fused.router_fusion(self.config, logits)
        config = self.config
        self.config = config if use_fused or not config.moe_router_fusion else self._config_without_fusion()
        try:
            return self._route(logits, padding_mask, seq_length, bsz, use_fused)
        finally:
            self.config = config

    def _config_without_fusion(self):
        """self.config with moe_router_fusion off, for a forward that cannot fuse (CPU tensors, no TE)."""
        if self._unfused is None or self._unfused[0] is not self.config:
            unfused = copy.copy(self.config)
            unfused.moe_router_fusion = False
            self._unfused = (self.config, unfused)
        return self._unfused[1]

    def _route(self, logits: torch.Tensor, padding_mask: torch.Tensor | None, seq_length: int, bsz: int,
               use_fused: bool):
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)

        if self.routing_type == "sinkhorn":
            probs, routing_map = self.sinkhorn_load_balancing(logits)
        elif self.routing_type == "quantile_balancing":
            probs, routing_map = self._quantile_balancing(logits, padding_mask)
        else:
            probs, routing_map = self._topk(logits, use_fused, self.router_replay)
        routed = routing_map
        gathered_counts = None
        if self.config.moe_expert_capacity_factor is not None:
            scores = self._drop_scores(logits, probs, use_fused)
            probs, routing_map, gathered_counts = self._drop(probs, routing_map, seq_length, bsz, scores)
        self._record_token_counts(routed, routing_map, padding_mask, gathered_counts)

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            map_for_aux, scores_for_aux = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, fused=use_fused, padding_mask=padding_mask)
            with_mask = padding_mask is not None
            probs = self._apply_aux_loss(probs, scores_for_aux, map_for_aux, with_padding_mask=with_mask)
            probs = self._apply_seq_aux_loss(probs, scores_for_aux, map_for_aux, seq_length, bsz,
                                             with_padding_mask=with_mask)
            probs = self._apply_global_aux_loss(probs, scores_for_aux, map_for_aux, with_padding_mask=with_mask)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map

    def _quantile_balancing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None):
        """Upstream's quantile balancing (logits gathered over attention TP x CP, experts picked from
        logits - qb_beta, this micro-batch's quantile accumulated for finalize_model_grads), with its
        preconditions as errors that name the option. logits [N, E] -> probs, routing_map [N, E].

        Layout-invariant: each token's experts depend only on its own logits and qb_beta, and the
        quantile is a column statistic over the gathered tokens, i.e. over the token group's whole
        micro-batch under every TP x CP split (given the same logits, as for every routing decision)."""
        if padding_mask is not None:
            raise ValueError(f"MoE layer {self.layer_number}: moe_router_load_balancing_type='quantile_balancing' "
                             "does not support a padding_mask (Megatron's quantile counts every token); pass none")
        group = self.tp_cp_group
        tokens = logits.shape[0] * group.size()
        if self.training and torch.is_grad_enabled() and (tokens * self.topk) % self.num_experts:
            raise ValueError(
                f"MoE layer {self.layer_number}: moe_router_load_balancing_type='quantile_balancing' needs the "
                f"routed pairs of the gathered micro-batch ({tokens} tokens x moe_router_topk={self.topk}) to be "
                f"divisible by num_moe_experts={self.num_experts}; change the micro-batch or sequence length")
        if group.size() > 1:
            self.comm_counter.record("all_gather_quantile_logits",
                                     logits.shape[0] * self.num_experts * 4 * (group.size() - 1))
        return self.quantile_balancing(logits)

    # ---- checks and metrics -----------------------------------------------------------------------
    def _check_finite(self, logits: torch.Tensor) -> None:
        """Raise on every rank of this pipeline stage when any of them sees NaN/inf router logits.

        A rank that raised alone would leave its peers blocked in the dispatcher's collectives, so the
        count of bad tokens is all-reduced over TP x DP x CP (every rank that runs this layer; the
        expert groups lie inside it). Costs one small all-reduce and one host synchronisation per
        forward, so it runs only with check_finite=True (off by default, see FoldMoELayer).
        """
        local_bad = (~torch.isfinite(logits)).any(dim=-1).sum().reshape(1)  # [1] tokens with a bad logit
        total_bad = local_bad.clone()
        if dist.get_world_size(self.tp_dp_cp_group) > 1:
            dist.all_reduce(total_bad, group=self.tp_dp_cp_group)
            self.comm_counter.record("all_reduce_finite_check", total_bad.numel() * total_bad.element_size())
        total, local = int(total_bad.item()), int(local_bad.item())
        if total:
            raise NonFiniteRouterScores(
                f"MoE layer {self.layer_number}: router scores are NaN or infinite for {local} of "
                f"{logits.shape[0]} tokens on this rank ({total} on the ranks of this pipeline stage): "
                "diverged training or bad input; pass check_finite=False to the spec to skip this check")

    def _record_token_counts(self, routed: torch.Tensor, kept: torch.Tensor, padding_mask: torch.Tensor | None,
                             gathered_counts: torch.Tensor | None) -> None:
        """Keep tokens per expert before and after dropping; reduced over the token group when first read."""
        if not self.record_token_counts:
            return
        with torch.no_grad():
            if gathered_counts is not None and padding_mask is None:
                # [2, E] from the sequence-scope gather: already the token group's whole input.
                self._counts, self._counts_reduced = gathered_counts, True
                return
            if padding_mask is not None:
                valid = ~padding_mask.unsqueeze(-1)  # [S*B, 1]
                routed, kept = routed & valid, kept & valid
            self._counts = torch.stack([routed.sum(dim=0), kept.sum(dim=0)])  # [2, E] int64, this rank's rows
            self._counts_reduced = dist.get_world_size(self.token_group) == 1

    def _reduced_counts(self) -> torch.Tensor:
        """[2, E] counts over the token group; the first call after a forward all-reduces them."""
        if not self.record_token_counts:
            raise RuntimeError(f"MoE layer {self.layer_number}: metrics are off (spec parameter metrics=False, "
                               "i.e. FoldRouter(record_token_counts=False))")
        if self._counts is None:
            raise RuntimeError(f"MoE layer {self.layer_number}: token counts read before the first forward")
        if not self._counts_reduced:
            dist.all_reduce(self._counts, group=self.token_group)
            self._counts_reduced = True
        return self._counts

    @property
    def last_tokens_per_expert(self) -> torch.Tensor:
        """[E] int64: tokens each expert kept in the latest forward, over the token group (see module doc)."""
        return self._reduced_counts()[1]

    @property
    def last_tokens_per_expert_before_drop(self) -> torch.Tensor:
        """[E] int64: tokens routed to each expert in the latest forward, before dropping."""
        return self._reduced_counts()[0]

    @property
    def last_dropped_fraction(self) -> torch.Tensor:
        """0-d float64: share of routed (token, expert) pairs dropped in the latest forward."""
        before, after = self._reduced_counts().to(torch.float64)
        routed_total = before.sum()
        return torch.where(routed_total > 0, 1.0 - after.sum() / routed_total.clamp(min=1.0),
                           torch.zeros_like(routed_total))

    def token_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(before, after) dropping, float64 [E], of the latest forward (a collective on first read)."""
        before, after = self._reduced_counts().to(torch.float64)
        return before, after

    # ---- token dropping ---------------------------------------------------------------------------
    def _drop_scores(self, logits: torch.Tensor, probs: torch.Tensor, use_fused: bool) -> torch.Tensor:
        """The probabilities drops are decided on [S*B, E]: probs themselves when they are fp32 or wider,
        else the same top-k routing recomputed in fp32 from the logits (no gradient). In bf16 many
        routing probabilities round to the same value (8 significant bits), and a tie would hand the
        slot to the earlier token instead of the likelier one. A token whose fp32 choice of experts
        differs from the 16-bit one (a near-tie) keeps its 16-bit probability for the pairs it is
        routed to. Sinkhorn and quantile balancing compete on their own probabilities."""
        if probs.dtype.itemsize >= 4 or self.routing_type in ("sinkhorn", "quantile_balancing"):
            return probs.detach()
        with torch.no_grad():
            probs32, map32 = self._topk(logits.detach().float(), use_fused, router_replay=None)
            return torch.where(map32, probs32, probs.detach().float())

    def _topk(self, logits: torch.Tensor, use_fused: bool, router_replay):
        """Upstream's top-k routing with this router's options: logits [N, E] -> probs, routing_map."""
        return topk_routing_with_score_function(
            logits, self.topk,
            use_pre_softmax=self.config.moe_router_pre_softmax,
            num_groups=self.config.moe_router_num_groups,
            group_topk=self.config.moe_router_group_topk,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function,
            expert_bias=self.expert_bias,
            fused=use_fused,
            router_replay=router_replay,
        )

    def _drop(self, probs: torch.Tensor, routing_map: torch.Tensor, seq_length: int, bsz: int,
              scores: torch.Tensor):
        """probs, routing_map [S*B, E] -> the same after dropping, and (sequence scope) counts [2, E];
        the routed pairs compete on `scores` [S*B, E] (see _drop_scores)."""
        cf = self.config.moe_expert_capacity_factor
        with torch.no_grad():
            key = self._drop_key(scores, routing_map)  # [S*B, E]
            if self.drop_scope is DropScope.SUBSEQUENCE:
                keep = _keep_top(key, expert_capacity(key.shape[0], self.topk, self.num_experts, cf), dim=0)
                counts = None
            else:
                keep, counts = self._sequence_keep(key, seq_length, bsz, cf)
            kept = routing_map & keep
        return probs * kept, kept, counts

    def _drop_key(self, scores: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        """What a routed pair competes on for a slot (higher wins): its probability (probs policy) or
        nothing (position policy: all routed pairs tie, so the earlier token wins)."""
        unrouted = torch.full_like(scores, _UNROUTED)
        if self.config.moe_token_drop_policy == "probs":
            return torch.where(routing_map, scores, unrouted)
        return torch.where(routing_map, torch.zeros_like(scores), unrouted)

    def _sequence_keep(self, key: torch.Tensor, seq_length: int, bsz: int, cf: float):
        """Keep mask [S_local*B, E] for this rank's rows, decided per (sequence, expert) over whole
        sequences, and the token group's counts [2, E] (routed, kept). With a token group of G > 1
        ranks, each sorts a share of the experts and one small all-gather shares the thresholds
        (sequence_drop.py): the same decision as one rank sorting everything."""
        E = self.num_experts
        key = key.view(seq_length, bsz, E)  # [S_local, B, E]
        full_len = seq_length * self.seq_tp_size * self.cp_size
        capacity = expert_capacity(full_len, self.topk, E, cf)
        group_size = dist.get_world_size(self.token_group)
        if group_size == 1:
            keep = _keep_top(key, capacity, dim=0)  # [S, B, E]
            routed = key > _UNROUTED
            counts = torch.stack([routed.sum(dim=(0, 1)), (routed & keep).sum(dim=(0, 1))])  # [2, E]
            return keep.reshape(-1, E), counts
        true_order, mine = self._token_order(full_len, key.device)
        gathered = key.new_empty(group_size * seq_length, bsz, E)  # group members' rows, member-major
        dist.all_gather_into_tensor(gathered, key.contiguous(), group=self.token_group)
        self.comm_counter.record("all_gather_scores", key.numel() * key.element_size() * (group_size - 1))
        full = gathered.index_select(0, true_order)  # [S, B, E] in true token order
        starts, sizes = expert_shares(E, group_size)
        me, width = dist.get_rank(self.token_group), max(sizes)
        record = share_record(full.narrow(2, starts[me], sizes[me]), capacity, _UNROUTED, width)
        records = record.new_empty(group_size * record.numel())
        dist.all_gather_into_tensor(records, record, group=self.token_group)
        records = records.view(group_size, -1)
        self.comm_counter.record("all_gather_drop_thresholds", record.numel() * record.element_size() * (group_size - 1))
        columns = self._share_columns(E, group_size, width, key.device)  # [E]: member-major column of each expert
        thresholds = records[:, :bsz * width * 2].view(group_size, bsz, width, 2).transpose(0, 1)
        thresholds = thresholds.reshape(bsz, group_size * width, 2).index_select(1, columns)  # [B, E, 2]
        counts = records[:, bsz * width * 2:].view(group_size, 2, width).transpose(0, 1).reshape(2, -1)
        counts = counts.index_select(1, columns).to(torch.long)  # [2, E]
        keep = keep_mask(key, mine.view(-1, 1, 1), thresholds[..., 0], thresholds[..., 1])  # [S_local, B, E]
        return keep.reshape(-1, E), counts

    def _share_columns(self, num_experts: int, group_size: int, width: int, device) -> torch.Tensor:
        """[E] index of each expert among the gathered records' member-major, `width`-padded columns;
        made once per device (no host-to-device copy on the training path)."""
        key = (num_experts, group_size, width, str(device))
        if self._columns_cache is None or self._columns_cache[0] != key:
            starts, sizes = expert_shares(num_experts, group_size)
            columns = [g * width + j for g in range(group_size) for j in range(sizes[g])]
            self._columns_cache = (key, torch.tensor(columns, dtype=torch.long, device=device))
        return self._columns_cache[1]

    def _positions(self, full_len: int, tp_rank: int, cp_rank: int, device) -> torch.Tensor:
        return local_token_positions(full_len, tp_rank, self.seq_tp_size, cp_rank, self.cp_size, device)

    def _token_order(self, full_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """([S] index that puts the member-major gathered rows in true token order, [S_local] true
        positions of this rank's rows); rebuilt only when the sequence length changes (the layout
        never changes under a layer)."""
        key = (full_len, device)
        if self._order_cache is None or self._order_cache[0] != key:  # keep one: lengths rarely change
            held = torch.cat([self._positions(full_len, tp_rank, cp_rank, device)
                              for tp_rank, cp_rank in self._coords(device)])  # [S]: position of gathered row i
            true_order = torch.empty_like(held).scatter_(0, held, torch.arange(full_len, device=device))
            mine = self._positions(full_len, self.seq_tp_rank, self.cp_rank, device)
            self._order_cache = (key, (true_order, mine))
        return self._order_cache[1]

    def _coords(self, device) -> list[tuple[int, int]]:
        """(seq tp rank, cp rank) of every token-group member, in group order. Gathered once: group
        order need not follow any rank formula (Megatron's `order` argument changes it)."""
        if self._member_coords is None:
            mine = torch.tensor([self.seq_tp_rank, self.cp_rank], dtype=torch.long, device=device)
            parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.token_group))]
            dist.all_gather(parts, mine, group=self.token_group)
            self.comm_counter.record("all_gather_coords", mine.numel() * mine.element_size() * (len(parts) - 1))
            self._member_coords = [tuple(p.tolist()) for p in parts]
        return self._member_coords


def _keep_top(key: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Mask of the k largest entries along `dim`, ties to the lower index (a stable sort)."""
    n = key.shape[dim]
    if k >= n:
        return torch.ones_like(key, dtype=torch.bool)
    order = torch.sort(key, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    return torch.zeros_like(key, dtype=torch.bool).scatter(dim, order, True)


class _RouterGate(torch.autograd.Function):
    """logits = input @ weight.T (+ bias) computed in router_dtype, saving only the low-precision
    input and weight: upstream's RouterGatingLinearFunction without its Transformer Engine GEMM, for
    CPU tensors on a machine where TE is installed (TE's GEMM would fail on them; see fused.py).
    input [..., H], weight [E, H] -> [..., E]."""

    @staticmethod
    def forward(ctx, inp, weight, bias, router_dtype):
        ctx.save_for_backward(inp, weight, bias)
        ctx.router_dtype, ctx.input_dtype, ctx.weight_dtype = router_dtype, inp.dtype, weight.dtype
        flat = inp.reshape(-1, inp.shape[-1]).to(router_dtype)  # [N, H]
        if bias is None:
            out = torch.mm(flat, weight.to(router_dtype).t())
        else:
            out = torch.addmm(bias.to(router_dtype), flat, weight.to(router_dtype).t())
        return out.view(*inp.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_output):
        inp, weight, bias = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])  # [N, E]
        flat = inp.reshape(-1, inp.shape[-1])
        grad_input = torch.mm(grad, weight.to(ctx.router_dtype)).to(ctx.input_dtype).view(inp.shape)
        grad_weight = torch.mm(grad.t(), flat.to(ctx.router_dtype)).to(ctx.weight_dtype)
        grad_bias = grad.sum(dim=0).to(ctx.weight_dtype) if bias is not None else None
        return grad_input, grad_weight, grad_bias, None


def _check_supported(config, pg_collection, drop_scope) -> None:
    """Reject what FoldRouter cannot run, before any group or buffer is touched."""
    if pg_collection is None:
        raise ValueError("FoldRouter needs the folded ProcessGroupCollection (from megatron_fold.parallel_state."
                         "initialize_model_parallel(layout)); it never falls back to Megatron's global groups")
    missing = [g for g in ("tp", "cp", "tp_cp", "tp_dp_cp") if getattr(pg_collection, g, None) is None]
    if missing:
        raise ValueError(f"FoldRouter's ProcessGroupCollection lacks {missing}; build it with "
                         "megatron_fold.parallel_state.initialize_model_parallel(layout)")
    validate_fold_moe_config(config, drop_scope)
