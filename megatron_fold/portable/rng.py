"""Megatron's model-parallel RNG tracker on the CPU generator.

Megatron keeps named RNG streams (the "model-parallel-rng" stream differs per TP rank, so dropout
on sequence-parallel activations draws different masks on different slices) and enters them with
`get_cuda_rng_tracker().fork()` in the embedding, the transformer block and attention. Its tracker
stores CUDA generator states, so those forks fail on a machine without CUDA even at dropout 0. This
one stores CPU generator states with the same semantics: `add(name, seed)` creates a stream, `fork`
swaps it in and saves where it got to. `megatron_fold.cpu` installs it as Megatron's tracker in CPU
mode only; on a GPU Megatron's own tracker runs unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel.random import _MODEL_PARALLEL_RNG_TRACKER_NAME, CudaRNGStatesTracker

__all__ = ["CpuRNGStatesTracker"]


class CpuRNGStatesTracker(CudaRNGStatesTracker):
    """CudaRNGStatesTracker whose states are CPU generator states (torch.get_rng_state)."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked (streams: {sorted(self.states_)})")
        if name in self.states_:
            raise ValueError(f"RNG stream {name!r} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=_MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise ValueError(f"RNG stream {name!r} was never added (streams: {sorted(self.states_)}); "
                             "call megatron.core.tensor_parallel.model_parallel_cuda_manual_seed(seed) first")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(self.states_[outer_name] if outer_name != "default-rng" else outer_state)
            self._current_state_name = outer_name
