"""Core attention with context parallelism, for machines without Transformer Engine.

Megatron-Core's local `DotProductAttention` refuses context parallelism (only TE's attention has it).
Under CP a rank holds two chunks of each sequence, Megatron's load-balanced layout: chunk r and chunk
2*CP-1-r of 2*CP (see moe/token_order.py), so causal attention needs the keys and values of the other
chunks. We all-gather K and V over the CP group (backward: reduce-scatter of their gradients) and mask
by true positions: query at position i sees key at position j iff j <= i.

All-gathering K/V costs CP x the K/V memory of one rank and no overlap, where TE's ring attention
passes chunks peer to peer while computing. At the sizes this path runs at (CPU ranks, tests, small
GPU runs without TE) that is the right trade: the same numbers, a fraction of the code. On GPUs with
Transformer Engine the stock TE spec (ring attention) is used and this class is not involved.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_fold.moe.token_order import local_token_positions

__all__ = ["ContextParallelDotProductAttention"]


class ContextParallelDotProductAttention(DotProductAttention):
    """DotProductAttention that also runs with CP > 1 (all-gather of K/V, position-based causal mask).

    With CP = 1 it computes exactly what DotProductAttention computes, with the causal mask built on
    the query's device instead of Megatron's CUDA-only default mask.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        if getattr(pg_collection, "cp", None) is None:
            raise ValueError("ContextParallelDotProductAttention needs a ProcessGroupCollection with a cp group")
        if config.context_parallel_size != pg_collection.cp.size():
            raise ValueError(f"context_parallel_size = {config.context_parallel_size} but the cp group has "
                             f"{pg_collection.cp.size()} ranks")
        if config.context_parallel_size > 1 and config.window_size is not None:
            raise ValueError(f"sliding-window attention (window_size={config.window_size}) with context "
                             "parallelism needs Transformer Engine; the portable attention does not implement it")
        # The parent refuses CP > 1 only because it cannot see other chunks; we build it for one chunk
        # and give it the gathered keys.
        single_chunk = copy.copy(config)
        single_chunk.context_parallel_size = 1
        # We always pass an explicit position mask; Megatron's fused causal-softmax kernels assume a
        # square [sq, sq] causal mask of their own (and would ignore ours), so they must not be picked.
        single_chunk.masked_softmax_fusion = False
        super().__init__(single_chunk, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection)
        self.config = config
        self.cp_group = pg_collection.cp

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        # query [sq, b, np, hn]; key, value [sk, b, ng, hn]; this rank's rows of the sequence.
        cp = self.cp_group.size()
        local_len = query.shape[0]
        if cp > 1:
            if key.shape[0] != local_len:
                raise ValueError(f"context-parallel attention expects self-attention on this rank's chunks "
                                 f"(query rows {local_len}, key rows {key.shape[0]})")
            key = gather_from_sequence_parallel_region(key, True, self.cp_group)      # [cp*sk, b, ng, hn]
            value = gather_from_sequence_parallel_region(value, True, self.cp_group)  # [cp*sk, b, ng, hn]
            seq_len = local_len * cp
            q_pos = local_token_positions(seq_len, 0, 1, self.cp_group.rank(), cp, device=query.device)
            k_pos = torch.cat([local_token_positions(seq_len, 0, 1, r, cp, device=query.device)
                               for r in range(cp)])
        else:
            # Queries are the last `local_len` of the keys' positions (equal lengths in training; fewer
            # queries than keys when decoding with a KV cache).
            k_pos = torch.arange(key.shape[0], device=query.device)
            q_pos = k_pos[key.shape[0] - local_len:]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask = None
        if attention_mask is not None:
            # As in Megatron, a given mask replaces the causal one. Megatron's CP batch split cuts a
            # given mask along its query dimension and keeps the key dimension whole and in order.
            if attention_mask.shape[-1] != k_pos.numel() or attention_mask.shape[-2] != local_len:
                raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match "
                                 f"{local_len} local queries and {k_pos.numel()} keys")
            mask = attention_mask.index_select(-1, k_pos)
        elif mask_type == AttnMaskType.causal:
            mask = k_pos.unsqueeze(0) > q_pos.unsqueeze(1)  # [sq, sk], True = masked
        return super().forward(query, key, value, mask, mask_type, attention_bias, packed_seq_params)
