"""CPU mode: Megatron-Core's own MoE code on CPU ranks with gloo.

Why: Megatron-Core's MoELayer is the oracle our tests compare FoldMoELayer with and the baseline of our
benchmark, so it has to run where our CPU test tier runs. Its numerics are device-agnostic PyTorch, but
it reaches for CUDA in a few places, and CPU mode answers exactly those the way a machine whose only
device is the CPU would (each patch in `_patches` says where Megatron makes the call):
  - torch.cuda.current_device() -> the CPU device, so `torch.empty(..., device=current_device())`
    allocates where the inputs live (Megatron uses the result only as an allocation device here);
  - torch.cuda.Stream / current_stream -> one synchronous stream whose waits are always met, whose
    events are always complete (CPU work runs in issue order);
  - the alltoall dispatcher's device-to-host copy of split sizes -> the NumPy view the GPU path yields;
  - an uneven all-gather (gloo has none) -> an equal all-gather of zero-padded rows, padding cut.
Nothing else changes: every kernel and collective Megatron runs is the one it would run, on CPU tensors.

Covered (tests/distributed/test_cpu_mode.py proves it against single-rank runs): MoELayer with the
"allgather" and "alltoall" dispatchers (dropless, dropping, drop-and-pad), TopKRouter with expert-bias
buffers and aux / z losses, SequentialMLP experts (plain and gated), SharedExpertMLP (gated, and
overlapped with the dispatcher), Column/RowParallelLinear with `is_expert`, the tensor-parallel
mappings. Not covered: CUDA RNG trackers (`get_cuda_rng_tracker().fork()`; build layers with
`use_cpu_initialization=True`), CUDA graphs, fused permute / router kernels, Transformer Engine.

Safety: `enable_cpu_mode()` RAISES (CpuModeRefused) where `torch.cuda.is_available()`, so it can never
alter a GPU run; code that runs on both kinds of machine enables it under
`if not torch.cuda.is_available()`. This is the one module of megatron_fold allowed to touch torch.cuda.
Modules Megatron builds while CPU mode is on hold its CPU streams and must also run with it on.
"""

from __future__ import annotations

import contextlib

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


def _patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, CPU replacement): each is a call on Megatron-Core's MoE path."""
    from megatron.core.transformer.moe import token_dispatcher

    return [
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


_saved: list[tuple[object, str, object]] = []


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
    for owner, name, replacement in _patches():
        _saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)


def disable_cpu_mode() -> None:
    """Restore every patched attribute, and forget the CPU streams Megatron cached in class attributes
    (so a later CUDA-capable use creates real ones). A no-op when CPU mode is off."""
    was_active = bool(_saved)
    while _saved:
        owner, name, original = _saved.pop()
        setattr(owner, name, original)
    if was_active:
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
