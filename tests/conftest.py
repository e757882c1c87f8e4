"""Heavy imports happen here, once, before any multi-rank test forks its ranks (see multirank.py)."""

import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*absl.logging is not installed.*")

import torch  # noqa: E402,F401
import torch.distributed  # noqa: E402,F401
import megatron.core.parallel_state  # noqa: E402,F401
import megatron.core.transformer.moe.moe_layer  # noqa: E402,F401
import megatron.core.models.gpt  # noqa: E402,F401

import megatron_fold.parallel_state  # noqa: E402,F401
