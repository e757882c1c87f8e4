"""FoldMoELayer: Megatron's MoELayer on the folded expert grid, with our router and dispatcher.

Why a subclass and not a copy: Megatron's MoELayer owns the forward order (shared experts, route,
dispatch, experts, combine), recomputation and the experts' construction; only its router and token
dispatcher are CUDA-bound and layout-dependent. We swap exactly those two for FoldRouter and
FlexFoldDispatcher, take every group from the folded ProcessGroupCollection we are given (never from
Megatron's globals), and expose per-layer metrics after each forward.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_fold.moe import fused
from megatron_fold.moe.capacity import DropScope
from megatron_fold.moe.dispatcher import FlexFoldDispatcher
from megatron_fold.moe.flags import validate_fold_moe_config
from megatron_fold.moe.router import FoldRouter

__all__ = ["FoldMoELayer", "MoELayerMetrics"]

_log = logging.getLogger(__name__)
_logged_notes: set[str] = set()


@dataclass(frozen=True)
class MoELayerMetrics:
    """One layer's routing and communication after its latest forward (and backward, if run).

    tokens_per_expert: tokens each expert received from this rank's micro-batch (the tokens of its
    attention TP x CP group), after dropping; identical under every layout with sequence-scope dropping.
    Other data-parallel replicas are not summed in (that would cost a collective over DP); the rows
    each local expert really processed on this rank are `layer.token_dispatcher.last_tokens_per_local_expert`.
    """

    tokens_per_expert: list[int]
    dropped_fraction: float
    max_over_mean_load: float
    collectives: dict[str, int]
    bytes_sent: dict[str, int]

    @property
    def total_collectives(self) -> int:
        return sum(self.collectives.values())

    @property
    def total_bytes_sent(self) -> int:
        return sum(self.bytes_sent.values())


class FoldMoELayer(MoELayer):
    """MoE layer whose experts live on the ETP x EP x EDP grid, independent of attention's TP x CP x DP.

    Which Megatron MoE options run, and how, is decided by flags.validate_fold_moe_config (see
    docs/moe_flags.md); accepted options whose mechanism differs from Megatron's are logged once.
    Input [S_local, B, H], or [N, H] where the routing needs no sequence axis (see FoldRouter.forward).

    Plugin-only options (spec parameters, not TransformerConfig fields):
      drop_scope: "subsequence" (Megatron's per-rank capacity) or "sequence" (layout-invariant).
      check_finite: raise, naming the layer, when router scores are NaN or infinite. Off by default:
        the check is a barrier (an all-reduce over TP x DP x CP and a host synchronisation per layer,
        per micro-batch, again in recomputation), and nothing needs it to stay safe: NaN scores cannot
        leave a rank blocked (top-k still picks k experts a token; the dispatcher's count exchange
        stops a malformed map on every rank of its group) and the step's loss and gradients turn NaN,
        which Megatron's check_for_nan_in_loss_and_grad (on by default in Megatron-LM) and the loss
        check of `megatron-fold train` stop at a sync the step pays anyway. Turn it on
        (--moe-fold-check-finite) to learn which layer went first.
      metrics: keep per-forward token counts for metrics() (no collective on the training path
        either way; False also skips the counting).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MoESubmodules | None = None,
        layer_number: int | None = None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: str | None = None,
        *,
        drop_scope: DropScope | str = DropScope.SUBSEQUENCE,
        check_finite: bool = False,
        metrics: bool = True,
    ):
        if pg_collection is None:
            raise ValueError(
                "FoldMoELayer needs the folded ProcessGroupCollection (from "
                "megatron_fold.parallel_state.initialize_model_parallel(layout)); it never falls back "
                "to Megatron's global groups"
            )
        _check_groups(config, pg_collection)
        if submodules is None:
            raise ValueError("FoldMoELayer needs MoESubmodules (build it with specs.get_fold_moe_module_spec)")
        for note in validate_fold_moe_config(config, drop_scope):
            if note not in _logged_notes:
                _logged_notes.add(note)
                _log.info(note)
        self.drop_scope = DropScope.parse(drop_scope)
        router_cls = submodules.router if submodules.router is not None else FoldRouter
        if not (isinstance(router_cls, type) and issubclass(router_cls, FoldRouter)):
            raise ValueError(f"FoldMoELayer needs a FoldRouter (or subclass) as router, got {router_cls!r}")
        submodules = copy.copy(submodules)
        submodules.router = functools.partial(router_cls, drop_scope=self.drop_scope, check_finite=check_finite,
                                              record_token_counts=metrics)

        # MoELayer.__init__ constructs the dispatcher named in the config; the alltoall one allocates a
        # CUDA stream. Build with the CUDA-free allgather one, then restore the user's config object
        # everywhere and replace the dispatcher with ours.
        # moe_shared_expert_overlap: Megatron's SharedExpertMLP runs its overlapped stages on a side
        # stream, which FlexFoldDispatcher drives around its all-to-alls. Where no stream can exist
        # (no CUDA, CPU mode off) the shared expert is built plainly and runs in line: same numbers.
        overlap = bool(config.moe_shared_expert_overlap and config.moe_shared_expert_intermediate_size is not None
                       and fused.side_streams_available())
        build_config = copy.copy(config)
        build_config.moe_token_dispatcher_type = "allgather"
        build_config.moe_shared_expert_overlap = overlap
        super().__init__(build_config, submodules, layer_number, pg_collection, is_mtp_layer, name)
        for module in self.modules():
            if getattr(module, "config", None) is build_config:
                module.config = config
        self.shared_expert_overlap = overlap  # what MoELayer.forward reads (the config may say True)
        self.token_dispatcher = FlexFoldDispatcher(
            self.num_local_experts,
            self.local_expert_indices,
            config=config,
            pg_collection=pg_collection,
            drop_scope=self.drop_scope,
        )
        if overlap:
            self.token_dispatcher.set_shared_experts(self.shared_experts)

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        # Counters describe the latest iteration: this forward and the backward that follows it.
        for counter in self.comm_counters().values():
            counter.reset()
        return super().forward(hidden_states, intermediate_tensors, padding_mask)

    def comm_counters(self) -> dict:
        """The counters of the collectives this layer issues, by source ("router", "dispatcher"); a
        collective kind is reported as "<source>.<kind>". Each forward resets them."""
        return {"router": self.router.comm_counter, "dispatcher": self.token_dispatcher.comm_counter}

    def metrics(self) -> MoELayerMetrics:
        """Routing and communication of the latest forward (+ backward, once it has run).

        The first call after a forward all-reduces 2*E token counts over TP x CP (none with sequence
        scope, whose gather already holds them): call it on every rank of that group, e.g. at logging
        steps. That logging collective is not among the counted `collectives`, which describe the
        training path.
        """
        calls, sent = {}, {}
        for source, counter in self.comm_counters().items():
            for kind, n in counter.calls.items():
                calls[f"{source}.{kind}"] = n
                sent[f"{source}.{kind}"] = counter.bytes_sent[kind]
        before, after = self.router.token_counts()
        routed = before.sum().item()
        mean = after.mean().item()
        return MoELayerMetrics(
            tokens_per_expert=[int(t) for t in after.tolist()],
            dropped_fraction=1.0 - after.sum().item() / routed if routed else 0.0,
            max_over_mean_load=(after.max().item() / mean) if mean > 0 else 0.0,
            collectives=calls,
            bytes_sent=sent,
        )


