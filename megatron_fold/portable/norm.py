"""A LayerNorm / RMSNorm that works with sequence parallelism, for machines without Transformer Engine.

Megatron-Core's torch fallback (`WrappedTorchNorm`) refuses `sequence_parallel=True`, and MoE with
TP > 1 requires sequence parallelism. The computation itself does not care: a norm is per token, so
each rank normalises its own sequence slice. What sequence parallelism adds is bookkeeping: the norm's
weight (and bias) is replicated over TP but each TP rank sees different tokens, so its gradient must
be summed over TP. Megatron's `finalize_model_grads` does that for every parameter tagged
`sequence_parallel = True`; TE's norms carry the tag, and so do ours. Without the tag the TP ranks'
norm weights drift apart silently (tests/distributed/test_whole_model.py has that control).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["SequenceParallelNorm"]


class SequenceParallelNorm:
    """Builder with WrappedTorchNorm's signature: returns torch's LayerNorm or RMSNorm (by
    `config.normalization`), its parameters tagged for Megatron's sequence-parallel gradient sum."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        unsupported = [name for name in ("layernorm_zero_centered_gamma", "persist_layer_norm",
                                         "memory_efficient_layer_norm") if getattr(config, name, False)]
        if unsupported:
            raise ValueError(f"the portable norm (used without Transformer Engine) does not implement "
                             f"{', '.join(f'{n}=True' for n in unsupported)}; set them to False or install "
                             "Transformer Engine")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"the portable norm supports normalization 'LayerNorm' and 'RMSNorm', got "
                             f"{config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
