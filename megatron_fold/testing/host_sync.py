"""Count the host-device synchronisation points a piece of GPU code would hit, on a CPU machine.

Why: no GPU is needed to know where the host must wait for the device. A read of a device tensor's
value in Python (`.item()`, `.tolist()`, `bool(t)`, `int(t)`), an op whose output size depends on
device data (`nonzero`, `masked_select`, boolean indexing, `unique`, ...), a blocking device-to-host
copy, and an explicit stream / event / device `synchronize` each stall the CPU until the GPU has
caught up. On a CPU every such point is free, so a CPU run cannot time them, but it can count them:
`HostSyncCounter` is a TorchFunctionMode that sees every tensor op and records those points.

Which tensors would live on the device: everything, except what the code itself puts on the host.
Host tensors are tagged as they are made, while the mode is active (`counting=False` tags without
counting, e.g. while a layer is built):
- results of a factory (`torch.tensor`, `torch.full`, `torch.arange`, ...) without a `device`, or with
  the device given as the string "cpu" (on a GPU machine both are host tensors; a `torch.device`
  object is taken for the model's device, which is what code like `device=x.device` means there);
- `.cpu()`, `.to("cpu")`, and Megatron's `maybe_move_tensor_to_cpu` (a non-blocking copy, not a
  sync: the alltoall dispatcher waits for it at an event, which is counted instead);
- results of ops whose tensor inputs are all host tensors.
Tensors made outside the mode (inputs, weights) and parameters count as device tensors.

Collectives are not counted themselves: on NCCL they are queued on the device like kernels; what
makes the host wait is a Python read of their result, which is counted where it happens.
Backward: run it with `HostSyncCounter.backward` so that the mode sees the autograd functions' ops
(Tensor.backward would run them with the mode switched off).
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["HostSyncCounter", "SyncPoint"]

_HOST_ATTR = "_megatron_fold_host_resident"


def _is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and getattr(t, _HOST_ATTR, False)


def _tag_host(value) -> None:
    for t in tree_flatten(value)[0]:
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            setattr(t, _HOST_ATTR, True)


# Reads of a device tensor's value into Python.
_VALUE_READS = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__bool__: "bool",
                torch.Tensor.__int__: "int", torch.Tensor.__float__: "float", torch.Tensor.__index__: "index",
                torch.Tensor.numpy: "numpy", torch.Tensor.__repr__: "repr", torch.Tensor.__format__: "format"}
# Ops whose output size depends on device data (the host must learn it before allocating).
_DATA_DEPENDENT = {torch.nonzero: "nonzero", torch.Tensor.nonzero: "nonzero", torch.argwhere: "argwhere",
                   torch.Tensor.argwhere: "argwhere", torch.masked_select: "masked_select",
                   torch.Tensor.masked_select: "masked_select", torch.unique: "unique", torch.Tensor.unique: "unique",
                   torch.unique_consecutive: "unique_consecutive", torch.bincount: "bincount",
                   torch.Tensor.bincount: "bincount"}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.full, torch.zeros, torch.ones, torch.empty, torch.arange,
              torch.randn, torch.rand, torch.randint, torch.linspace, torch.eye, torch.randperm}


def _names_cpu_string(device) -> bool:
    return isinstance(device, str) and device.split(":")[0] == "cpu"


@dataclass(frozen=True)
class SyncPoint:
    kind: str                   # e.g. "item", "tolist", "event.synchronize", "nonzero"
    where: str                  # file:line of the innermost frame in megatron / megatron_fold code
    functions: tuple[str, ...]  # the megatron / megatron_fold functions on the stack, outermost first


class HostSyncCounter(TorchFunctionMode):
    """Records host-device synchronisation points while active and `counting` is True."""

    def __init__(self, counting: bool = True):
        super().__init__()
        self.counting = counting
        self.points: list[SyncPoint] = []

    @property
    def count(self) -> int:
        return len(self.points)

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.points:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def record(self, kind: str) -> None:
        if self.counting:
            self.points.append(SyncPoint(kind, *_caller()))

    # ---- the mode ------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args else None
        if func in _VALUE_READS:
            if isinstance(source, torch.Tensor) and not _is_host(source):
                self.record(_VALUE_READS[func])
            return func(*args, **kwargs)
        if func in _DATA_DEPENDENT:
            if not all(_is_host(t) for t in _tensors(args, kwargs)):
                self.record(_DATA_DEPENDENT[func])
        elif func is torch.Tensor.__getitem__ and _bool_index(args[1] if len(args) > 1 else None):
            if not _is_host(source):
                self.record("boolean_index")
        elif func is torch.where and len(args) + len(kwargs) == 1 and not _is_host(source):
            self.record("where(condition)")
        elif func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and "output_size" not in kwargs \
                and any(isinstance(a, torch.Tensor) and not _is_host(a) for a in args[:2]):
            self.record("repeat_interleave")
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and _to_host(args, kwargs)):
            # A device-to-host copy: blocking unless asked otherwise. On this CPU machine the "copy" would be
            # the tensor itself; return a real copy so that tagging it leaves the device tensor untouched.
            if not _is_host(source) and not kwargs.get("non_blocking", False):
                self.record("blocking_copy_to_host")
            out = source.clone()
            _tag_host(out)
            return out
        out = func(*args, **kwargs)
        self._tag(func, args, kwargs, out)
        return out

    def _tag(self, func, args, kwargs, out) -> None:
        inputs = _tensors(args, kwargs)
        if inputs:
            host = all(_is_host(t) for t in inputs)
        elif func in _FACTORIES or getattr(func, "__name__", "").endswith(("_like", "_tensor")):
            device = kwargs.get("device")
            host = device is None or _names_cpu_string(device)
        else:
            return
        if host:
            ids = {id(t) for t in inputs}
            _tag_host([t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and id(t) not in ids])

    # ---- what the mode cannot see by itself ---------------------------------------------------------
    @contextlib.contextmanager
    def watching(self, *patch_targets):
        """Activate the mode and count explicit synchronisations: torch.cuda.synchronize and the
        synchronize of CPU mode's stream and event stand-ins (megatron_fold.cpu), and make Megatron's
        `maybe_move_tensor_to_cpu` a tagged, uncounted host copy (it is a non-blocking copy)."""
        from megatron.core.transformer.moe import token_dispatcher

        from megatron_fold import cpu

        counter = self
        saved = []

        def patch(owner, name, replacement):
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, replacement)

        def counted(kind, original):
            def sync(*args, **kwargs):
                counter.record(kind)
                return original(*args, **kwargs)
            return sync

        def host_copy(tensor, as_numpy=False, record_stream=False):
            if not torch.is_tensor(tensor):
                return tensor
            copy = tensor.detach().clone()
            _tag_host(copy)
            return copy.numpy() if as_numpy else copy

        patch(torch.cuda, "synchronize", counted("device.synchronize", torch.cuda.synchronize))
        patch(cpu._CompletedEvent, "synchronize", counted("event.synchronize", cpu._CompletedEvent.synchronize))
        patch(cpu._CpuStream, "synchronize", counted("stream.synchronize", cpu._CpuStream.synchronize))
        patch(token_dispatcher, "maybe_move_tensor_to_cpu", host_copy)
        try:
            with self:
                yield self
        finally:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        """loss.backward() with the autograd functions' ops visible to an active mode."""
        from torch.autograd.graph import _engine_run_backward

        _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                             allow_unreachable=True, accumulate_grad=True)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _to_host(args, kwargs) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return _names_cpu_string(target)


def _caller() -> tuple[str, tuple[str, ...]]:
    """(file:line of the innermost frame in megatron or megatron_fold code, where the sync is written;
    the names of all such frames' functions, outermost first)."""
    frames = [f for f in traceback.extract_stack()[:-3]
              if "megatron" in f.filename and "testing/host_sync" not in f.filename]
    if not frames:
        return "?", ()
    last = frames[-1]
    return f"{last.filename.split('site-packages/')[-1]}:{last.lineno}", tuple(f.name for f in frames)
