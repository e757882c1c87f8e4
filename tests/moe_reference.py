"""Test utilities: tiny MoE configs, full (unsharded) weights, and their sharded load / gradient gather.

A multi-rank layer and a single-rank layer are compared by giving both the same FULL weights:
`load_full_weights` cuts each rank's shard out of them (experts by EP, expert matrices by ETP, shared
experts by attention TP, the router replicated), and `gather_full_grads` reassembles full gradients.
Both work for any MoELayer built from Megatron's SequentialMLP experts (upstream's and ours).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_fold.layout import FoldedLayout

FFN = 16


def make_moe_config(layout: FoldedLayout, hidden_size: int = 16, shared_expert: bool = False,
                    **overrides) -> TransformerConfig:
    kwargs = dict(
        num_layers=1, hidden_size=hidden_size, num_attention_heads=4, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_moe_experts=8, moe_router_topk=2,
        tensor_model_parallel_size=layout.tp, context_parallel_size=layout.cp,
        pipeline_model_parallel_size=1,  # one layer under test: PP stages hold independent copies
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.tp > 1, use_cpu_initialization=True, add_bias_linear=False,
        params_dtype=torch.float32, moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none",
    )
    if shared_expert:
        kwargs["moe_shared_expert_intermediate_size"] = FFN
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def full_moe_weights(config: TransformerConfig, seed: int) -> dict[str, torch.Tensor]:
    if config.gated_linear_unit:
        raise NotImplementedError("full_moe_weights covers non-gated experts only")
    g = torch.Generator().manual_seed(seed)
    H, F, E = config.hidden_size, config.moe_ffn_hidden_size, config.num_moe_experts
    w = {"router.weight": torch.randn(E, H, generator=g) * 0.5}
    for e in range(E):
        w[f"experts.{e}.fc1"] = torch.randn(F, H, generator=g) / H ** 0.5
        w[f"experts.{e}.fc2"] = torch.randn(H, F, generator=g) / F ** 0.5
    if config.moe_shared_expert_intermediate_size:
        Fs = config.moe_shared_expert_intermediate_size
        w["shared.fc1"] = torch.randn(Fs, H, generator=g) / H ** 0.5
        w["shared.fc2"] = torch.randn(H, Fs, generator=g) / Fs ** 0.5
    return w


def _shard(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    return t.chunk(n, dim=dim)[r]


def _params(layer):
    """(full-weight name, local parameter, shard dim, shard group name) for every MoE parameter."""
    out = [("router.weight", layer.router.weight, None, None)]
    for l, expert in enumerate(layer.experts.local_experts):
        e = layer.local_expert_indices[l]
        out.append((f"experts.{e}.fc1", expert.linear_fc1.weight, 0, "expt_tp"))
        out.append((f"experts.{e}.fc2", expert.linear_fc2.weight, 1, "expt_tp"))
    if layer.shared_experts is not None:
        out.append(("shared.fc1", layer.shared_experts.linear_fc1.weight, 0, "tp"))
        out.append(("shared.fc2", layer.shared_experts.linear_fc2.weight, 1, "tp"))
    return out


def load_full_weights(layer, weights: dict[str, torch.Tensor], pg_collection) -> None:
    with torch.no_grad():
        for name, param, dim, group in _params(layer):
            full = weights[name]
            param.copy_(full if dim is None else _shard(full, dim, getattr(pg_collection, group)))


def _all_gather_cat(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_full_grads(layer, pg_collection) -> dict[str, torch.Tensor]:
    """Full gradients (names as in full_moe_weights) from this rank's shards and its peers'.

    The layer performs no data-parallel reduction: a rank's gradients cover the tokens it (or, for
    experts, its EP x ETP peers) processed. Callers reduce over the right data-parallel group first.
    """
    grads = {}
    local_experts = {}
    for name, param, dim, group in _params(layer):
        g = param.grad if param.grad is not None else torch.zeros_like(param)
        full = g if dim is None else _all_gather_cat(g, dim, getattr(pg_collection, group))
        if name.startswith("experts."):
            local_experts[name] = full
        else:
            grads[name] = full.clone()
    # Experts: each EP rank holds num_local_experts of them; gather the stacks over EP.
    L = len(layer.experts.local_experts)
    ep = pg_collection.ep
    for kind in ("fc1", "fc2"):
        stack = torch.stack([local_experts[f"experts.{layer.local_expert_indices[l]}.{kind}"] for l in range(L)])
        everything = _all_gather_cat(stack, 0, ep)
        for e in range(everything.shape[0]):
            grads[f"experts.{e}.{kind}"] = everything[e].clone()
    return grads
