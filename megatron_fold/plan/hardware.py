"""GPU presets for the planner. Each number comes from the vendor's public datasheet (named in `source`).

peak_tflops: dense BF16 tensor-core peak (no sparsity). nvlink_gbs: NVLink bandwidth per GPU per
direction (datasheets quote the bidirectional total; we halve it). network_gbs: per-GPU scale-out
bandwidth of the reference system's NIC (one 400 Gb/s NDR InfiniBand NIC per H100/H200/B200 GPU in DGX
systems, 200 Gb/s HDR per A100 in DGX A100), per direction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["GPUSpec", "GPUS", "get_gpu"]


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_tflops: float
    memory_gb: float
    nvlink_gbs: float
    network_gbs: float
    hbm_gbs: float  # memory bandwidth: elementwise work (permutation, activation, norms) is bound by it
    source: str = ""

    def with_overrides(self, **values) -> "GPUSpec":
        return replace(self, **{k: v for k, v in values.items() if v is not None})


GPUS: dict[str, GPUSpec] = {
    g.name: g
    for g in [
        GPUSpec("h100", peak_tflops=989.0, memory_gb=80.0, nvlink_gbs=450.0, network_gbs=50.0, hbm_gbs=3350.0,
                source="NVIDIA H100 Tensor Core GPU datasheet (SXM5); DGX H100: 8x ConnectX-7 400 Gb/s"),
        GPUSpec("h200", peak_tflops=989.0, memory_gb=141.0, nvlink_gbs=450.0, network_gbs=50.0, hbm_gbs=4800.0,
                source="NVIDIA H200 Tensor Core GPU datasheet (SXM); HGX H200: 400 Gb/s per GPU"),
        GPUSpec("a100", peak_tflops=312.0, memory_gb=80.0, nvlink_gbs=300.0, network_gbs=25.0, hbm_gbs=2039.0,
                source="NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB); DGX A100: 8x ConnectX-6 200 Gb/s"),
        GPUSpec("b200", peak_tflops=2250.0, memory_gb=180.0, nvlink_gbs=900.0, network_gbs=50.0, hbm_gbs=8000.0,
                source="NVIDIA DGX B200 datasheet (72 PFLOPS FP8 sparse / 8 GPUs -> 2.25 PFLOPS dense BF16, "
                       "1.44 TB HBM3e / 8, NVLink 5 1.8 TB/s); ConnectX-7 400 Gb/s per GPU"),
    ]
}


def get_gpu(name: str) -> GPUSpec:
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; presets: {', '.join(GPUS)} (override numbers with --peak-tflops, "
                         "--gpu-memory-gb, --nvlink-gbs, --network-gbs)") from None
