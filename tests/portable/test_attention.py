"""The portable context-parallel attention equals Megatron's own DotProductAttention on one rank.

Reference: Megatron's DotProductAttention (CP = 1) on the whole sequence. Under test: CP 2 and CP 4
ranks, each holding Megatron's load-balanced chunks of the sequence, cut by Megatron's own
get_batch_on_this_cp_rank (queries, keys, values and a given mask alike). Causal (no mask given), and
a random boolean mask given as the dataset would give it; GQA (8 heads, 4 query groups). Outputs and
the gradients of queries, keys and values must agree.
"""

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.portable.attention import ContextParallelDotProductAttention
from megatron_fold.testing.multirank import run_on_ranks

S, B, HEADS, GROUPS, DIM = 16, 2, 8, 4, 8


def _config(cp):
    return TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                             num_query_groups=GROUPS, context_parallel_size=cp, attention_dropout=0.0,
                             masked_softmax_fusion=False, params_dtype=torch.float32)


def _inputs(with_mask):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(S, B, HEADS, DIM, generator=g)
    k = torch.randn(S, B, GROUPS, DIM, generator=g)
    v = torch.randn(S, B, GROUPS, DIM, generator=g)
    w = torch.randn(S, B, HEADS * DIM, generator=g)  # weights of the scalar loss
    mask = None
    if with_mask:
        mask = torch.rand(B, 1, S, S, generator=g) < 0.3
        mask[..., torch.arange(S), torch.arange(S)] = False  # every query sees at least itself
    return q, k, v, w, mask


def _run(attention, q, k, v, w, mask):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, mask)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _reference(rank, world_size, with_mask):
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(1))
    tensor_parallel.model_parallel_cuda_manual_seed(1)  # attention forks the model-parallel RNG stream
    try:
        attention = DotProductAttention(_config(1), 1, AttnMaskType.causal, "self", pg_collection=pgs)
        return _run(attention, *_inputs(with_mask))
    finally:
        parallel_state.destroy_model_parallel()


def _cp_rank(rank, world_size, with_mask):
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(world_size, cp=world_size))
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    try:
        q, k, v, w, mask = _inputs(with_mask)
        # Megatron's split works on [batch, seq, ...]; attention_mask [b, 1, sq, sk] along dim 2.
        batch = {"q": q.transpose(0, 1), "k": k.transpose(0, 1), "v": v.transpose(0, 1), "w": w.transpose(0, 1),
                 "cu_seqlens": None}
        if mask is not None:
            batch["attention_mask"] = mask
        local = get_batch_on_this_cp_rank(batch, False, cp_group=pgs.cp)
        positions = get_batch_on_this_cp_rank({"p": torch.arange(S).unsqueeze(0), "cu_seqlens": None}, False,
                                              cp_group=pgs.cp)["p"][0]
        attention = ContextParallelDotProductAttention(_config(world_size), 1, AttnMaskType.causal, "self",
                                                       pg_collection=pgs)
        q, k, v, w = (local[n].transpose(0, 1) for n in ("q", "k", "v", "w"))
        out, gq, gk, gv = _run(attention, q, k, v, w, local.get("attention_mask"))
        return positions, out, gq, gk, gv
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "given-mask"])
def test_context_parallel_attention_equals_megatrons_on_one_rank(cp, with_mask):
    ref_out, ref_gq, ref_gk, ref_gv = run_on_ranks(_reference, 1, with_mask, timeout=120)[0]
    for rank, (pos, out, gq, gk, gv) in enumerate(run_on_ranks(_cp_rank, cp, with_mask, timeout=120)):
        for name, got, full in (("output", out, ref_out), ("grad q", gq, ref_gq), ("grad k", gk, ref_gk),
                                ("grad v", gv, ref_gv)):
            torch.testing.assert_close(got, full.index_select(0, pos), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"CP {cp} rank {rank} {name}: {m}")
