"""Checkpoints of a folded model with Megatron's dist_checkpointing: save under one layout, resume
under another.

Why dist_checkpointing and no format of ours: every parameter of a Megatron-Core model describes its
place in the whole model (ShardedTensor: global key, global shape, this rank's offsets), so a checkpoint
written under TP2 EP4 is read back under CP2 EP8 or PP2 with each rank taking its own slices; the
optimizer's state follows its parameters. That is how users change layout mid-training, and it is the
format Megatron-LM writes (`--ckpt-format torch_dist`), so checkpoints move between `megatron-fold
train` and pretrain_gpt.py.

What we add: the model shape is stored beside the tensors and compared before anything is read (a
checkpoint of another model fails with the differing fields, not with a missing-key error deep inside
dist_checkpointing); and a save is atomic: written to `<dir>.tmp`, renamed when every rank is done, so
an interrupted save never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model

__all__ = ["save", "load", "check_model_shape", "CheckpointMismatch", "MODEL_SHAPE_FIELDS"]

# TransformerConfig fields that fix the shapes of parameters (independent of the parallel layout).
MODEL_SHAPE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
    "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
    "gated_linear_unit", "normalization", "add_bias_linear", "add_qkv_bias", "moe_router_enable_expert_bias",
)


class CheckpointMismatch(ValueError):
    """The checkpoint holds another model (or none)."""


def _model_shape(config, vocab_size: int) -> dict:
    shape = {name: getattr(config, name) for name in MODEL_SHAPE_FIELDS}
    shape["vocab_size"] = vocab_size
    return shape


def _sharded_state_dict(model, optimizer, pg_collection, *, is_loading: bool) -> dict:
    metadata = {"dp_cp_group": pg_collection.dp_cp, "singleton_local_shards": False,
                "chained_optim_avoid_prefix": True}
    if optimizer is not None and _is_distributed_optimizer(optimizer):
        # Resharding the distributed optimizer's state to another DP size needs the fully reshardable form.
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
    # One entry per model chunk: the ShardedTensor keys are global (layer numbers include the pipeline
    # offset), so chunks of different pipeline / virtual-stage splits meet by key, not by position.
    # The bare models: Megatron's DDP wrapper would prefix every key with `module.`.
    state = {"model": {f"chunk{i}": chunk.sharded_state_dict(metadata=metadata)
                       for i, chunk in enumerate(unwrap_model(model))}}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _materialize_distributed_optimizer_state(optimizer) -> None:
    """torch's Adam creates its state (moments, step) on its first step. Megatron's distributed
    optimizer builds the template it loads into from that state, and without Transformer Engine or
    Apex it asserts a 'step' exists, so a fresh optimizer cannot be loaded into. Megatron's own remedy
    (used for its FSDP checkpoints) is a step on zero gradients: we run it; everything it touches,
    parameters included, is overwritten by the load that follows."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not any(inner.optimizer.state.values()):
            inner._init_optimizer_states_with_dummy_values()


@contextlib.contextmanager
def _step_kept_apart(optimizer):
    """Megatron-Core 0.19's distributed optimizer, loading fully reshardable state into torch's Adam
    (used without Transformer Engine or Apex), first sets every parameter's 'step' from the checkpoint,
    then copies per-parameter tensors for every state key the parameter holds, 'step' included, which
    the checkpoint's per-parameter tensors lack (KeyError: 'step'). The step is already right by then,
    so while each parameter's tensors are copied its 'step' is set aside and put back afterwards.
    Second, that step is one tensor shared by every parameter: each gets its own copy afterwards."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, DistributedOptimizer):
            continue
        original = inner._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, inner=inner, original=original):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            state = inner.optimizer.state[inner.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        inner._set_main_param_and_optimizer_states = set_states  # this instance only
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states
            # The same load hands every parameter ONE shared 'step' tensor, which torch's Adam then
            # increments once per parameter per step (wrong bias correction from the next step on).
            for state in inner.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()


def _write_results_in_process() -> None:
    """dist_checkpointing's writer collects its threads' results in a queue that it creates, on first
    use, through a *spawned* multiprocessing Manager: one more Python process per rank (about 0.4 GB
    and seconds of start-up on CPU ranks), which outlives ranks that exit without running atexit
    handlers. Our saves are synchronous, so the writer threads run in this process and a thread queue
    carries their results just as well."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save(directory: str, model: list, optimizer, pg_collection, *, config, vocab_size: int, extra: dict | None = None) -> None:
    """Write model (and optimizer) state under `directory`, collectively on every rank.

    `extra` (a picklable dict, e.g. the iteration and the layout) is stored as common state.
    Refuses a `directory` that already exists, rather than overwriting a checkpoint.
    """
    if os.path.exists(directory):
        raise FileExistsError(f"checkpoint directory {directory} already exists; choose a new one")
    tmp = directory.rstrip("/") + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save interrupted earlier
        os.makedirs(tmp)
    dist.barrier()
    _write_results_in_process()
    state = _sharded_state_dict(model, optimizer, pg_collection, is_loading=False)
    state["fold"] = {"model_shape": _model_shape(config, vocab_size), **(extra or {})}
    dist_checkpointing.save(state, tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        os.replace(tmp, directory)
    dist.barrier()


def check_model_shape(directory: str, config, vocab_size: int) -> dict:
    """Raise CheckpointMismatch unless `directory` is a checkpoint of a model of this shape; returns its
    common state. Reads no tensor (a cheap check before any rank starts)."""
    if not os.path.isdir(directory):
        raise CheckpointMismatch(f"no checkpoint at {directory}")
    common = dist_checkpointing.load_common_state_dict(directory)
    stored = (common or {}).get("fold", {}).get("model_shape")
    if stored is None:
        raise CheckpointMismatch(f"{directory} was not written by megatron_fold.checkpointing.save (no model shape)")
    wanted = _model_shape(config, vocab_size)
    differing = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
    if differing:
        detail = ", ".join(f"{k}: checkpoint {a!r}, model {b!r}" for k, (a, b) in differing.items())
        raise CheckpointMismatch(f"checkpoint {directory} holds another model ({detail})")
    return common


def load(directory: str, model: list, optimizer, pg_collection, *, config, vocab_size: int) -> dict:
    """Read a checkpoint written by `save` under any layout into `model` (and `optimizer`); returns its
    `extra` dict. Raises CheckpointMismatch, before reading any tensor, when the model shape differs."""
    common = check_model_shape(directory, config, vocab_size)
    if optimizer is not None:
        _materialize_distributed_optimizer_state(optimizer)
    state = _sharded_state_dict(model, optimizer, pg_collection, is_loading=True)
    loaded = dist_checkpointing.load(state, directory)
    for i, chunk in enumerate(unwrap_model(model)):
        chunk.load_state_dict(loaded["model"][f"chunk{i}"])
    if optimizer is not None:
        with _step_kept_apart(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    return {k: v for k, v in common["fold"].items() if k != "model_shape"}
