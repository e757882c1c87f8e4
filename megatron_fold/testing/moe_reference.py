"""Test utilities: tiny MoE configs, full (unsharded) weights, and their sharded load / gradient gather.

A multi-rank MoE layer and a single-rank one are compared by giving both the same FULL weights:
`load_full_weights` cuts this rank's shard out of them, `gather_full_grads` reassembles full gradients
from every rank's shards, and `reduce_grads_like_megatron` first sums gradients over the data-parallel
groups the way Megatron's finalize_model_grads does. Sharding is read from the modules themselves
(which experts are local, each linear's tensor-parallel group), so these work for any MoELayer built
from Megatron's experts: upstream's and our FoldMoELayer alike.

Full-weight names (`full_moe_weights`), with E experts, hidden H, expert FFN F, shared FFN Fs:
    router.weight        [E, H]       replicated
    router.expert_bias   [E]          a buffer; present when moe_router_enable_expert_bias
    experts.{e}.fc1      [F, H]       [2F, H] with gated linear units: rows [0, F) are the gate half
                                      (activated), rows [F, 2F) the linear half, as one rank holds them
    experts.{e}.fc2      [H, F]
    shared.fc1, shared.fc2            the same for the shared expert, with Fs
    shared.gate          [1, H]       present when moe_shared_expert_gate

Sharding (Megatron-Core 0.19): routed experts split by EP (expert e lives on EP rank e // (E / EP)),
then each matrix by expert TP (fc1 column-parallel on dim 0, fc2 row-parallel on dim 1); with gated
linear units each rank's fc1 holds its slice of BOTH halves, [gate slice; linear slice], because
MLP.forward chunks the local fc1 output in two. Shared experts split the same way over the attention
TP group. The router weight, expert bias and shared gate are replicated.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as mpu
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_fold.layout import FoldedLayout

__all__ = [
    "FFN",
    "make_moe_config",
    "full_moe_weights",
    "load_full_weights",
    "gather_full_grads",
    "reduce_grads_like_megatron",
    "build_upstream_moe_layer",
    "shard_like_megatron",
]

FFN = 16  # expert (and default shared-expert) FFN size: divisible by every TP / ETP size up to 16


def _active_sizes() -> dict[str, int]:
    """TP / CP / EP / ETP of Megatron's initialised parallel state, or 1 each when there is none."""
    if not mpu.model_parallel_is_initialized():
        return dict(tp=1, cp=1, ep=1, etp=1)
    return dict(tp=mpu.get_tensor_model_parallel_world_size(), cp=mpu.get_context_parallel_world_size(),
                ep=mpu.get_expert_model_parallel_world_size(),
                etp=mpu.get_expert_tensor_parallel_world_size())


