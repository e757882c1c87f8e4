"""Whole stock Megatron-Core GPT models with FoldMoELayer, on any folded layout.

Why here and not in the tests: the tests, `megatron-fold train` and users build the same models the
same way, from Megatron's own spec builders (`get_gpt_decoder_block_spec`) with the plugin installed,
so what the tests prove is what the command runs. Two small model families mirror the planner's
presets in kind (plan/models.py holds the real shapes):

  mixtral-like    SwiGLU experts, RMSNorm, RoPE, GQA, 8 experts top-2, untied embeddings
  qwen2-moe-like  SwiGLU, RMSNorm, RoPE, GQA, QKV bias, 16 experts top-4, gated shared expert

`model_config(name, layout, **overrides)` returns Megatron's TransformerConfig (any field overridable,
real shapes included); `build_model(config, pgs, ...)` returns the model chunks of this rank's
pipeline stage (one per virtual stage). Without Transformer Engine the local spec is adapted with the
portable norm and attention (sequence and context parallelism on CPU ranks); with TE installed the
stock TE spec is used unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_fold import portable, specs
from megatron_fold.layout import FoldedLayout
from megatron_fold.moe.capacity import DropScope

__all__ = ["MODEL_FAMILIES", "ModelShape", "model_config", "build_model"]


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What a model family fixes beyond TransformerConfig: vocabulary and sequence length."""

    vocab_size: int
    seq_length: int
    config: dict


_COMMON = dict(
    normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
    hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False,
    bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
    persist_layer_norm=False, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
    moe_token_dispatcher_type="alltoall", params_dtype=torch.float32, use_cpu_initialization=True,
)

MODEL_FAMILIES: dict[str, ModelShape] = {
    "mixtral-like": ModelShape(vocab_size=256, seq_length=32, config=dict(
        num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=128,
        num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32, **_COMMON)),
    "qwen2-moe-like": ModelShape(vocab_size=256, seq_length=32, config=dict(
        num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=128,
        num_moe_experts=16, moe_router_topk=4, moe_ffn_hidden_size=16, add_qkv_bias=True,
        moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True, **_COMMON)),
}


def model_config(family: str, layout: FoldedLayout, *, virtual_pipeline_stages: int | None = None,
                 **overrides) -> TransformerConfig:
    """Megatron's TransformerConfig for `family` under `layout` (parallel sizes from the layout only).

    Sequence parallelism is on whenever TP > 1 (Megatron-Core requires it for MoE with TP). Any
    TransformerConfig field can be overridden, e.g. `moe_expert_capacity_factor=1.0` for dropping.
    """
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of: {', '.join(MODEL_FAMILIES)}")
    owned = {"tensor_model_parallel_size", "context_parallel_size", "pipeline_model_parallel_size",
             "expert_model_parallel_size", "expert_tensor_parallel_size"}
    clash = owned & set(overrides)
    if clash:
        raise ValueError(f"{sorted(clash)} come from the FoldedLayout; do not pass them separately")
    kwargs = dict(MODEL_FAMILIES[family].config)
    kwargs.update(
        tensor_model_parallel_size=layout.tp, context_parallel_size=layout.cp,
        pipeline_model_parallel_size=layout.pp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp, sequence_parallel=layout.tp > 1,
        virtual_pipeline_model_parallel_size=virtual_pipeline_stages,
        pipeline_dtype=overrides.get("params_dtype", torch.float32) if layout.pp > 1 else None,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(config: TransformerConfig, pg_collection, *, vocab_size: int, seq_length: int,
                drop_scope: DropScope | str = DropScope.SEQUENCE, use_te: bool | None = None,
                fold: bool = True, portable_modules: bool = True, check_finite: bool = False,
                metrics: bool = True, rotary_base: float = 10000) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage) of a stock GPTModel.

    `fold=False` builds Megatron's own MoELayer instead (the baseline of benchmarks and oracle tests);
    `portable_modules=False` keeps Megatron's own local norm and attention (TP = CP = 1 only: the
    single-rank oracle); `use_te=None` uses the Transformer Engine spec when TE is installed.
    """
    if use_te is None:
        use_te = specs._have_transformer_engine()
    pp_group = pg_collection.pp
    pp_rank, pp_size = pp_group.rank(), pp_group.size()
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    with specs.installed(fold, drop_scope=drop_scope, check_finite=check_finite, metrics=metrics):
        for vp_stage in range(vpp):
            block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                               normalization=config.normalization,
                                               vp_stage=vp_stage if vpp > 1 else None, pp_rank=pp_rank)
            if not use_te and portable_modules:
                block = portable.adapt_spec(block)
            first = pp_rank == 0 and vp_stage == 0
            last = pp_rank == pp_size - 1 and vp_stage == vpp - 1
            chunks.append(GPTModel(
                config, block, vocab_size=vocab_size, max_sequence_length=seq_length,
                pre_process=first, post_process=last, share_embeddings_and_output_weights=False,
                position_embedding_type="rope", rotary_base=rotary_base, pg_collection=pg_collection,
                vp_stage=vp_stage if vpp > 1 else None,
            ))
    return chunks
