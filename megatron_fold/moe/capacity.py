"""Expert capacity arithmetic shared by the router (drop decisions), the dispatcher (padded sizes)
and the planner (cost model), so the three can never disagree.

Two drop scopes:
- `subsequence` (Megatron-Core's semantics): each rank decides drops over its own shard of the
  sequence, capacity = ceil(local_tokens * topk / E * cf). The shard depends on TP (sequence
  parallelism) and CP, so which tokens are dropped changes with the parallel layout.
- `sequence` (ours): drops are decided per (sequence, expert) over the whole sequence,
  capacity = ceil(seq_len * topk / E * cf), so every layout drops exactly the same tokens.
"""

from __future__ import annotations

import math
from enum import Enum

__all__ = ["DropScope", "expert_capacity", "padded_tokens_per_expert"]


class DropScope(str, Enum):
    SUBSEQUENCE = "subsequence"
    SEQUENCE = "sequence"

    @classmethod
    def parse(cls, value: "str | DropScope") -> "DropScope":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"unknown drop scope {value!r}; choose one of: {', '.join(s.value for s in cls)}"
            ) from None


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens one expert accepts out of `num_tokens` tokens routed top-k (Megatron's get_capacity)."""
    if capacity_factor is None or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be a positive number, got {capacity_factor!r}")
    return math.ceil(num_tokens * topk / num_experts * capacity_factor)


def padded_tokens_per_expert(
    scope: DropScope | str,
    *,
    local_seq_len: int,
    seq_len: int,
    local_batch: int,
    topk: int,
    num_experts: int,
    capacity_factor: float,
) -> int:
    """Static number of rows each expert receives from one rank with drop-and-pad.

    Subsequence scope pads to the local capacity (at most the local tokens), as Megatron does. Sequence scope pads to a bound
    that always suffices without a host synchronisation: from one sequence a rank holds
    `local_seq_len` tokens and the sequence sends at most `ceil(seq_len*topk/E*cf)` to one expert,
    and a token goes to an expert at most once, so a rank sends at most
    local_batch * min(local_seq_len, sequence capacity) tokens to one expert.

    The bound is tight (all of a sequence's kept tokens for one expert may sit on one rank) and it is
    the price of static shapes: once TP x CP >= E / (topk * cf) it is every local token, E / topk
    times the rows a balanced router sends (4x for 8 experts top-2, 8x for 64 experts top-8), where
    subsequence scope pads to the local capacity. Prefer sequence scope without padding (no host
    synchronisation beyond the count exchange) when those rows matter.
    """
    scope = DropScope.parse(scope)
    if scope is DropScope.SUBSEQUENCE:
        local_tokens = local_seq_len * local_batch
        # Megatron pads every expert to all local tokens when the capacity exceeds them.
        return min(local_tokens, expert_capacity(local_tokens, topk, num_experts, capacity_factor))
    per_sequence = expert_capacity(seq_len, topk, num_experts, capacity_factor)
    return local_batch * min(local_seq_len, per_sequence)
