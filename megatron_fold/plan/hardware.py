"""GPU presets for the planner: the shipped profiles (`profiles/*.json`, schema and sources in
profile.py), by name. Each number of a preset names its source in the profile's `sources`; datasheet
numbers (peak, memory, SMs) and kernel / interconnect measurements (GEMM ceiling, attention, NCCL
bandwidths) are kept apart there.
"""

from __future__ import annotations

from megatron_fold.plan.profile import Profile, shipped_profiles

__all__ = ["GPUSpec", "GPUS", "get_gpu"]

GPUSpec = Profile  # the planner's hardware description is a profile
GPUS: dict[str, Profile] = shipped_profiles()


def get_gpu(name: str) -> Profile:
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; presets: {', '.join(GPUS)} (override numbers with --peak-tflops, "
                         "--gpu-memory-gb, --nvlink-gbs, --network-gbs, --hbm-gbs, or measure a profile with "
                         "`megatron-fold calibrate` and pass --profile)") from None
