"""Whole-model references: the same full weights and the same global batch under any folded layout.

A multi-rank model and a single-rank one are compared by giving both the same FULL weights and the
same global batch. `full_weights` names every parameter of a single-rank model by its place in the
whole model (global layer number, global expert index); `load_full_weights` cuts each parameter's
shard out of those weights using the parameter's OWN metadata, as Megatron-Core 0.19 sets it:
`tensor_model_parallel` and `partition_dim` (Column/RowParallelLinear, VocabParallelEmbedding), the
expert-TP group for routed experts and the TP group otherwise, and with gated linear units each half
of fc1 sharded separately ([gate slice; linear slice] per rank, as MLP.forward chunks it).
`global_tokens` makes a deterministic global batch; `train` runs the training step of `megatron-fold
train` (megatron_fold.train.loop: Megatron's DDP, optimizer and schedules) on it and returns each
step's loss over the whole global batch and its gradient norm, the numbers a single-rank run must
reproduce.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.utils import unwrap_model

from megatron_fold.train.loop import StepResult, Trainer, micro_batches

__all__ = ["full_weights", "load_full_weights", "global_tokens", "micro_batches", "StepResult", "Trainer", "train"]


# ---- names of parameters in the whole model -----------------------------------------------------

def _global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> its name in the whole model: `decoder.layers.{i}` numbered by the layer's
    global layer number (pipeline and virtual stages hold slices of the layer list) and
    `experts.local_experts.{l}` by the expert's global index (EP ranks hold blocks of experts)."""
    names = {}

    def walk(module, local, global_, moe_layer):
        if isinstance(module, MoELayer):
            moe_layer = module
        for pname, _ in module.named_parameters(recurse=False):
            names[local + pname] = global_ + pname
        for cname, child in module.named_children():
            gname = cname
            if local.endswith("decoder.layers."):
                gname = str(child.layer_number - 1)
            elif local.endswith("experts.local_experts.") and moe_layer is not None:
                gname = str(moe_layer.local_expert_indices[int(cname)])
            walk(child, f"{local}{cname}.", f"{global_}{gname}.", moe_layer)

    walk(chunk, "", "", None)
    return names


def full_weights(chunks: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter of a single-rank model (TP = CP = EP = ETP = PP = 1), by its global name."""
    weights = {}
    for chunk in unwrap_model(chunks):
        names = _global_names(chunk)
        for name, param in chunk.named_parameters():
            weights[names[name]] = param.detach().cpu().clone()  # CPU: it crosses processes
    return weights


def _is_glu_fc1(name: str, config) -> bool:
    return config.gated_linear_unit and name.endswith("linear_fc1.weight") and ".mlp." in f".{name}"


def load_full_weights(chunks: list[torch.nn.Module], weights: dict[str, torch.Tensor], pg_collection) -> int:
    """Copy this rank's shard of every full weight into `chunks`; returns how many parameters it set.

    Raises if a parameter has no full weight or its shard's shape differs from the parameter's.
    """
    count = 0
    with torch.no_grad():
        for chunk in unwrap_model(chunks):
            names = _global_names(chunk)
            for name, param in chunk.named_parameters():
                full_name = names[name]
                if full_name not in weights:
                    raise KeyError(f"no full weight for {full_name!r} (local {name!r})")
                full = weights[full_name]
                shard = full
                if getattr(param, "tensor_model_parallel", False):
                    group = pg_collection.expt_tp if ".experts." in name else pg_collection.tp
                    n, r, dim = group.size(), group.rank(), param.partition_dim
                    if _is_glu_fc1(name, chunk.config):
                        shard = torch.cat([half.chunk(n, dim=dim)[r] for half in full.chunk(2, dim=dim)], dim=dim)
                    else:
                        shard = full.chunk(n, dim=dim)[r]
                if shard.shape != param.shape:
                    raise ValueError(f"{full_name}: shard {tuple(shard.shape)} of the full {tuple(full.shape)} "
                                     f"does not fit the parameter {tuple(param.shape)}")
                param.copy_(shard)
                count += 1
    return count


# ---- data -------------------------------------------------------------------------------------

def global_tokens(num_sequences: int, seq_length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """A deterministic global batch of token ids, [num_sequences, seq_length + 1] (inputs + next token)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_sequences, seq_length + 1), generator=g)


# ---- training -----------------------------------------------------------------------------------

def train(chunks: list[torch.nn.Module], config, pg_collection, tokens: torch.Tensor, *, steps: int,
          **trainer_options) -> list[StepResult]:
    """`steps` optimizer steps on the same global batch; each step's global loss and gradient norm."""
    trainer = Trainer(chunks, config, pg_collection, **trainer_options)
    return [trainer.step(tokens) for _ in range(steps)]