def make_moe_config(layout: FoldedLayout | None = None, *, hidden_size: int = 16,
                    shared_expert: bool | int = False, swiglu: bool = False, **overrides) -> TransformerConfig:
    """A tiny fp32 MoE TransformerConfig: 8 experts, top-2, dropless, no aux loss, no biases.

    Parallel sizes come from `layout`, else from Megatron's active parallel state, else are 1. PP is
    always 1: tests hold one layer, so pipeline stages hold independent copies of it. Sequence
    parallelism is on whenever TP > 1 (Megatron-Core 0.19 requires it for MoE with TP).
    `shared_expert`: True for a shared expert of FFN size FFN, or an int size. `swiglu`: gated linear
    units with SiLU, in routed and shared experts. `overrides` are TransformerConfig fields and win.
    Megatron's own default dispatcher ("allgather") applies unless moe_token_dispatcher_type is given.
    """
    sizes = (dict(tp=layout.tp, cp=layout.cp, ep=layout.ep, etp=layout.etp) if layout is not None
             else _active_sizes())
    kwargs = dict(
        num_layers=1, hidden_size=hidden_size, num_attention_heads=max(4, sizes["tp"]), ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN, num_moe_experts=8, moe_router_topk=2,
        tensor_model_parallel_size=sizes["tp"], context_parallel_size=sizes["cp"],
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=sizes["ep"], expert_tensor_parallel_size=sizes["etp"],
        sequence_parallel=sizes["tp"] > 1, use_cpu_initialization=True, add_bias_linear=False,
        params_dtype=torch.float32, moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none",
    )
    if shared_expert:
        kwargs["moe_shared_expert_intermediate_size"] = FFN if shared_expert is True else int(shared_expert)
    if swiglu:
        kwargs.update(gated_linear_unit=True, activation_func=F.silu)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def full_moe_weights(config: TransformerConfig, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic full weights for the MoE layer `config` describes (names in the module docstring).

    Scales keep activations O(1) in fp32; the router weight is larger so that routing scores are well
    separated and top-k choices are not decided by rounding.
    """
    g = torch.Generator().manual_seed(seed)
    H, Fe, E = config.hidden_size, config.moe_ffn_hidden_size, config.num_moe_experts
    halves = 2 if config.gated_linear_unit else 1
    w = {"router.weight": torch.randn(E, H, generator=g) * 0.5}
    for e in range(E):
        w[f"experts.{e}.fc1"] = torch.randn(halves * Fe, H, generator=g) / H ** 0.5
        w[f"experts.{e}.fc2"] = torch.randn(H, Fe, generator=g) / Fe ** 0.5
    if config.moe_shared_expert_intermediate_size:
        Fs = config.moe_shared_expert_intermediate_size
        w["shared.fc1"] = torch.randn(halves * Fs, H, generator=g) / H ** 0.5
        w["shared.fc2"] = torch.randn(H, Fs, generator=g) / Fs ** 0.5
        if config.moe_shared_expert_gate:
            w["shared.gate"] = torch.randn(1, H, generator=g) / H ** 0.5
    if config.moe_router_enable_expert_bias:
        w["router.expert_bias"] = torch.randn(E, generator=g) * 0.1
    return w


# ---- where each full weight lives in a (possibly sharded) layer ---------------------------------

@dataclasses.dataclass
class _Slot:
    name: str                       # full-weight name
    tensor: torch.Tensor            # the local parameter (or buffer)
    group: object = None            # process group it is sharded over; None: replicated
    dim: int = 0                    # shard dimension
    glu: bool = False               # fc1 with gated linear units: each half sharded separately


def _linear(name: str, linear, dim: int, glu: bool = False) -> _Slot:
    if getattr(linear, "bias", None) is not None:
        raise ValueError(f"{name}: linear layers with biases are not supported (build with add_bias_linear=False)")
    return _Slot(name, linear.weight, linear.tp_group, dim, glu)


def _slots(layer, pg_collection, with_buffers: bool = False) -> list[_Slot]:
    """Every MoE parameter of `layer` (and with `with_buffers`, the expert bias), in the same order on
    every rank of a group, so that collectives over these slots line up."""
    router = layer.router
    if getattr(router, "bias", None) is not None:
        raise ValueError("router bias is not supported (build with add_bias_linear=False)")
    slots = [_Slot("router.weight", router.weight)]
    if with_buffers and getattr(router, "expert_bias", None) is not None:
        slots.append(_Slot("router.expert_bias", router.expert_bias))
    experts = getattr(layer.experts, "local_experts", None)
    if experts is None:
        raise TypeError(f"experts of type {type(layer.experts).__name__} have no local_experts; only "
                        "SequentialMLP-style experts (one MLP per local expert) are supported")
    indices = list(layer.local_expert_indices)
    ep_rank = pg_collection.ep.rank()
    if indices != list(range(ep_rank * len(experts), (ep_rank + 1) * len(experts))):
        raise ValueError(f"layer's local experts {indices} are not EP rank {ep_rank}'s contiguous block of "
                         f"{len(experts)}: was the layer built with a different ProcessGroupCollection?")
    for e, expert in zip(indices, experts):
        slots.append(_linear(f"experts.{e}.fc1", expert.linear_fc1, 0, expert.config.gated_linear_unit))
        slots.append(_linear(f"experts.{e}.fc2", expert.linear_fc2, 1))
    shared = getattr(layer, "shared_experts", None)
    if shared is not None:
        slots.append(_linear("shared.fc1", shared.linear_fc1, 0, shared.config.gated_linear_unit))
        slots.append(_linear("shared.fc2", shared.linear_fc2, 1))
        if getattr(shared, "gate_weight", None) is not None:
            slots.append(_Slot("shared.gate", shared.gate_weight))
    covered = {id(s.tensor) for s in slots}
    unknown = [n for n, p in layer.named_parameters() if id(p) not in covered]
    if unknown:
        raise ValueError(f"parameters with no full-weight counterpart: {unknown}")
    return slots


def _shard_of(full: torch.Tensor, slot: _Slot) -> torch.Tensor:
    if slot.group is None or slot.group.size() == 1:
        return full
    n, r = slot.group.size(), slot.group.rank()
    if slot.glu:
        return torch.cat([half.chunk(n, dim=slot.dim)[r] for half in full.chunk(2, dim=slot.dim)], dim=slot.dim)
    return full.chunk(n, dim=slot.dim)[r]


def load_full_weights(layer, weights: dict[str, torch.Tensor], pg_collection) -> None:
    """Copy this rank's shard of the full `weights` into `layer` (any MoELayer with SequentialMLP experts).

    Every parameter of the layer must have a full weight; extra entries (say shared-expert weights
    for a layer built without them) are ignored. The expert bias is loaded when given.
    """
    with torch.no_grad():
        for slot in _slots(layer, pg_collection, with_buffers=True):
            if slot.name not in weights:
                if slot.name == "router.expert_bias":
                    continue
                raise KeyError(f"weights have no {slot.name!r} (have {sorted(weights)[:6]}...): "
                               "were they made by full_moe_weights for this layer's config?")
            shard = _shard_of(weights[slot.name], slot)
            if shard.shape != slot.tensor.shape:
                raise ValueError(f"{slot.name}: this rank's shard of the full weight {tuple(weights[slot.name].shape)} "
                                 f"is {tuple(shard.shape)}, but the layer holds {tuple(slot.tensor.shape)}")
            slot.tensor.copy_(shard)


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _unshard(local: torch.Tensor, slot: _Slot) -> torch.Tensor:
    if slot.group is None or slot.group.size() == 1:
        return local
    parts = _all_gather(local, slot.group)
    if slot.glu:
        halves = [p.chunk(2, dim=slot.dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=slot.dim)
    return torch.cat(parts, dim=slot.dim)


def gather_full_grads(layer, pg_collection) -> dict[str, torch.Tensor]:
    """Full parameter gradients, named as in full_moe_weights, on every rank. Collective over the layer's
    expert-TP, EP and TP groups: every rank of them must call it.

    Shards are reassembled (fc1/fc2 over their TP group, experts over EP); nothing is summed. So each
    entry holds what this rank's replica computed, exactly as a training step would before its
    gradient reduction (a missing gradient counts as zero):
      - router.weight, shared.gate: this rank's tokens only (its sequence-parallel / CP shard);
      - shared.fc1 / fc2: the tokens of this rank's TP group (its CP shard of one micro-batch);
      - experts.*: the tokens every rank of this rank's EP x ETP group sent to the expert, which with
        DP or EDP > 1 spans several micro-batches.
    For a comparison with single-rank runs, call reduce_grads_like_megatron first: then every entry
    is the gradient of the sum of all ranks' losses; for a dropless layer, the sum of the single-rank
    gradients over every micro-batch of the world.
    """
    grads = {}
    for slot in _slots(layer, pg_collection):
        local = slot.tensor.grad if slot.tensor.grad is not None else torch.zeros_like(slot.tensor)
        full = _unshard(local, slot)
        grads[slot.name] = full.clone() if full is local else full
    # Routed experts: EP rank k holds experts [k*L, (k+1)*L); fill in the others' from them.
    L, ep = len(layer.experts.local_experts), pg_collection.ep
    if ep.size() > 1:
        for kind in ("fc1", "fc2"):
            mine = torch.stack([grads[f"experts.{e}.{kind}"] for e in layer.local_expert_indices])  # [L, ...]
            for k, block in enumerate(_all_gather(mine, ep)):
                for l in range(L):
                    grads[f"experts.{k * L + l}.{kind}"] = block[l]
    return grads


def reduce_grads_like_megatron(layer, pg_collection) -> None:
    """Sum each parameter gradient, in place, over the ranks Megatron's finalize_model_grads reduces it
    over (Megatron averages or sums by configuration; a sum compares directly with summed single-rank
    gradients): sequence-parallel replicated parameters (router weight, shared gate) over TP first;
    then expert parameters (tagged allreduce=False) over expert DP, all others over DP x CP.
    Afterwards every rank's gradient is that of the sum of every rank's loss."""
    sequence_parallel = layer.config.sequence_parallel
    for name, param in layer.named_parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        if sequence_parallel and getattr(param, "sequence_parallel", False) and pg_collection.tp.size() > 1:
            dist.all_reduce(param.grad, group=pg_collection.tp)
        group = pg_collection.dp_cp if getattr(param, "allreduce", True) else pg_collection.expt_dp
        if group.size() > 1:
            dist.all_reduce(param.grad, group=group)


def build_upstream_moe_layer(config: TransformerConfig, pg_collection, dispatcher: str | None = None,
                             shared_expert: bool | None = None, layer_number: int = 1):
    """Megatron-Core's own MoELayer with local (non-Transformer-Engine) modules: TopKRouter, SequentialMLP
    of Column/RowParallelLinear experts, SharedExpertMLP; the same spec Megatron's GPT local layer spec uses.

    `dispatcher` ("alltoall" or "allgather") and `shared_expert` override the config when given
    (through dataclasses.replace, so Megatron re-validates it); None keeps the config's choice. On a
    machine without CUDA, CPU mode (megatron_fold.cpu) must be on.
    """
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    changes = {}
    if dispatcher is not None:
        if dispatcher not in ("alltoall", "allgather"):
            raise ValueError(f"dispatcher must be 'alltoall' or 'allgather', got {dispatcher!r}")
        changes["moe_token_dispatcher_type"] = dispatcher
    if shared_expert is not None and bool(shared_expert) != bool(config.moe_shared_expert_intermediate_size):
        changes["moe_shared_expert_intermediate_size"] = config.moe_ffn_hidden_size if shared_expert else None
    if changes:
        config = dataclasses.replace(config, **changes)
    layer = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)(
        config=config, pg_collection=pg_collection)
    layer.set_layer_number(layer_number)  # the router's aux-loss tracker indexes losses by layer
    return layer


def shard_like_megatron(x_sbh: torch.Tensor, tp_rank: int, tp: int, cp_group=None) -> torch.Tensor:
    """This rank's rows of a full [seq, batch, ...] tensor, cut the way Megatron cuts a batch: context
    parallelism by Megatron's own `get_batch_on_this_cp_rank` (which asks torch.distributed for the CP
    group's size and this rank's place in it), then sequence parallelism as a plain `torch.chunk` of
    the CP-local sequence over TP (what scatter_to_sequence_parallel_region does).

    The reference side of every layout test: it shares no code with megatron_fold.moe.token_order,
    which the router uses for the same positions. `cp_group` None means no context parallelism;
    `tp` 1 means no sequence parallelism. For positions rather than rows, pass an arange.
    """
    if x_sbh.dim() < 2:
        raise ValueError(f"expected a [seq, batch, ...] tensor, got shape {tuple(x_sbh.shape)} "
                         "(for positions, pass torch.arange(seq)[:, None])")
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        # Megatron batches are [batch, seq, ...]; 'cu_seqlens': None selects its per-sequence zigzag.
        batch = {"x": x_sbh.transpose(0, 1).contiguous(), "cu_seqlens": None}
        x_sbh = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)["x"].transpose(0, 1)
    if x_sbh.shape[0] % tp:
        raise ValueError(f"the CP-local sequence of {x_sbh.shape[0]} tokens does not split over TP {tp} "
                         "(sequence parallelism needs equal slices)")
    return torch.chunk(x_sbh, tp, dim=0)[tp_rank].contiguous()
