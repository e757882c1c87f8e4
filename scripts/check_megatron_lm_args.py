#!/usr/bin/env python
"""Check `megatron-fold plan`'s Megatron-LM arguments against a real Megatron-LM checkout.

Runs Megatron-LM's own parse_args + validate_args + core_transformer_config_from_args on the arguments
the planner prints for the best layout of several presets, and compares the resulting TransformerConfig
(model shape, the five parallel sizes, VPP, sequence parallelism, dispatcher, capacity and padding)
with what the planner modelled. Not a test (CI has no Megatron-LM checkout): run it when moving to a
new Megatron-LM tag.

    .venv/bin/python scripts/check_megatron_lm_args.py /path/to/Megatron-LM   # at tag core_v0.19.x

On a machine without a GPU, validate_args' device queries are answered as an H100 would answer them.
Exit status 1 if any field differs.
"""

from __future__ import annotations

import os
import sys
import types


def main(megatron_lm: str) -> int:
    sys.path.insert(0, os.path.abspath(megatron_lm))
    import torch

    if not torch.cuda.is_available():  # validate_args asks the device for its architecture
        torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
        torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
            major=9, minor=0, name="H100 (stand-in)", total_memory=80 * 2**30)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron-LM asserts it with TP or CP
    from megatron.training import arguments as mlm

    from megatron_fold.plan.hardware import get_gpu
    from megatron_fold.plan.models import PRESETS
    from megatron_fold.plan.search import plan

    failures = 0
    for name, gpus, capacity_factor in [("qwen2-57b-a14b", 64, 1.0), ("mixtral-8x22b", 128, None),
                                        ("qwen3-30b-a3b", 32, None), ("mixtral-8x7b", 64, 1.25)]:
        m = PRESETS[name]
        best = plan(m, get_gpu("h100"), gpus, 8, 4096, 256, capacity_factor)[0][0]
        c, layout = best.choice, best.choice.layout
        # Data, tokenizer and optimizer arguments are the user's; rope fusion needs Transformer Engine.
        extra = ["--tokenizer-type=NullTokenizer", f"--vocab-size={m.vocab}", "--lr=1e-4", "--train-iters=10"]
        if not torch.cuda.is_available():
            extra.append("--no-rope-fusion")
        sys.argv = ["pretrain_gpt.py", *best.megatron_args, *extra]
        os.environ.update(WORLD_SIZE=str(gpus), RANK="0")
        args = mlm.parse_args()
        mlm.validate_args(args, {})
        cfg = mlm.core_transformer_config_from_args(args)
        got = dict(layers=cfg.num_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                   groups=cfg.num_query_groups, head_dim=cfg.kv_channels, ffn=cfg.moe_ffn_hidden_size,
                   experts=cfg.num_moe_experts, topk=cfg.moe_router_topk, shared=cfg.moe_shared_expert_intermediate_size,
                   shared_gate=cfg.moe_shared_expert_gate, swiglu=cfg.gated_linear_unit, norm=cfg.normalization,
                   bias=cfg.add_bias_linear, qkv_bias=cfg.add_qkv_bias, qk_norm=cfg.qk_layernorm,
                   untied=args.untie_embeddings_and_output_weights, bf16=cfg.bf16, tp=cfg.tensor_model_parallel_size,
                   cp=cfg.context_parallel_size, pp=cfg.pipeline_model_parallel_size, ep=cfg.expert_model_parallel_size,
                   etp=cfg.expert_tensor_parallel_size, vpp=cfg.virtual_pipeline_model_parallel_size,
                   sp=cfg.sequence_parallel, capacity=cfg.moe_expert_capacity_factor,
                   pad=cfg.moe_pad_expert_input_to_capacity, dispatcher=cfg.moe_token_dispatcher_type,
                   grouped_gemm=cfg.moe_grouped_gemm, micro_batch=args.micro_batch_size, seq=args.seq_length,
                   recompute=cfg.recompute_granularity)
        want = dict(layers=m.num_layers, hidden=m.hidden, heads=m.num_heads, groups=m.num_query_groups,
                    head_dim=m.head_dim, ffn=m.moe_ffn, experts=m.num_experts, topk=m.topk,
                    shared=m.shared_expert_ffn or None, shared_gate=m.shared_expert_gate, swiglu=True, norm="RMSNorm",
                    bias=False, qkv_bias=m.qkv_bias, qk_norm=m.qk_layernorm, untied=m.untied_embeddings, bf16=True,
                    tp=layout.tp, cp=layout.cp, pp=layout.pp, ep=layout.ep, etp=layout.etp,
                    vpp=c.vpp if c.vpp > 1 else None, sp=layout.tp > 1, capacity=capacity_factor,
                    pad=capacity_factor is not None, dispatcher="alltoall", grouped_gemm=True,
                    micro_batch=c.micro_batch, seq=4096, recompute="full" if c.recompute else None)
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        failures += bool(diff)
        print(f"{name} on {gpus} GPUs, {c.label()}: " + ("Megatron-LM builds what was planned" if not diff
                                                          else f"DIFFERS (Megatron-LM, planned): {diff}"), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
