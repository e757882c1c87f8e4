#!/usr/bin/env python
"""GPU check of the MoE flags (issue 13): fused paths vs portable, and per-layer time vs Megatron.

Needs one CUDA GPU and Transformer Engine; refuses to run otherwise (nothing here is exercised by the
CPU test tier). Two parts, on one rank (nccl world of 1), bf16:

1. Parity: the dispatcher's chunk sort with TE (moe_sort_chunks_by_index) against its portable gather;
   FoldMoELayer with moe_router_fusion / moe_permute_fusion / both, against the same layer
   with the flags off (the portable torch path), same weights and inputs: output, input gradient and
   every parameter gradient must agree within bf16 tolerance, and the fused path must really have run
   (no fallback warning, the dispatcher's fused flag set). Also moe_shared_expert_overlap on vs off
   (Megatron's side stream on CUDA). Exits 1 on a mismatch.
2. Time: forward + backward of one layer, FoldMoELayer vs Megatron's MoELayer with the alltoall
   dispatcher, both with --moe-permute-fusion --moe-router-fusion --moe-grouped-gemm (TEGroupedMLP
   experts), same weights, timed in alternation (medians): Mixtral-8x7B-shaped (hidden 4096, 8 experts
   of FFN 14336, top-2, SwiGLU) and Qwen2-57B-A14B-shaped (hidden 3584, 64 experts of FFN 2560, top-8,
   SwiGLU, gated shared expert of FFN 20480, with and without --moe-shared-expert-overlap) layers.
   Prints ratios ours / Megatron; never asserts on time.

    python scripts/gpu_flag_parity.py [--tokens 4096] [--iters 10] [--skip-timing] [--dry-run]

--dry-run builds every configuration the run uses and checks it as FoldMoELayer does (on any machine).

Sized for an H100/H200 (about 20 GB for the Qwen2-shaped layer with its gradients) in under 5 minutes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist


def _missing_gpu_or_te() -> str | None:
    if not torch.cuda.is_available():
        return "gpu_flag_parity.py needs a CUDA GPU (the CPU test tier covers the portable paths; --dry-run checks the plan)"
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return "gpu_flag_parity.py needs Transformer Engine (its fused kernels are what is checked)"
    return None


SHAPES = {
    "mixtral-8x7b": dict(hidden_size=4096, num_moe_experts=8, moe_ffn_hidden_size=14336, moe_router_topk=2),
    "qwen2-57b-a14b": dict(hidden_size=3584, num_moe_experts=64, moe_ffn_hidden_size=2560, moe_router_topk=8,
                           moe_shared_expert_intermediate_size=20480, moe_shared_expert_gate=True),
}


PARITY_SHAPE = dict(hidden_size=1024, num_moe_experts=16, moe_ffn_hidden_size=2048, moe_router_topk=2,
                    moe_shared_expert_intermediate_size=2048, moe_shared_expert_gate=True)
PARITY_SCOPES = (("subsequence", None), ("sequence", 1.0))  # (drop scope, capacity factor)
PARITY_FLAGS = (("router", dict(moe_router_fusion=True)), ("permute", dict(moe_permute_fusion=True)),
                ("router+permute", dict(moe_router_fusion=True, moe_permute_fusion=True)),
                ("shared-overlap", dict(moe_shared_expert_overlap=True)))
TIMING_FUSION = dict(moe_permute_fusion=True, moe_router_fusion=True, moe_grouped_gemm=True)
TIMING_RUNS = (("mixtral-8x7b", {}), ("qwen2-57b-a14b", {}), ("qwen2-57b-a14b", dict(moe_shared_expert_overlap=True)))


def _checked_config(shape: dict, scope: str, **flags) -> None:
    """Build the configuration and check it as FoldMoELayer does. Without Transformer Engine, Megatron's
    TransformerConfig refuses the fusion flags themselves: they are set after construction there (the
    TE-only checks then run on the GPU machine, at the real run)."""
    from megatron_fold.moe.flags import validate_fold_moe_config

    try:
        import transformer_engine  # noqa: F401
        config = _config(shape, **flags)
    except ImportError:
        te_only = {k: flags.pop(k) for k in ("moe_permute_fusion", "moe_router_fusion", "moe_grouped_gemm") if k in flags}
        config = _config(shape, **flags)
        for key, value in te_only.items():
            setattr(config, key, value)
    validate_fold_moe_config(config, scope)


def dry_run() -> list[str]:
    """Every configuration the run builds, built and checked as FoldMoELayer checks it (Megatron's
    TransformerConfig, then validate_fold_moe_config and the TE refusals), on any machine. Returns lines."""
    lines = []
    for scope, capacity in PARITY_SCOPES:
        for name, flags in (("portable", {}), *PARITY_FLAGS):
            _checked_config(PARITY_SHAPE, scope, moe_expert_capacity_factor=capacity, **flags)
            lines.append(f"parity {scope} {name}: bf16, {PARITY_SHAPE['num_moe_experts']} experts top-"
                         f"{PARITY_SHAPE['moe_router_topk']}, flags {sorted(flags) or 'none'}")
    lines.append("parity chunk sort: TE moe_sort_chunks_by_index vs the portable gather (T, P, L) = (1, 8, 2), "
                 "(2, 4, 4), (2, 2, 8)")
    for shape_name, extra in TIMING_RUNS:
        _checked_config(SHAPES[shape_name], "subsequence", **TIMING_FUSION, **extra)
        lines.append(f"time {shape_name}{' +shared-overlap' if extra else ''}: ours, ours with check_finite, "
                     f"Megatron alltoall; flags {sorted({**TIMING_FUSION, **extra})}")
    return lines


def _config(shape: dict, **flags):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=1, num_attention_heads=32, ffn_hidden_size=shape["moe_ffn_hidden_size"],
                  gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
                  bf16=True, params_dtype=torch.bfloat16, moe_router_dtype="fp32", moe_token_dispatcher_type="alltoall",
                  moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, bias_activation_fusion=False)
    kwargs.update(shape)
    kwargs.update(flags)
    return TransformerConfig(**kwargs)


def _fold_layer(config, pgs, **spec):
    from megatron_fold.specs import get_fold_moe_module_spec

    layer = get_fold_moe_module_spec(use_te=True, num_experts=config.num_moe_experts,
                                     moe_grouped_gemm=config.moe_grouped_gemm, **spec)(config=config, pg_collection=pgs)
    layer.set_layer_number(1)
    return layer.cuda()


def _megatron_layer(config, pgs):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    layer = get_moe_module_spec(use_te=True, num_experts=config.num_moe_experts,
                                moe_grouped_gemm=config.moe_grouped_gemm)(config=config, pg_collection=pgs)
    layer.set_layer_number(1)
    return layer.cuda()


def _fwd_bwd(layer, x, w):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out.float() * w).sum().backward()
    return out.detach().float(), x.grad.detach().float(), {n: p.grad.detach().float() for n, p in layer.named_parameters()
                                                           if p.grad is not None}


def _close(a, b, what) -> list[str]:
    try:
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        return []
    except AssertionError as e:
        return [f"{what}: {str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}"]


def parity(pgs, tokens: int) -> list[str]:
    """Fused vs portable FoldMoELayer on a mid-sized layer; returns the mismatches."""
    from megatron_fold.moe import fused

    shape = PARITY_SHAPE
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, 1, shape["hidden_size"], device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(tokens, 1, shape["hidden_size"], device="cuda", generator=g)
    failures = []
    for scope, capacity in PARITY_SCOPES:
        base = _config(shape, moe_expert_capacity_factor=capacity)
        reference_layer = _fold_layer(base, pgs, drop_scope=scope)
        reference = _fwd_bwd(reference_layer, x, w)
        for name, flags in PARITY_FLAGS:
            before = len(failures)
            config = _config(shape, moe_expert_capacity_factor=capacity, **flags)
            layer = _fold_layer(config, pgs, drop_scope=scope)
            layer.load_state_dict(reference_layer.state_dict())
            fused._warned.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out, gx, grads = _fwd_bwd(layer, x, w)
            fallbacks = [str(c.message) for c in caught if "portable" in str(c.message)]
            if fallbacks:
                failures.append(f"{scope} {name}: fused path did not run: {fallbacks}")
            if "permute" in name and not layer.token_dispatcher._fused:
                failures.append(f"{scope} {name}: dispatcher did not use TE's permutation")
            if name == "shared-overlap" and layer.token_dispatcher.shared_experts is None:
                failures.append(f"{scope} {name}: shared expert not overlapped")
            where = f"{scope} {name}"
            failures += _close(out, reference[0], f"{where} output") + _close(gx, reference[1], f"{where} input grad")
            for key, ref_grad in reference[2].items():
                failures += _close(grads[key], ref_grad, f"{where} grad {key}")
            print(f"parity {where:<28} {'ok' if len(failures) == before else 'MISMATCH (below)'}", flush=True)
            del layer
        del reference_layer
        torch.cuda.empty_cache()
    return failures


def chunk_sort_parity() -> list[str]:
    """TE's chunk sort (moe_sort_chunks_by_index, as FlexFoldDispatcher calls it through Megatron) against the
    portable device-side gather, rows, probabilities and gradients both ways. The dispatcher sorts chunks
    only with EP x ETP > 1 and several local experts, which one GPU cannot run: called directly here."""
    from megatron_fold.moe.dispatcher import _ChunkSort

    failures = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for T, P, L in ((1, 8, 2), (2, 4, 4), (2, 2, 8)):
        counts = torch.randint(0, 64, (T, P, L), device="cuda", generator=g)
        counts.view(-1)[::5] = 0  # empty chunks
        rows = int(counts.sum())
        hidden = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16, generator=g)
        probs = torch.rand(rows, device="cuda", generator=g)
        results = []
        for fused_sort in (False, True):
            h, p = hidden.clone().requires_grad_(True), probs.clone().requires_grad_(True)
            sort = _ChunkSort(counts, rows, fused_sort)
            sorted_h, sorted_p = sort.to_experts(h, p)
            back = sort.from_experts(sorted_h * 2)
            (back.float().sum() + (sorted_p * torch.arange(rows, device="cuda")).sum()).backward()
            results.append((sorted_h.detach(), sorted_p.detach(), back.detach(), h.grad, p.grad))
        for what, a, b in zip(("rows", "probs", "rows back", "rows grad", "probs grad"), results[1], results[0]):
            if not torch.equal(a, b):  # a permutation: bitwise equal
                failures.append(f"chunk sort T{T} P{P} L{L} {what}: TE differs from the portable gather")
        print(f"parity chunk sort T{T} P{P} L{L} ({rows} rows) {'ok' if not failures else 'MISMATCH (below)'}", flush=True)
    return failures


def _seconds(layer, x) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out, _ = layer(x.clone().requires_grad_(True))
    out.sum().backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def timing(pgs, tokens: int, iters: int) -> None:
    for shape_name, extra in TIMING_RUNS:
        config = _config(SHAPES[shape_name], **TIMING_FUSION, **extra)
        upstream = _megatron_layer(config, pgs)
        variants = [("ours", _fold_layer(config, pgs)), ("ours, check_finite on", _fold_layer(config, pgs, check_finite=True))]
        for _, layer in variants:
            missing, unexpected = layer.load_state_dict(upstream.state_dict(), strict=False)
            if missing or unexpected:
                print(f"  (weights differ in names: missing {missing[:3]}, unexpected {unexpected[:3]})")
        x = torch.randn(tokens, 1, config.hidden_size, device="cuda", dtype=torch.bfloat16)
        layers = [upstream] + [layer for _, layer in variants]
        for layer in layers:  # warm-up: allocator, TE workspaces, kernels
            _seconds(layer, x)
        times = [[] for _ in layers]
        for _ in range(iters):  # alternation: drift hits every layer alike
            for i, layer in enumerate(layers):
                times[i].append(_seconds(layer, x))
        up = statistics.median(times[0])
        label = shape_name + (" +shared-overlap" if extra else "")
        for (name, _), t in zip(variants, times[1:]):
            print(f"time {label:<32} {name:<24} / Megatron alltoall: {statistics.median(t) / up:.2f} "
                  f"({statistics.median(t) * 1e3:.1f} ms vs {up * 1e3:.1f} ms, median of {iters}, {tokens} tokens)",
                  flush=True)
        del upstream, variants, layers
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="build and check every configuration, print the plan, exit")
    args = p.parse_args(argv)
    if args.dry_run:
        print("\n".join(dry_run()))
        missing = _missing_gpu_or_te()
        print(f"machine: {missing or 'a CUDA GPU with Transformer Engine: ready'}")
        return
    missing = _missing_gpu_or_te()
    if missing:
        print(f"gpu_flag_parity.py: error: {missing}", file=sys.stderr)
        sys.exit(2)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    from megatron.core import tensor_parallel

    from megatron_fold import FoldedLayout, parallel_state

    pgs = parallel_state.initialize_model_parallel(FoldedLayout(1))
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    try:
        failures = parity(pgs, min(args.tokens, 2048)) + chunk_sort_parity()
        for f in failures:
            print("MISMATCH", f)
        if not args.skip_timing:
            timing(pgs, args.tokens, args.iters)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
