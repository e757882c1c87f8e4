"""CPU mode: Megatron-Core's own MoE and training code on CPU ranks with gloo.

Why: Megatron-Core's MoELayer is the oracle our tests compare FoldMoELayer with and the baseline of our
benchmark, and Megatron's DDP, optimizers, pipeline schedules and dist_checkpointing train whole models
in the CPU test tier and `megatron-fold train`. Their numerics are device-agnostic PyTorch, but they
reach for CUDA in a few places, and CPU mode answers exactly those the way a machine whose only device
is the CPU would (each patch in `_patches` says where Megatron makes the call):
  - torch.cuda.current_device() -> the CPU device, so `torch.empty(..., device=current_device())`
    allocates where the inputs live (Megatron uses the result only as an allocation device here);
  - torch.cuda.Stream / current_stream / synchronize -> one synchronous stream whose waits are always
    met, whose events are always complete (CPU work runs in issue order);
  - the alltoall dispatcher's device-to-host copy of split sizes -> the NumPy view the GPU path yields;
  - an uneven all-gather (gloo has none) -> an equal all-gather of zero-padded rows, padding cut;
  - `device="cuda"` literals in the training-path modules listed in _CUDA_LITERAL_MODULES (loss-scale,
    found-inf and grad-norm buffers, the default causal mask, the schedules' token counters) -> the
    CPU, through a `torch` seen by those modules only; Tensor.cuda() -> the tensor itself;
  - Tensor.type() -> the CUDA type name ('torch.cuda.FloatTensor'), which the optimizers dispatch on;
  - RoPE's CP chunk indices (pinned memory, then .cuda()) -> made on the embedding's device;
  - the RNG tracker -> portable.rng.CpuRNGStatesTracker (CPU generator states, same streams).
Nothing else changes: every kernel and collective Megatron runs is the one it would run, on CPU tensors.

Covered (tests/distributed/test_cpu_mode.py and test_whole_model.py prove it against single-rank
runs): MoELayer with the "allgather" and "alltoall" dispatchers (dropless, dropping, drop-and-pad),
TopKRouter with expert-bias buffers and aux / z losses, SequentialMLP experts, SharedExpertMLP,
Column/RowParallelLinear, the tensor-parallel mappings, GPTModel with RoPE, DistributedDataParallel,
the plain and distributed optimizers with gradient clipping, the 1F1B and interleaved pipeline
schedules, dist_checkpointing. Not covered: CUDA graphs, fused kernels, Transformer Engine, autocast.

Safety: `enable_cpu_mode()` RAISES (CpuModeRefused) where `torch.cuda.is_available()`, so it can never
alter a GPU run; code that runs on both kinds of machine enables it under
`if not torch.cuda.is_available()`. This is the one module of megatron_fold allowed to touch torch.cuda.
Modules Megatron builds while CPU mode is on hold its CPU streams and must also run with it on.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
import torch.distributed as dist

__all__ = ["enable_cpu_mode", "disable_cpu_mode", "cpu_mode", "is_active", "CpuModeRefused"]


class CpuModeRefused(RuntimeError):
    """CPU mode was asked for on a machine where CUDA is available."""


class _CompletedEvent:
    """A CUDA event on a synchronous device: the work it marks has always finished."""

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _CpuStream:
    """A CUDA stream on a synchronous device: work already runs in issue order, so every wait is met.

    torch.cpu.Stream would do, except that its record_event returns None and Megatron's alltoall
    dispatcher calls `.synchronize()` on what record_event returns.
    """

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CompletedEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


_THE_STREAM = _CpuStream()


def _current_device():
    """Megatron allocates with `device=torch.cuda.current_device()`; on this machine that is the CPU."""
    return torch.device("cpu")


def _current_stream(device=None):
    return _THE_STREAM


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """Replacement for moe_utils.maybe_move_tensor_to_cpu as the alltoall dispatcher calls it.

    On a GPU it copies device tensors to the host and returns NumPy arrays when asked, and the
    dispatcher passes those arrays to all_to_all_single as split sizes. The original leaves CPU
    tensors untouched, NumPy request included, and all_to_all_single rejects a tensor of split
    sizes. Here the host copy is the tensor itself, converted to NumPy exactly when the GPU path would.
    """
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _uneven_gather_patch():
    """gloo's all_gather needs equal sizes; NCCL's does not, and Megatron's alltoall dispatcher gathers
    uneven token counts over the expert-TP group (ETP > 1). Only that case, on gloo groups, goes through
    an equal all-gather of zero-padded rows, then the padding is cut: the same rows in the same order.
    The backward, an uneven reduce-scatter, stays native: gloo has it in the torch we test with."""
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or dist.get_backend(group) != "gloo":
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        if input_.shape[0] != sizes[group.rank()]:
            raise ValueError(f"uneven all-gather: this rank holds {input_.shape[0]} rows but "
                             f"output_split_sizes[{group.rank()}] = {sizes[group.rank()]} (sizes {sizes})")
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))  # [max rows, ...]
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((longest * len(sizes), *input_.shape[1:]))  # [ranks * max rows, ...]
        dist.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat([gathered[r * longest: r * longest + n] for r, n in enumerate(sizes)])

    return mappings, "_gather_along_first_dim", gather_along_first_dim


class _TorchWithCpuDevice(types.ModuleType):
    """`torch` as one Megatron module sees it in CPU mode: tensors it creates with `device="cuda"`
    are created on the CPU, and `pin_memory` (a host-to-GPU transfer optimisation) is dropped.
    Everything else is torch itself. Installed as the `torch` global of exactly the modules listed
    in _patches, so no other code sees it."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "as_tensor", "randn", "rand")

    def __init__(self):
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, self._on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _on_cpu(factory):
        @functools.wraps(factory)
        def create(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":
                kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
            return factory(*args, **kwargs)

        return create


_TORCH_ON_CPU = _TorchWithCpuDevice()

# Megatron-Core modules on the training path that create tensors with a literal device="cuda":
# loss-scale and found-inf buffers (optimizer.py), gradient-norm buffers (clip_grads.py, and the local
# l2-norm fallback in utils.py), the default causal mask (transformer/utils.py), token counters of the
# pipeline schedules (schedules.py), DDP's warm-up tensor (param_and_grad_buffer.py) and the
# distributed optimizer's buffers (distrib_optimizer.py).
_CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads", "megatron.core.utils",
    "megatron.core.transformer.utils", "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer", "megatron.core.optimizer.distrib_optimizer",
)


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """Megatron's rope_utils.get_pos_emb_on_this_cp_rank builds its two chunk indices in pinned memory
    and moves them with .cuda(); here they are made where the embedding lives. CP rank r keeps
    chunks r and 2*CP-1-r of 2*CP along `seq_dim` (Megatron's load-balanced order)."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp, r = cp_group.size(), cp_group.rank()
    chunks = torch.tensor([r, 2 * cp - 1 - r], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, chunks)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    """Tensor.type() as Megatron's optimizers test it: they choose fp32 or fp16/bf16 handling by the
    name 'torch.cuda.FloatTensor' / 'torch.cuda.BFloat16Tensor' and assert it on gradients
    (distrib_optimizer.py, optimizer.py, clip_grads.py). On a machine without CUDA every tensor is a
    CPU one, so the name given is its CUDA counterpart's. Conversions (`dtype` given) are untouched."""
    if dtype is not None:
        return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)
    name = _TENSOR_TYPE(self)
    return name if self.is_cuda or name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)


