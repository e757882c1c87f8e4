#!/usr/bin/env python
"""Benchmark: whole-model training step, FoldMoELayer vs Megatron-Core's alltoall MoELayer.

The same stock GPTModel (Megatron's block spec, same layout, same initial weights, same global batch)
built twice on every rank: once with the plugin installed, once with Megatron's own MoELayer and its
alltoall dispatcher (CPU mode). Steps of the two are timed in alternation (A B A B ...) in one run,
so machine noise hits both; the script prints the median step-time ratio ours / Megatron's per layout
and model, and the loss of both (they train the same model: dropless, so the numbers must agree).

    .venv/bin/python scripts/bench_whole_model.py [--steps 10] [--layouts tp2,ep4,etp1 ep8] [--bf16]
        [--device cpu|cuda] [--dry-run]

--device cpu (the default without CUDA): 8 gloo ranks in CPU mode; timings on ranks sharing a few cores
are dominated by scheduling noise, read ratios, not milliseconds. --device cuda (the default with CUDA):
8 nccl ranks, one GPU each, so the all-to-alls really cross GPUs; refused with fewer than 8 GPUs.
--bf16: Megatron's mixed precision (Float16Module, fp32 main weights, fp32 router logits), what a GPU
run uses. --dry-run checks the arguments and the machine, prints the plan and exits.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402

from megatron_fold import FoldedLayout, cpu, models, parallel_state  # noqa: E402
from megatron_fold.plan.command import parse_layout  # noqa: E402
from megatron_fold.testing import whole_model as wm  # noqa: E402
from megatron_fold.testing.multirank import run_on_ranks  # noqa: E402
from megatron_fold.train.job import folded_layout  # noqa: E402

WORLD = 8
SEQUENCES = 16


def _rank(rank, world_size, layout_kwargs, family, steps, device_kind="cpu", bf16=False):
    device = torch.device("cuda", torch.cuda.current_device()) if device_kind == "cuda" else torch.device("cpu")
    precision = dict(bf16=True, params_dtype=torch.bfloat16, moe_router_dtype="fp32") if bf16 else {}
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        shape = models.MODEL_FAMILIES[family]
        tokens = wm.global_tokens(SEQUENCES, shape.seq_length, shape.vocab_size, seed=3)
        trainers, weights = {}, None
        for name, fold in (("ours", True), ("megatron", False)):
            torch.manual_seed(1)
            config = models.model_config(family, layout, calculate_per_token_loss=True,
                                         moe_token_dispatcher_type="alltoall", **precision)
            chunks = models.build_model(config, pgs, vocab_size=shape.vocab_size, seq_length=shape.seq_length,
                                        fold=fold)
            chunks = [c.to(device) for c in chunks]
            if weights is None:
                weights = {k: v for k, v in chunks[0].state_dict().items() if torch.is_tensor(v)}
            else:  # the same initial weights: identical module trees, identical local shapes
                chunks[0].load_state_dict(weights, strict=False)
            trainers[name] = wm.Trainer(chunks, config, pgs, distributed_optimizer=pgs.dp_cp.size() > 1)
        times = {name: [] for name in trainers}
        losses = {name: [] for name in trainers}
        for step in range(steps + 2):  # two warm-up steps each
            for name, trainer in trainers.items():
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                result = trainer.step(tokens)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                losses[name].append(result.loss)
                if step >= 2:
                    times[name].append(elapsed)
        return times, losses
    finally:
        parallel_state.destroy_model_parallel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layouts", nargs="+", default=["tp2,ep4,etp1", "ep8", "cp2,pp2,ep4"])
    parser.add_argument("--families", nargs="+", default=["mixtral-like", "qwen2-moe-like"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="cpu: gloo ranks in CPU mode; cuda: nccl ranks, one GPU each (default: cuda where available)")
    parser.add_argument("--bf16", action="store_true", help="Megatron's bf16 mixed precision")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and the machine, print the plan")
    args = parser.parse_args(argv)
    have_cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if have_cuda else "cpu")
    if device == "cuda" and (not have_cuda or torch.cuda.device_count() < WORLD):
        parser.exit(2, f"bench_whole_model.py: --device cuda runs {WORLD} ranks with one GPU each, but this machine "
                       f"has {torch.cuda.device_count() if have_cuda else 0} GPU(s); use --device cpu\n")
    if device == "cpu" and have_cuda:
        parser.exit(2, "bench_whole_model.py: --device cpu needs a machine without CUDA (CPU mode answers Megatron's "
                       "CUDA calls only there); on this GPU node use --device cuda\n")
    bad = [f for f in args.families if f not in models.MODEL_FAMILIES]
    if bad or args.steps < 1:
        parser.exit(2, f"bench_whole_model.py: unknown model families {bad} (choose from "
                       f"{', '.join(models.MODEL_FAMILIES)}) or --steps {args.steps} < 1\n")
    try:
        layouts = [(text, folded_layout(WORLD, parse_layout(text))) for text in args.layouts]
    except ValueError as e:
        parser.exit(2, f"bench_whole_model.py: {e}\n")
    if args.dry_run:
        print(f"would time {args.steps} steps of {', '.join(args.families)} under {', '.join(args.layouts)} on "
              f"{WORLD} {'nccl ranks, one GPU each' if device == 'cuda' else 'gloo ranks in CPU mode'}, "
              f"{'bf16' if args.bf16 else 'fp32'}: ours vs Megatron's alltoall MoELayer, alternated")
        return
    if device == "cpu":
        cpu.enable_cpu_mode()
    print(f"{'layout':<16} {'model':<16} {'ours/megatron':>13} {'ours ms':>9} {'megatron ms':>11}  loss ours / megatron")
    for text, layout in layouts:
        layout_kwargs = dict(tp=layout.tp, cp=layout.cp, pp=layout.pp, ep=layout.ep, etp=layout.etp)
        for family in args.families:
            per_rank = run_on_ranks(_rank, WORLD, layout_kwargs, family, args.steps, device, args.bf16, timeout=900,
                                    backend="nccl" if device == "cuda" else "gloo")
            # A step ends when its slowest rank ends: take the max over ranks of each step.
            ours = [max(r[0]["ours"][i] for r in per_rank) for i in range(args.steps)]
            theirs = [max(r[0]["megatron"][i] for r in per_rank) for i in range(args.steps)]
            ratio = statistics.median(a / b for a, b in zip(ours, theirs))
            lo, lm = per_rank[0][1]["ours"][-1], per_rank[0][1]["megatron"][-1]
            print(f"{text:<16} {family:<16} {ratio:>13.2f} {1e3 * statistics.median(ours):>9.0f} "
                  f"{1e3 * statistics.median(theirs):>11.0f}  {lo:.5f} / {lm:.5f}")


if __name__ == "__main__":
    main()
