"""CPU mode: lets Megatron-Core's own code (its MoE layer, dispatchers, shared experts, tensor-parallel
linears) run on CPU ranks with gloo, as the oracle of our tests and the baseline of our benchmark.

Megatron-Core allocates with `device=torch.cuda.current_device()`, creates CUDA streams and events,
and synchronises the device. Without CUDA those calls raise. CPU mode answers them the way a machine
whose only device is the CPU would: the current device is the CPU, streams and events are no-ops (CPU
work is synchronous, so every "wait" is already satisfied), synchronize returns at once. Nothing
numerical is patched: every kernel Megatron runs is the one it would run, on CPU tensors.

It refuses to turn on where CUDA is available, so it can never alter a GPU run. It is the one module of
megatron_fold allowed to touch torch.cuda.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["enable_cpu_mode", "disable_cpu_mode", "cpu_mode", "is_active"]


class _NullEvent:
    """torch.cuda.Event on a synchronous device: recorded work is always complete."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NullStream:
    """torch.cuda.Stream on a synchronous device: everything runs in issue order already."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


_NULL_STREAM = _NullStream()

# (object, attribute, CPU replacement). Each entry is a call Megatron-Core makes on its MoE path.
_REPLACEMENTS = [
    # Allocations: torch.empty(..., device=torch.cuda.current_device()) -> on the CPU.
    (torch.cuda, "current_device", lambda: torch.device("cpu")),
    # Streams and events (dispatchers' D2H copies, shared-expert overlap, delayed wgrad).
    (torch.cuda, "Stream", _NullStream),
    (torch.cuda, "Event", _NullEvent),
    (torch.cuda, "current_stream", lambda device=None: _NULL_STREAM),
    (torch.cuda, "default_stream", lambda device=None: _NULL_STREAM),
    (torch.cuda, "stream", lambda stream=None: contextlib.nullcontext()),
    (torch.cuda, "synchronize", lambda device=None: None),
]



def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """Megatron's maybe_move_tensor_to_cpu returns a CPU tensor unchanged even when asked for NumPy
    (it only converts device tensors); its alltoall dispatcher then hands a tensor, not a list, to
    all_to_all_single as split sizes. On the CPU, the host copy is the tensor itself."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _uneven_collectives(mappings):
    """gloo has no uneven all-gather or reduce-scatter (NCCL does); Megatron's alltoall dispatcher
    needs both over ETP. Route only the uneven case through our all-to-all based equivalents."""
    from megatron_fold.comm import all_gather_rows, reduce_scatter_rows

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        return all_gather_rows([input_.contiguous()], list(output_split_sizes), group)[0]

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        return reduce_scatter_rows([input_.contiguous()], list(input_split_sizes), group)[0]

    return [(mappings, "_gather_along_first_dim", gather_along_first_dim),
            (mappings, "_reduce_scatter_along_first_dim", reduce_scatter_along_first_dim)]


def _megatron_replacements():
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import token_dispatcher

    return [(token_dispatcher, "maybe_move_tensor_to_cpu", _host_copy)] + _uneven_collectives(mappings)


_saved: list[tuple[object, str, object]] = []


def is_active() -> bool:
    return bool(_saved)


def enable_cpu_mode() -> None:
    """Patch the CUDA entry points Megatron-Core calls; idempotent. Raises where CUDA is available."""
    if torch.cuda.is_available():
        raise RuntimeError("megatron_fold CPU mode is for machines without CUDA; this one has a GPU, so "
                           "Megatron-Core's CUDA paths must run unchanged")
    if _saved:
        return
    for obj, name, replacement in _REPLACEMENTS + _megatron_replacements():
        _saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, replacement)


def disable_cpu_mode() -> None:
    """Restore every patched attribute."""
    while _saved:
        obj, name, original = _saved.pop()
        setattr(obj, name, original)


@contextlib.contextmanager
def cpu_mode():
    was_active = is_active()
    enable_cpu_mode()
    try:
        yield
    finally:
        if not was_active:
            disable_cpu_mode()
