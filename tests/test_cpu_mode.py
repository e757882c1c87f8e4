"""CPU mode: on only without CUDA, and turning it off restores every patched attribute."""

import pytest
import torch
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer.moe import token_dispatcher

from megatron_fold import cpu


def _patched_now():
    return {
        "current_device": torch.cuda.current_device, "Stream": torch.cuda.Stream, "Event": torch.cuda.Event,
        "current_stream": torch.cuda.current_stream, "synchronize": torch.cuda.synchronize,
        "stream": torch.cuda.stream, "default_stream": torch.cuda.default_stream,
        "host_copy": token_dispatcher.maybe_move_tensor_to_cpu,
        "gather": mappings._gather_along_first_dim, "scatter": mappings._reduce_scatter_along_first_dim,
    }


def test_disable_restores_every_attribute():
    assert cpu.is_active()  # tests/conftest.py turns it on for this CPU-only machine
    active = _patched_now()
    cpu.disable_cpu_mode()
    try:
        original = _patched_now()
        assert all(active[k] is not original[k] for k in active)
        assert torch.cuda.Stream is torch.cuda.streams.Stream
        with cpu.cpu_mode():
            assert torch.cuda.current_device() == torch.device("cpu")
            # Megatron's allocation idiom now lands on the CPU.
            assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert _patched_now() == original
    finally:
        cpu.enable_cpu_mode()
    assert cpu.is_active() and torch.cuda.current_device() == torch.device("cpu")


def test_refuses_where_cuda_is_available(monkeypatch):
    cpu.disable_cpu_mode()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.raises(RuntimeError, match="CPU mode is for machines without CUDA"):
            cpu.enable_cpu_mode()
        assert not cpu.is_active()
    finally:
        monkeypatch.undo()
        cpu.enable_cpu_mode()


def test_host_copy_returns_numpy_for_split_sizes():
    splits = torch.tensor([1, 0, 3])
    out = token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True)
    assert out.tolist() == [1, 0, 3] and type(out).__module__ == "numpy"
