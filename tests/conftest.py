"""Heavy imports happen here, once, before any multi-rank test forks its ranks (see multirank.py)."""

import os
import warnings

# Multi-rank tests fork their ranks; torch's default CUDA check initialises CUDA in this process, after
# which no forked rank could use a GPU (MFOLD_TEST_DEVICE=cuda). The NVML-based check does not.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*absl.logging is not installed.*")

import torch  # noqa: E402,F401
import torch.distributed  # noqa: E402,F401
import megatron.core.parallel_state  # noqa: E402,F401
import megatron.core.transformer.moe.moe_layer  # noqa: E402,F401
import megatron.core.models.gpt  # noqa: E402,F401

import megatron_fold.parallel_state  # noqa: E402,F401

# Megatron-Core's own modules (shared experts, tensor-parallel linears, the upstream oracle) allocate
# on torch.cuda.current_device(); on a machine without CUDA the tests run them in CPU mode.
import megatron_fold.cpu  # noqa: E402

if not torch.cuda.is_available():
    megatron_fold.cpu.enable_cpu_mode()