# ProcessGroupCollection fields the layer, its router, dispatcher and experts read, with the config
# field each one's size must equal (None: no config counterpart).
_REQUIRED_GROUPS = {
    "tp": "tensor_model_parallel_size", "cp": "context_parallel_size", "tp_cp": None, "tp_dp_cp": None,
    "ep": "expert_model_parallel_size", "expt_tp": "expert_tensor_parallel_size", "tp_ep": None,
    "expt_dp": None,
}


def _check_groups(config: TransformerConfig, pg_collection) -> None:
    """Refuse a collection that lacks a group or disagrees with the config: Megatron reads a missing
    group as size 1 (experts silently unsharded) and torch.distributed reads None as the world."""
    missing = [name for name in _REQUIRED_GROUPS if getattr(pg_collection, name, None) is None]
    if missing:
        raise ValueError(f"FoldMoELayer's ProcessGroupCollection lacks {missing}; build it with "
                         "megatron_fold.parallel_state.initialize_model_parallel(layout)")
    wrong = [f"{field} = {getattr(config, field)} but pg_collection.{name} has {dist.get_world_size(getattr(pg_collection, name))} ranks"
             for name, field in _REQUIRED_GROUPS.items()
             if field is not None and getattr(config, field) != dist.get_world_size(getattr(pg_collection, name))]
    if wrong:
        raise ValueError("TransformerConfig and the folded process groups disagree: " + "; ".join(wrong)
                         + "; build the config from the same FoldedLayout")
