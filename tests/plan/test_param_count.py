"""The planner's parameter count equals Megatron-Core's GPTModel built on CPU, exactly."""

import dataclasses

import pytest
import torch.nn.functional as F

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.plan.models import ModelSpec
from tests.multirank import run_on_ranks

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


def _megatron_count(rank, world_size, spec):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(FoldedLayout(1))
    try:
        config = TransformerConfig(
            num_layers=spec.num_layers, hidden_size=spec.hidden, num_attention_heads=spec.num_heads,
            num_query_groups=spec.num_query_groups, kv_channels=spec.head_dim, ffn_hidden_size=spec.moe_ffn,
            moe_ffn_hidden_size=spec.moe_ffn, num_moe_experts=spec.num_experts, moe_router_topk=spec.topk,
            moe_router_pre_softmax=spec.topk == 1,
            moe_shared_expert_intermediate_size=spec.shared_expert_ffn or None,
            moe_shared_expert_gate=spec.shared_expert_gate, add_qkv_bias=spec.qkv_bias, qk_layernorm=spec.qk_layernorm,
            gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
            use_cpu_initialization=True,
        )
        layer_spec = get_gpt_layer_local_spec(num_experts=spec.num_experts, moe_grouped_gemm=False,
                                              qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")
        model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=spec.vocab,
                         max_sequence_length=32, position_embedding_type="rope",
                         share_embeddings_and_output_weights=not spec.untied_embeddings)
        return sum(p.numel() for p in model.parameters())
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("spec", SMALL, ids=[s.name for s in SMALL])
def test_param_count_equals_gpt_model(spec):
    assert spec.total_params == run_on_ranks(_megatron_count, 1, spec, timeout=120)[0]


def test_active_params_count_topk_experts_only():
    spec = SMALL[1]
    dense = dataclasses.replace(spec, num_experts=spec.topk)  # the same model with only the active experts
    # ... except that the router still scores all experts.
    assert spec.active_params == dense.total_params + spec.num_layers * spec.hidden * (spec.num_experts - spec.topk)
