"""`megatron-fold calibrate`: measure this machine's kernels and links and write a profile (profile.py).

Kernel-level micro-benchmarks only, never a training step: bf16 GEMMs and grouped GEMMs over a grid of
shapes, a device copy (HBM bandwidth), causal attention by block length, a host synchronisation, and, when started under
torchrun or Slurm with more than one rank, NCCL (gloo on CPU) all-gather, reduce-scatter and
all-to-all bus bandwidth. From those points it sets the profile's constants:
- gemm_max_efficiency: the best dense GEMM's TFLOP/s over the peak (the MAMF idea);
- grouped_gemm_factor: the median ratio of measured grouped-GEMM time to the dense GEMM model's
  (terms.gemm_time) at the same shapes;
- hbm_gbs, attention (TFLOP/s by block length), nvlink_gbs or network_gbs: measured directly;
  intra- or inter-node is decided by LOCAL_WORLD_SIZE (or SLURM_NTASKS_PER_NODE) against WORLD_SIZE.
Numbers it does not measure (a single process measures no collective) come from `--base` and are
marked as such in `sources`. Imports torch; the planner itself does not.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time

__all__ = ["GRIDS", "calibrate", "add_arguments", "run"]

# (gemm m, n, k) shapes, grouped (rows per expert, experts, hidden, width), attention block lengths,
# copy and collective sizes (bytes), timing repetitions.
GRIDS = {
    "tiny": dict(gemm=[(64, 128, 128), (256, 256, 256), (512, 512, 512)], grouped=[(32, 4, 128, 64), (128, 4, 128, 64)],
                 attention=[64, 128], copy_bytes=2**22, comm_bytes=2**18, reps=2),
    "default": dict(gemm=[(m, n, k) for m in (128, 512, 2048, 8192) for n, k in ((4096, 4096), (8192, 8192), (16384, 6144))],
                    grouped=[(m, e, 6144, w) for m in (64, 256, 1024, 4096) for e, w in ((8, 16384), (16, 2048), (64, 1536))],
                    attention=[512, 1024, 2048, 4096, 8192, 16384], copy_bytes=2**30, comm_bytes=2**28, reps=10),
}


def _timer(device: str):
    import torch

    def timed(fn, reps: int) -> float:
        fn()  # warm-up (allocation, kernel selection)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps
    return timed


def _grouped(xs, ws):
    import torch

    return [torch.matmul(x, w) for x, w in zip(xs, ws)]


def measure_kernels(device: str, grid: dict) -> dict:
    """Raw points: GEMM and grouped-GEMM seconds by shape, copy GB/s, attention TFLOP/s by block."""
    import torch
    import torch.nn.functional as F

    timed, dt = _timer(device), torch.bfloat16
    out = {"gemm": [], "grouped": [], "attention": []}
    for m, n, k in grid["gemm"]:
        a, b = torch.randn(m, k, device=device, dtype=dt), torch.randn(k, n, device=device, dtype=dt)
        out["gemm"].append({"m": m, "n": n, "k": k, "seconds": timed(lambda: torch.matmul(a, b), grid["reps"])})
    for rows, experts, hidden, width in grid["grouped"]:
        xs = [torch.randn(rows, hidden, device=device, dtype=dt) for _ in range(experts)]
        ws = [torch.randn(hidden, width, device=device, dtype=dt) for _ in range(experts)]
        out["grouped"].append({"rows": rows, "experts": experts, "hidden": hidden, "width": width,
                               "seconds": timed(lambda: _grouped(xs, ws), grid["reps"])})
    src = torch.empty(grid["copy_bytes"] // 2, device=device, dtype=dt)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), grid["reps"])
    out["copy_gbs"] = 2 * grid["copy_bytes"] / copy_s / 1e9  # read + write
    heads, head_dim = 8, 64 if device == "cpu" else 128
    for chunk in grid["attention"]:
        q, k_, v = (torch.randn(1, heads, chunk, head_dim, device=device, dtype=dt) for _ in range(3))
        s = timed(lambda: F.scaled_dot_product_attention(q, k_, v, is_causal=True), grid["reps"])
        flops = 2 * chunk * chunk * heads * head_dim  # causal: half of 4*s^2*h*d
        out["attention"].append({"chunk": chunk, "tflops": flops / s / 1e12})
    # Host synchronisation: a one-element kernel followed by reading its result on the host, against
    # the same kernel queued without reading; the difference is what each sync leaves the GPU idle.
    x = torch.zeros(1, device=device)
    reps = 20 * grid["reps"]
    synced = timed(lambda: x.add_(1).item(), reps)
    queued = timed(lambda: x.add_(1), reps)
    out["host_sync_us"] = max(synced - queued, 1e-9) * 1e6  # positive even where it is below the noise (CPU)
    return out


def measure_collectives(device: str, nbytes: int, reps: int) -> dict | None:
    """Bus bandwidth (nccl-tests convention) of all-gather, reduce-scatter and all-to-all over every rank
    of the initialised default group, or None with one rank. gloo lacks reduce-scatter: it is then
    measured as an all-reduce's bus bandwidth."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    n, timed = dist.get_world_size(), _timer(device)
    per_rank = max(1, nbytes // 4 // n)
    chunk = torch.ones(per_rank, device=device)
    full = torch.ones(per_rank * n, device=device)
    gathered = [torch.empty_like(chunk) for _ in range(n)]
    out = {}
    ag = timed(lambda: dist.all_gather(gathered, chunk), reps)
    out["all_gather_gbs"] = (n - 1) * per_rank * 4 / ag / 1e9
    if dist.get_backend() == "gloo":
        ar = timed(lambda: dist.all_reduce(full), reps)
        out["reduce_scatter_gbs"] = (n - 1) * per_rank * 4 / (ar / 2) / 1e9  # all-reduce = RS + AG
    else:
        rs = timed(lambda: dist.reduce_scatter_tensor(chunk, full), reps)
        out["reduce_scatter_gbs"] = (n - 1) * per_rank * 4 / rs / 1e9
    recv = torch.empty_like(full)
    try:
        a2a = timed(lambda: dist.all_to_all_single(recv, full), reps)
        out["all_to_all_gbs"] = (n - 1) * per_rank * 4 / a2a / 1e9
    except RuntimeError:  # a backend without all-to-all
        pass
    small = torch.ones(1, device=device)
    out["latency_us"] = timed(lambda: dist.all_reduce(small), reps) * 1e6
    # Every rank must agree on one profile: the slowest rank's numbers.
    vals = torch.tensor([out.get(k, float("inf")) for k in ("all_gather_gbs", "reduce_scatter_gbs", "all_to_all_gbs")]
                        + [-out["latency_us"]], device=device)
    dist.all_reduce(vals, op=dist.ReduceOp.MIN)
    keys = ("all_gather_gbs", "reduce_scatter_gbs", "all_to_all_gbs")
    out = {k: float(v) for k, v in zip(keys, vals[:3].tolist()) if v != float("inf")}
    out["latency_us"] = -float(vals[3])
    out["ranks"] = n
    return out


def _intra_node() -> bool:
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", str(world))))
    return local >= world


def calibrate(device: str, grid_name: str, base_name: str, name: str | None = None,
              peak_tflops: float | None = None):
    """Measure and build a Profile (not saved). The peak is the datasheet's: `peak_tflops`, else the
    base preset's on a GPU; a CPU has no datasheet BF16 peak here, so its best measured GEMM is the peak."""
    import dataclasses

    import torch

    from megatron_fold.plan.hardware import get_gpu
    from megatron_fold.plan.terms import gemm_time

    grid = GRIDS[grid_name]
    base = get_gpu(base_name)
    raw = measure_kernels(device, grid)
    comm = measure_collectives(device, grid["comm_bytes"], grid["reps"])
    best = max(2 * g["m"] * g["n"] * g["k"] / g["seconds"] for g in raw["gemm"]) / 1e12
    on_cpu = device == "cpu"
    peak = peak_tflops or (best if on_cpu else base.peak_tflops)
    where = (torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU")
    stamp = f"measured by megatron-fold calibrate on {where}, {datetime.date.today().isoformat()}"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.startswith("cuda") else base.sms
    prof = dataclasses.replace(base, name=name or f"calibrated-{base_name}-{device}", peak_tflops=peak,
                               sms=sms, gemm_max_efficiency=min(1.0, best / peak),
                               hbm_gbs=raw["copy_gbs"], grouped_gemm_factor=1.0, host_sync_us=raw["host_sync_us"],
                               attention=tuple((float(a["chunk"]), a["tflops"]) for a in raw["attention"]))
    # grouped_gemm_factor: measured grouped time vs the dense model's at the same shapes, with the
    # profile's own measured ceiling and bandwidth.
    ratios = [gemm_time(g["rows"], g["width"], g["hidden"], prof, g["experts"]) / g["seconds"] for g in raw["grouped"]]
    prof = dataclasses.replace(prof, grouped_gemm_factor=statistics.median(ratios))
    sources = {k: f"from the base preset {base_name}: " + v for k, v in base.sources.items()}
    sources |= {k: stamp for k in ("gemm_max_efficiency", "grouped_gemm_factor", "hbm_gbs", "attention", "host_sync_us")}
    sources["peak_tflops"] = (f"{stamp}: best GEMM (a CPU has no datasheet BF16 peak here)" if on_cpu and not peak_tflops
                              else sources["peak_tflops"] if not peak_tflops else "given with --peak-tflops")
    if device.startswith("cuda"):
        sources["sms"] = stamp
    if comm:
        link = "nvlink_gbs" if _intra_node() else "network_gbs"
        bw = min(v for k, v in comm.items() if k.endswith("_gbs"))
        prof = dataclasses.replace(prof, collective_latency_us=comm["latency_us"], **{link: bw})
        sources[link] = f"{stamp}: slowest of all-gather / reduce-scatter / all-to-all bus bandwidth over {comm['ranks']} ranks"
        sources["collective_latency_us"] = f"{stamp}: one small all-reduce"
    return dataclasses.replace(prof, sources=sources, measured={"device": where, "grid": grid_name, **raw,
                                                                "collectives": comm})


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="profile file to write (JSON)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--grid", choices=tuple(GRIDS), default="default", help="shapes to measure (tiny: for tests)")
    p.add_argument("--base", default="h100", help="preset whose numbers fill what is not measured")
    p.add_argument("--name", help="the profile's name")
    p.add_argument("--peak-tflops", type=float, help="the device's dense BF16 datasheet peak")


def run(args) -> int:
    import torch
    import torch.distributed as dist

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ValueError(f"--peak-tflops must be positive, got {args.peak_tflops:g}")
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        started = True
    try:
        prof = calibrate(device, args.grid, args.base, args.name, args.peak_tflops)
        if not dist.is_initialized() or dist.get_rank() == 0:
            prof.save(args.out)
            print(f"wrote {args.out}: {prof.name}, GEMM {prof.gemm_max_efficiency:.2f} of {prof.peak_tflops:g} TFLOP/s, "
                  f"HBM {prof.hbm_gbs:.0f} GB/s, NVLink {prof.nvlink_gbs:.0f} / network {prof.network_gbs:.0f} GB/s")
    finally:
        if started:
            dist.destroy_process_group()
    return 0