def _tensor_to_device(self, device=None, non_blocking=False, **kwargs):
    """Tensor.cuda(): the device is the CPU, where the tensor already is (the distributed optimizer's
    state gathering for checkpoints moves its shards with .cuda() before a collective)."""
    return self


def _synchronize(device=None):
    """torch.cuda.synchronize on a device whose work runs in issue order: nothing to wait for."""


def _patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, CPU replacement): each is a call on Megatron-Core's MoE or training path."""
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import token_dispatcher

    from megatron_fold.portable.rng import CpuRNGStatesTracker

    import importlib

    from megatron.core.models.common.embeddings import rotary_pos_embedding, yarn_rotary_pos_embedding

    literal_cuda = [(importlib.import_module(name), "torch", _TORCH_ON_CPU) for name in _CUDA_LITERAL_MODULES]
    return literal_cuda + [
        # RoPE under context parallelism: the chunk indices (imported by name into both modules).
        (rotary_pos_embedding, "get_pos_emb_on_this_cp_rank", _pos_emb_on_this_cp_rank),
        (yarn_rotary_pos_embedding, "get_pos_emb_on_this_cp_rank", _pos_emb_on_this_cp_rank),
        # The optimizers' dtype dispatch and gradient asserts on tensor.type().
        (torch.Tensor, "type", _cuda_type_name),
        # Explicit moves to "the" device (distrib_optimizer.py's checkpoint state gathering).
        (torch.Tensor, "cuda", _tensor_to_device),
        # Batched pipeline p2p synchronises the device after its sends and receives.
        (torch.cuda, "synchronize", _synchronize),
        # RNG streams (model_parallel_cuda_manual_seed, the forks in embedding, block and attention):
        # initialize_rng_tracker instantiates this class, so the tracker keeps CPU generator states.
        (tp_random, "CudaRNGStatesTracker", CpuRNGStatesTracker),
        # Allocations everywhere (router buffers, mappings' output buffers, linear layers' SP gathers).
        (torch.cuda, "current_device", _current_device),
        # Alltoall dispatcher: a DtoH side stream created in __init__; shared-expert overlap's stream.
        (torch.cuda, "Stream", _CpuStream),
        # Alltoall dispatcher's DtoH copy point and SharedExpertMLP's overlap compare and wait on it.
        # (`with torch.cuda.stream(s):` needs nothing: without a CUDA device torch makes it a no-op.)
        (torch.cuda, "current_stream", _current_stream),
        # Alltoall dispatcher's split sizes, copied to the host as NumPy (see _host_copy).
        (token_dispatcher, "maybe_move_tensor_to_cpu", _host_copy),
        # Alltoall dispatcher with ETP > 1: uneven all-gather of tokens over expert TP.
        _uneven_gather_patch(),
    ]


