"""Thresholds of the kept set against Python's own stable sort: for every (sequence, expert), the pairs at
or above the threshold are exactly the `capacity` first in (key descending, position ascending) order,
with heavy ties, unrouted pairs, capacity at and above the sequence length; and the shares split E experts
over G members contiguously."""

import pytest
import torch

from megatron_fold.moe.sequence_drop import expert_shares, keep_mask, share_record

UNROUTED = -1.0


def _python_keep(key: torch.Tensor, capacity: int) -> torch.Tensor:
    S, B, E = key.shape
    keep = torch.zeros(S, B, E, dtype=torch.bool)
    for b in range(B):
        for e in range(E):
            ranked = sorted(range(S), key=lambda s: (-key[s, b, e].item(), s))
            for s in ranked[:capacity]:
                keep[s, b, e] = True
    return keep


@pytest.mark.parametrize("capacity", [1, 3, 7, 12, 20])
@pytest.mark.parametrize("ties", [False, True])
def test_threshold_keep_equals_a_stable_sort(capacity, ties):
    g = torch.Generator().manual_seed(capacity + 100 * ties)
    S, B, E = 12, 3, 5
    key = (torch.randint(0, 3, (S, B, E), generator=g).float() / 2 if ties  # many equal keys
           else torch.rand(S, B, E, generator=g))
    key[torch.rand(S, B, E, generator=g) < 0.3] = UNROUTED
    record = share_record(key, capacity, UNROUTED, width=E + 2)  # wider than the share: padded columns
    thresholds = record[:B * (E + 2) * 2].view(B, E + 2, 2)[:, :E]
    counts = record[B * (E + 2) * 2:].view(2, E + 2)
    got = keep_mask(key, torch.arange(S).view(S, 1, 1), thresholds[..., 0], thresholds[..., 1])
    expected = _python_keep(key, capacity)
    assert torch.equal(got, expected)
    routed = key > UNROUTED
    assert torch.equal(counts[0, :E], routed.sum(dim=(0, 1)).double())
    assert torch.equal(counts[1, :E], (routed & expected).sum(dim=(0, 1)).double())
    assert not counts[:, E:].any()


def test_a_member_without_experts_sends_an_empty_record():
    record = share_record(torch.rand(6, 2, 0), 2, UNROUTED, width=1)
    assert record.shape == (2 * 1 * 2 + 2,) and not record.any()


def test_expert_shares():
    assert expert_shares(8, 4) == ([0, 2, 4, 6], [2, 2, 2, 2])
    assert expert_shares(6, 4) == ([0, 2, 4, 5], [2, 2, 1, 1])
    assert expert_shares(3, 8) == ([0, 1, 2, 3, 3, 3, 3, 3], [1, 1, 1, 0, 0, 0, 0, 0])
