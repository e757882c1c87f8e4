"""The reference split (moe_reference.shard_like_megatron, through tests/moe/megatron_split.py's stand-in
CP group) against hand-written positions: the layout tests cut their reference inputs with it."""

import pytest
import torch

from megatron_fold.testing.moe_reference import shard_like_megatron
from tests.moe.megatron_split import positions_like_megatron, shard_positions


def test_hand_written_positions():
    # 16 tokens, CP 2: chunks of 4, CP rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2; TP 2 then
    # halves each CP-local sequence.
    got = {(c, t): positions_like_megatron(16, t, 2, c, 2).tolist() for c in range(2) for t in range(2)}
    assert got == {(0, 0): [0, 1, 2, 3], (0, 1): [12, 13, 14, 15], (1, 0): [4, 5, 6, 7], (1, 1): [8, 9, 10, 11]}
    # CP 4, TP 1: rank r holds chunks r and 7 - r of 8.
    assert [positions_like_megatron(8, 0, 1, c, 4).tolist() for c in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    # TP 4 alone: four contiguous slices.
    assert [positions_like_megatron(8, t, 4, 0, 1).tolist() for t in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_rows_follow_positions_in_every_dimension():
    x = torch.arange(16 * 3 * 2).view(16, 3, 2)  # [seq, batch, hidden]
    for c in range(2):
        for t in range(2):
            want = x[positions_like_megatron(16, t, 2, c, 2)]
            assert torch.equal(shard_positions(x, t, 2, c, 2), want)
    assert torch.equal(shard_like_megatron(x, 1, 4), x[4:8])  # no CP group: SP only


def test_megatron_refuses_what_it_cannot_split():
    with pytest.raises(ValueError, match="divisible by 2\\*CP = 4"):
        positions_like_megatron(6, 0, 1, 0, 2)
    with pytest.raises(ValueError, match="does not split over TP 3"):
        shard_like_megatron(torch.zeros(8, 1), 0, 3)
    with pytest.raises(ValueError, match="expected a \\[seq, batch, ...\\] tensor"):
        shard_like_megatron(torch.arange(8), 0, 1)
