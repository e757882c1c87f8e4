"""Whole-model references: the same full weights and the same global batch under any folded layout.

A multi-rank model and a single-rank one are compared by giving both the same FULL weights and the
same global batch. `full_weights` names every parameter of a single-rank model by its place in the
whole model (global layer number, global expert index); `load_full_weights` cuts each parameter's
shard out of those weights using the parameter's OWN metadata, as Megatron-Core 0.19 sets it:
`tensor_model_parallel` and `partition_dim` (Column/RowParallelLinear, VocabParallelEmbedding), the
expert-TP group for routed experts and the TP group otherwise, and with gated linear units each half
of fc1 sharded separately ([gate slice; linear slice] per rank, as MLP.forward chunks it).
`global_batches` cuts one global batch into this rank's micro-batches: by DP rank, then by Megatron's
own `get_batch_on_this_cp_rank` for context parallelism.

`Trainer` runs Megatron's own training step (DDP, finalize_model_grads, get_megatron_optimizer, the
pipeline schedules) and returns each step's loss over the whole global batch and its gradient norm,
the numbers a single-rank run must reproduce.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.utils import get_batch_on_this_cp_rank

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
    for chunk in chunks:
        chunk = _unwrap(chunk)
        names = _global_names(chunk)
        for name, param in chunk.named_parameters():
            weights[names[name]] = param.detach().clone()
    return weights


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def _is_glu_fc1(name: str, config) -> bool:
    return config.gated_linear_unit and name.endswith("linear_fc1.weight") and ".mlp." in f".{name}"


def load_full_weights(chunks: list[torch.nn.Module], weights: dict[str, torch.Tensor], pg_collection) -> int:
    """Copy this rank's shard of every full weight into `chunks`; returns how many parameters it set.

    Raises if a parameter has no full weight or its shard's shape differs from the parameter's.
    """
    count = 0
    with torch.no_grad():
        for chunk in chunks:
            chunk = _unwrap(chunk)
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


def micro_batches(tokens: torch.Tensor, micro_batch_size: int, pg_collection) -> list[dict]:
    """This rank's micro-batches of the global batch: DP rank d takes the d-th contiguous share of the
    sequences, in micro-batches of `micro_batch_size`; each is cut for context parallelism by
    Megatron's own get_batch_on_this_cp_rank (sequence parallelism happens inside the model)."""
    dp, d = pg_collection.dp.size(), pg_collection.dp.rank()
    if tokens.shape[0] % (dp * micro_batch_size):
        raise ValueError(f"{tokens.shape[0]} sequences do not split into DP {dp} x micro-batches of "
                         f"{micro_batch_size}")
    share = tokens.shape[0] // dp
    mine = tokens[d * share:(d + 1) * share]
    seq = tokens.shape[1] - 1
    out = []
    for start in range(0, share, micro_batch_size):
        rows = mine[start:start + micro_batch_size]
        batch = dict(tokens=rows[:, :-1].contiguous(), labels=rows[:, 1:].contiguous(),
                     loss_mask=torch.ones(rows.shape[0], seq),
                     position_ids=torch.arange(seq).expand(rows.shape[0], seq).contiguous(), cu_seqlens=None)
        if pg_collection.cp.size() > 1:
            batch = get_batch_on_this_cp_rank(batch, False, cp_group=pg_collection.cp)
        out.append(batch)
    return out


# ---- training -----------------------------------------------------------------------------------

@dataclasses.dataclass
class StepResult:
    """One optimizer step over the whole global batch, as every rank sees it."""

    loss: float        # mean token loss over the global batch (before the step's update)
    grad_norm: float   # total gradient norm Megatron's optimizer computed (before clipping)


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s] token losses

    def loss_func(output_tensor):
        mask = batch["loss_mask"]
        total = (output_tensor.float() * mask).sum()
        tokens = mask.sum().to(torch.int)
        return total, tokens, {"lm loss": torch.stack([total.detach(), tokens.detach().float()])}

    return output, loss_func


class Trainer:
    """Megatron's own training step on this rank's model chunks: DistributedDataParallel,
    get_megatron_optimizer (plain or distributed), finalize_model_grads and the pipeline schedules.

    Losses are per token (`calculate_per_token_loss`): each rank's loss is a token sum, and
    finalize_model_grads divides every gradient by the global token count, so any split of the global
    batch over DP, CP and micro-batches yields the same gradients as one rank taking all of it.
    """

    def __init__(self, chunks: list[torch.nn.Module], config, pg_collection, *, distributed_optimizer: bool = False,
                 lr: float = 1e-3, clip_grad: float = 1.0, micro_batch_size: int = 1):
        if not config.calculate_per_token_loss:
            raise ValueError("Trainer needs config.calculate_per_token_loss=True (layout-independent loss scaling)")
        self.config, self.pg_collection, self.micro_batch_size = config, pg_collection, micro_batch_size
        self.distributed_optimizer = distributed_optimizer
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer)
        self.model = [DistributedDataParallel(config, ddp_config, chunk, pg_collection=pg_collection)
                      for chunk in chunks]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=lr, clip_grad=clip_grad,
                            use_distributed_optimizer=distributed_optimizer, params_dtype=config.params_dtype),
            self.model, pg_collection=pg_collection, use_gloo_process_groups=False)
        config.finalize_model_grads_func = functools.partial(finalize_model_grads, pg_collection=pg_collection)
        if len(self.model) > 1:
            config.no_sync_func = [m.no_sync for m in self.model]
        vpp = len(self.model)
        self._forward_backward = get_forward_backward_func(pp_size=pg_collection.pp.size(),
                                                           vp_size=vpp if vpp > 1 else None)

    def step(self, tokens: torch.Tensor) -> StepResult:
        """One optimizer step on the global batch `tokens` [sequences, seq_length + 1]."""
        pgs, model = self.pg_collection, self.model
        batches = micro_batches(tokens, self.micro_batch_size, pgs)
        for m in model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = [iter(batches) for _ in model]
        losses = self._forward_backward(
            forward_step_func=_forward_step, data_iterator=iterators if len(model) > 1 else iterators[0],
            model=model, num_microbatches=len(batches),
            seq_length=tokens.shape[1] - 1,  # the schedules divide it by CP (and by TP under SP) themselves
            micro_batch_size=self.micro_batch_size, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        total = torch.zeros(2)  # [token loss sum, tokens]
        if pgs.pp.rank() == pgs.pp.size() - 1:
            for entry in losses:
                total += entry["lm loss"]
        # Sums of the last stage over DP x CP, then from the last stage to every stage (others add 0).
        dist.all_reduce(total, group=pgs.dp_cp)
        dist.all_reduce(total, group=pgs.pp)
        return StepResult(loss=(total[0] / total[1]).item(), grad_norm=float(grad_norm))


def train(chunks: list[torch.nn.Module], config, pg_collection, tokens: torch.Tensor, *, steps: int,
          **trainer_options) -> list[StepResult]:
    """`steps` optimizer steps on the same global batch; each step's global loss and gradient norm."""
    trainer = Trainer(chunks, config, pg_collection, **trainer_options)
    return [trainer.step(tokens) for _ in range(steps)]
