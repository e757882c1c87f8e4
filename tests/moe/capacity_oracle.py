"""Expert capacities by brute force, for the tests of capacity.py and of the dispatcher: nothing here
reads megatron_fold.moe.capacity or token_order.

- `megatron_capacity`: Megatron's own get_capacity (the capacity of one expert over `num_tokens`
  tokens routed top-k).
- `subsequence_padded`: the rows one expert receives from one rank under Megatron's drop-and-pad,
  read off Megatron's own apply_router_token_dropping (pad_to_capacity=True): the column sums of the
  capacity mask it returns for the rank's local tokens.
- `sequence_padded`: the most rows one rank can send one expert when drops are decided per
  (sequence, expert) over the whole sequence. For each sequence, every subset of its positions that
  one expert could keep (at most the sequence's capacity) is tried, and the most of them any one
  TP x CP rank holds (positions from Megatron's CP split and a torch.chunk over TP) is taken; a rank
  holds the same positions of each of its `local_batch` sequences, and each sequence decides its
  drops on its own, so the worst case is that many times one sequence's worst.

Results are cached: the sequence brute force is 2^seq_len subsets per layout.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, get_capacity

from tests.moe.megatron_split import positions_like_megatron

__all__ = ["megatron_capacity", "subsequence_padded", "sequence_padded", "most_kept_on_one_rank"]

MAX_BRUTE_FORCE_SEQ = 16


def megatron_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens one expert keeps out of `num_tokens` tokens routed top-k, by Megatron's get_capacity."""
    return get_capacity(num_tokens=num_tokens * topk, num_experts=num_experts, capacity_factor=capacity_factor)


@functools.cache
def subsequence_padded(local_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Rows per expert from one rank with Megatron's drop-and-pad over the rank's `local_tokens` tokens."""
    g = torch.Generator().manual_seed(local_tokens * 1000 + num_experts)
    probs = torch.rand(local_tokens, num_experts, generator=g).softmax(dim=-1)
    routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, probs.topk(topk, dim=1).indices, True)
    _, padded_map = apply_router_token_dropping(probs * routing_map, routing_map, router_topk=topk,
                                                capacity_factor=capacity_factor, pad_to_capacity=True)
    per_expert = padded_map.sum(dim=0)
    assert (per_expert == per_expert[0]).all(), f"Megatron padded experts unevenly: {per_expert.tolist()}"
    return int(per_expert[0])


@functools.cache
def _worst_by_kept_size(seq_len: int, tp: int, cp: int) -> tuple[int, ...]:
    """worst[s]: the most positions any one rank holds of a kept set of at most s positions, over every
    subset of the sequence's positions. [seq_len + 1]"""
    if seq_len > MAX_BRUTE_FORCE_SEQ:
        raise ValueError(f"brute force over 2^{seq_len} subsets: keep seq_len <= {MAX_BRUTE_FORCE_SEQ}")
    held = torch.zeros(seq_len, tp * cp, dtype=torch.int32)  # held[p, r]: rank r holds position p
    for c in range(cp):
        for t in range(tp):
            held[positions_like_megatron(seq_len, t, tp, c, cp), c * tp + t] = 1
    assert (held.sum(dim=1) == 1).all(), "Megatron's split should give every position to exactly one rank"
    subsets = torch.arange(1 << seq_len)
    members = ((subsets[:, None] >> torch.arange(seq_len)) & 1).to(torch.int32)  # [2^S, S]
    on_busiest_rank = (members @ held).amax(dim=1)  # [2^S]
    size = members.sum(dim=1)
    worst = [0] * (seq_len + 1)
    for s in range(seq_len + 1):
        worst[s] = int(on_busiest_rank[size <= s].max())
    return tuple(worst)


def most_kept_on_one_rank(seq_len: int, tp: int, cp: int, kept: int) -> int:
    """The most of one sequence's kept tokens (at most `kept` of them) that one TP x CP rank can hold."""
    worst = _worst_by_kept_size(seq_len, tp, cp)
    return worst[min(kept, seq_len)]


@functools.cache
def sequence_padded(seq_len: int, tp: int, cp: int, local_batch: int, topk: int, num_experts: int,
                    capacity_factor: float) -> int:
    """Rows per expert one rank may have to send when drops are decided per (sequence, expert)."""
    kept = megatron_capacity(seq_len, topk, num_experts, capacity_factor)
    return local_batch * most_kept_on_one_rank(seq_len, tp, cp, kept)
