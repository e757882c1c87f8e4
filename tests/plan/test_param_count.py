"""The planner's parameter counts equal Megatron-Core's GPTModel built on CPU, exactly: the whole model on
one rank, and each rank's share under folded layouts (TP, PP, EP, ETP) on four gloo ranks."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.plan.cost import stage_params
from megatron_fold.plan.models import ModelSpec
from megatron_fold.testing.multirank import run_on_ranks

SMALL = [
    ModelSpec("mixtral-like", num_layers=2, hidden=32, num_heads=4, num_query_groups=2, head_dim=8, moe_ffn=24,
              num_experts=4, topk=2, vocab=100),
    ModelSpec("qwen2-moe-like", num_layers=3, hidden=32, num_heads=4, num_query_groups=1, head_dim=8, moe_ffn=16,
              num_experts=8, topk=4, vocab=96, shared_expert_ffn=40, shared_expert_gate=True, qkv_bias=True),
    ModelSpec("qwen3-moe-like", num_layers=2, hidden=32, num_heads=8, num_query_groups=2, head_dim=16, moe_ffn=12,
              num_experts=8, topk=2, vocab=64, qk_layernorm=True),
    ModelSpec("tied", num_layers=1, hidden=16, num_heads=2, num_query_groups=2, head_dim=8, moe_ffn=8,
              num_experts=2, topk=1, vocab=50, untied_embeddings=False),
]


def _megatron_params(rank, world_size, spec, sizes):
    """(pipeline rank, parameters this rank holds) of Megatron-Core's GPTModel under FoldedLayout(sizes)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    layout = FoldedLayout(world_size, **sizes, num_experts=spec.num_experts)
    parallel_state.initialize_model_parallel(layout)
    try:
        config = TransformerConfig(
            num_layers=spec.num_layers, hidden_size=spec.hidden, num_attention_heads=spec.num_heads,
            num_query_groups=spec.num_query_groups, kv_channels=spec.head_dim, ffn_hidden_size=spec.moe_ffn,
            moe_ffn_hidden_size=spec.moe_ffn, num_moe_experts=spec.num_experts, moe_router_topk=spec.topk,
            moe_router_pre_softmax=spec.topk == 1,
            moe_shared_expert_intermediate_size=spec.shared_expert_ffn or None,
            moe_shared_expert_gate=spec.shared_expert_gate, add_qkv_bias=spec.qkv_bias, qk_layernorm=spec.qk_layernorm,
            gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
            use_cpu_initialization=True, tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp, pipeline_dtype=torch.float32,
            expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
            # Tied embeddings over PP > 1: skips the first-to-last-stage weight sync, which moves the
            # weight to CUDA; the copy on the last stage is still built, which is what we count.
            init_model_with_meta_device=layout.pp > 1 and not spec.untied_embeddings,
        )
        layer_spec = get_gpt_layer_local_spec(num_experts=spec.num_experts, moe_grouped_gemm=False,
                                              qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")
        model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=spec.vocab,
                         max_sequence_length=32, position_embedding_type="rope",
                         share_embeddings_and_output_weights=not spec.untied_embeddings,
                         pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage())
        return mpu.get_pipeline_model_parallel_rank(), sum(p.numel() for p in model.parameters())
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("spec", SMALL, ids=[s.name for s in SMALL])
def test_param_count_equals_gpt_model(spec):
    assert spec.total_params == run_on_ranks(_megatron_params, 1, spec, {}, timeout=120)[0][1]


def test_active_params_count_topk_experts_only():
    spec = SMALL[1]
    dense = dataclasses.replace(spec, num_experts=spec.topk)  # the same model with only the active experts
    # ... except that the router still scores all experts.
    assert spec.active_params == dense.total_params + spec.num_layers * spec.hidden * (spec.num_experts - spec.topk)


# Four gloo ranks: TP, PP and EP together; ETP below and above TP; tied embeddings copied to the last stage.
PER_RANK = [
    (dataclasses.replace(SMALL[1], num_layers=2, num_query_groups=2), {"tp": 2, "pp": 2, "ep": 2, "etp": 1}),
    (SMALL[2], {"tp": 2, "ep": 4, "etp": 1}),
    (SMALL[0], {"tp": 1, "pp": 2, "ep": 1, "etp": 2}),
    (dataclasses.replace(SMALL[3], num_layers=2), {"tp": 2, "pp": 2, "ep": 2, "etp": 1}),
]


@pytest.mark.parametrize("spec,sizes", PER_RANK, ids=[f"{s.name}-" + "-".join(f"{k}{v}" for k, v in z.items())
                                                      for s, z in PER_RANK])
def test_per_gpu_params_equal_megatron_rank(spec, sizes):
    """The memory model's per-GPU parameters (dense + expert, per pipeline stage) equal what each rank
    of Megatron-Core's GPTModel holds under the same folded layout."""
    layout = FoldedLayout(4, **sizes, num_experts=spec.num_experts)
    results = run_on_ranks(_megatron_params, 4, spec, sizes, timeout=180)
    assert {stage for stage, _ in results} == set(range(layout.pp))
    for stage, count in results:
        assert sum(stage_params(spec, layout, vocab=spec.vocab, stage=stage)) == count, (stage, count)