def _stream_caches():
    """Class attributes where Megatron caches a stream it created; they hold ours after CPU mode."""
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    return [(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream"), (SharedExpertMLP, "stream")]


def _forget_rng_tracker():
    """Megatron creates its RNG tracker once, on first use; make the next use create it anew (with the
    class in force then), so CUDA and CPU states never mix."""
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._CUDA_RNG_STATE_TRACKER = None
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


_saved: list[tuple[object, str, object]] = []
_INHERITED = object()


def is_active() -> bool:
    """Whether Megatron-Core's CUDA calls are currently answered on the CPU."""
    return bool(_saved)


def enable_cpu_mode() -> None:
    """Answer Megatron-Core's CUDA calls on the CPU; idempotent.

    Raises CpuModeRefused where CUDA is available: a GPU run must never see these stand-ins.
    """
    if torch.cuda.is_available():
        raise CpuModeRefused(
            "megatron_fold CPU mode is for machines without CUDA, but torch.cuda.is_available() is True "
            "here, so Megatron-Core must run its CUDA paths unchanged (enable CPU mode only under "
            "`if not torch.cuda.is_available()`)"
        )
    if _saved:
        return
    _forget_rng_tracker()  # one made before CPU mode holds CUDA states
    for owner, name, replacement in _patches():
        # A class attribute inherited from a base (Tensor.type lives on TensorBase) is deleted again
        # on restore rather than shadowed by a copy of the inherited one.
        own = name in vars(owner)
        _saved.append((owner, name, getattr(owner, name) if own else _INHERITED))
        setattr(owner, name, replacement)


def disable_cpu_mode() -> None:
    """Restore every patched attribute, and forget the CPU streams Megatron cached in class attributes
    (so a later CUDA-capable use creates real ones). A no-op when CPU mode is off."""
    was_active = bool(_saved)
    while _saved:
        owner, name, original = _saved.pop()
        if original is _INHERITED:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    if was_active:
        _forget_rng_tracker()
        for cls, attr in _stream_caches():
            if isinstance(getattr(cls, attr, None), _CpuStream):
                setattr(cls, attr, None)


@contextlib.contextmanager
def cpu_mode():
    """CPU mode for the duration of a block; leaves it as found (on stays on, off is restored)."""
    was_active = is_active()
    enable_cpu_mode()
    try:
        yield
    finally:
        if not was_active:
            disable_cpu_mode()
