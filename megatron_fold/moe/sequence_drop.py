"""Sequence-scope drop decisions shared out over the token group: each member sorts a share of the experts.

Sequence scope keeps, per (sequence b, expert e), the `capacity` routed pairs with the highest drop keys
over the whole sequence, ties to the earlier position (a stable descending sort). Every member of the
token group (TP x CP ranks holding one micro-batch's tokens) has the whole sequence's keys once they are
gathered, so every member could sort them all; that is the same [S, B, E] sort G times, milliseconds on
a GPU at 128K tokens. Instead member g sorts only its share of the experts and sends the others, per
(b, e) of its share, the threshold of the kept set: the key of the capacity-th kept pair and its
position. A pair is kept exactly when it sorts before or at the threshold:

    key > threshold key, or key == threshold key and position <= threshold position

which is the stable sort's order, so every member derives its own rows' keep mask from the thresholds
with a comparison, bit for bit what the full sort gives. The thresholds and the share's (routed, kept)
counts travel in one small all-gather (float64: fp32 keys, positions and counts are exact in it).
"""

from __future__ import annotations

import torch

__all__ = ["expert_shares", "share_record", "keep_mask"]

_ALL_KEPT_KEY = float("-inf")  # a threshold below every key: capacity >= sequence length keeps all


def expert_shares(num_experts: int, members: int) -> tuple[list[int], list[int]]:
    """(first expert, number of experts) of each member's share: contiguous, the first E % G members one
    more; with more members than experts the last members decide none."""
    base, extra = divmod(num_experts, members)
    sizes = [base + (g < extra) for g in range(members)]
    starts = [sum(sizes[:g]) for g in range(members)]
    return starts, sizes


def share_record(share: torch.Tensor, capacity: int, unrouted: float, width: int) -> torch.Tensor:
    """share [S, B, n] of drop keys in true token order (n <= width) -> this member's record [B*width*2 +
    2*width] float64: per (b, e) the threshold key and position of the kept set, then per e the routed
    and kept counts; columns past n are zero."""
    S, B, n = share.shape
    thresholds = torch.zeros(B, width, 2, dtype=torch.float64, device=share.device)
    counts = torch.zeros(2, width, dtype=torch.float64, device=share.device)
    if n:
        if capacity >= S:  # everything kept: no sort
            thresholds[:, :n, 0] = _ALL_KEPT_KEY
            thresholds[:, :n, 1] = S
        else:
            last = torch.sort(share, dim=0, descending=True, stable=True).indices.narrow(0, capacity - 1, 1)  # [1, B, n]
            thresholds[:, :n, 0] = share.gather(0, last)[0]
            thresholds[:, :n, 1] = last[0]
        positions = torch.arange(S, device=share.device).view(S, 1, 1)
        routed = share > unrouted
        kept = routed & keep_mask(share, positions, thresholds[:, :n, 0], thresholds[:, :n, 1])
        counts[0, :n] = routed.sum(dim=(0, 1))
        counts[1, :n] = kept.sum(dim=(0, 1))
    return torch.cat([thresholds.reshape(-1), counts.reshape(-1)])


def keep_mask(key: torch.Tensor, positions: torch.Tensor, threshold_key: torch.Tensor,
              threshold_position: torch.Tensor) -> torch.Tensor:
    """key [S', B, E'] at true positions [S', 1, 1]; thresholds [B, E'] -> keep mask [S', B, E']."""
    return (key > threshold_key) | ((key == threshold_key) & (positions <= threshold_position))
