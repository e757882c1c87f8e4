"""Count the kernels and the data-movement copies a piece of code launches, on any device.

Why: the dispatcher's cost beyond its GEMMs and collectives is the kernels it launches (each a launch
latency on a GPU) and the copies it makes (each a full read and write of the rows at HBM bandwidth).
A CPU run cannot time a GPU's launches or its bandwidth, but it can count them: every ATen op that
reaches the dispatcher would be one kernel launch on a GPU (one or a few; fused kernels count once),
except those that only make a view or allocate memory. `OpCounter` is a TorchDispatchMode, so it sees
the ops below autograd, after every composite op has been split into the ops that really run, and the
ops of a backward run while it is active (the autograd engine carries the mode stack to the thread
that runs the backward).

- kernels: every op but views (`OpOverload.is_view`, and `ALIASING` below), allocations (`NO_KERNEL`)
  and collectives (namespace c10d: counted apart, by the caller's collective counter);
- copies: the kernels in `COPIES`, ops that only move values (no arithmetic), and the bytes their
  outputs hold (what they write). Small index bookkeeping counts too; the bytes say which copies move
  activations.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["OpCounter", "COPIES", "NO_KERNEL"]

# Allocations and metadata: no kernel runs (an allocation is the caching allocator's bookkeeping).
NO_KERNEL = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "set_", "resize_",
                       "lift_fresh", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "is_same_size",
                       "_has_compatible_shallow_copy_type", "record_stream"})
# Views that ATen does not flag as such (they alias their input: no kernel).
ALIASING = frozenset({"detach", "detach_", "alias", "_reshape_alias", "_unsafe_view", "view", "as_strided"})
# Ops that only move values: each writes its output once and reads its input.
COPIES = frozenset({"copy_", "_to_copy", "clone", "cat", "stack", "index_select", "gather", "scatter", "scatter_",
                    "index_copy", "index_copy_", "index_put", "index_put_", "index", "_unsafe_index", "masked_scatter",
                    "masked_scatter_", "repeat", "expand_copy", "permute_copy", "transpose_copy", "slice_scatter",
                    "select_scatter", "narrow_copy", "split_with_sizes_copy", "constant_pad_nd", "flip", "roll",
                    "_unsafe_index_put"})


def _out_bytes(out) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))


class OpCounter(TorchDispatchMode):
    """Kernels, copies and copied bytes of the ops run while active (`ops` counts every kernel by name)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.copies = 0
        self.copy_bytes = 0

    @property
    def kernels(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.namespace == "c10d" or func.is_view or name in ALIASING or name in NO_KERNEL:
            return out
        self.ops[name] += 1
        if name in COPIES:
            self.copies += 1
            # An in-place copy writes its destination (the first argument); the others, their output.
            self.copy_bytes += _out_bytes(args[0] if name.endswith("_") else out)
        return out
