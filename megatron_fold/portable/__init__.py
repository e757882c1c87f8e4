"""CPU counterparts of the dense pieces Transformer Engine provides on GPUs.

Megatron-Core's local (non-TE) modules cannot run the layouts folding is for: its torch norm refuses
sequence parallelism (needed by MoE with TP > 1), its local attention refuses context parallelism, and
its RNG tracker is CUDA-only. This package holds the replacements:

  norm.py       SequenceParallelNorm: torch LayerNorm / RMSNorm, parameters tagged sequence_parallel
  attention.py  ContextParallelDotProductAttention: CP by all-gathering K/V, position-based causal mask
  rng.py        CpuRNGStatesTracker: Megatron's RNG tracker on CPU generator states (cpu.py installs it)

`adapt_spec(spec)` swaps the first two into a Megatron spec (layer, block or MoE builder) and leaves
everything else as Megatron built it; Megatron's globals are never touched. A spec built for
Transformer Engine contains neither class and comes back unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_fold.portable.attention import ContextParallelDotProductAttention
from megatron_fold.portable.norm import SequenceParallelNorm

__all__ = ["adapt_spec", "SequenceParallelNorm", "ContextParallelDotProductAttention", "REPLACEMENTS"]

# Megatron's local module -> ours. Exact classes only: a subclass someone wrote on purpose stays.
REPLACEMENTS = {
    WrappedTorchNorm: SequenceParallelNorm,
    DotProductAttention: ContextParallelDotProductAttention,
}


def adapt_spec(spec):
    """A copy of `spec` with Megatron's local norm and attention replaced by the portable ones.

    Walks ModuleSpecs, submodule dataclasses (TransformerBlockSubmodules, SelfAttentionSubmodules, ...),
    lists and functools.partial builders (Megatron's MoE spec is one); the original is not modified.
    """
    return _swap(spec)


def _swap(obj):
    if isinstance(obj, type):
        return REPLACEMENTS.get(obj, obj)
    if isinstance(obj, ModuleSpec):
        new = copy.copy(obj)
        new.module = _swap(obj.module)
        new.submodules = _swap(obj.submodules)
        new.params = {k: _swap(v) for k, v in obj.params.items()}
        return new
    if isinstance(obj, functools.partial):
        return functools.partial(_swap(obj.func), *(_swap(a) for a in obj.args),
                                 **{k: _swap(v) for k, v in obj.keywords.items()})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap(x) for x in obj)
    if dataclasses.is_dataclass(obj):
        new = copy.copy(obj)
        for field in dataclasses.fields(obj):
            setattr(new, field.name, _swap(getattr(obj, field.name)))
        return new
    return obj
