"""Token order under CP and SP, against Megatron's own CP batch split and a hand-written case."""

import pytest
import torch

from megatron_fold.moe.token_order import local_token_positions, shard_sequence


def test_hand_written_cp2_tp2():
    # 8 tokens, CP 2 -> chunks [0,1][2,3][4,5][6,7]; CP rank 0 holds [0,1,6,7], rank 1 [2,3,4,5];
    # SP over TP 2 then splits each CP-local sequence in halves.
    got = {(c, t): local_token_positions(8, t, 2, c, 2).tolist() for c in range(2) for t in range(2)}
    assert got == {(0, 0): [0, 1], (0, 1): [6, 7], (1, 0): [2, 3], (1, 1): [4, 5]}


@pytest.mark.parametrize("cp,tp", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 2)])
def test_every_position_exactly_once(cp, tp):
    seq = 32
    allpos = torch.cat([local_token_positions(seq, t, tp, c, cp) for c in range(cp) for t in range(tp)])
    assert sorted(allpos.tolist()) == list(range(seq))


@pytest.mark.parametrize("cp", [2, 4])
def test_matches_megatron_cp_batch_split(cp, monkeypatch):
    from megatron.core import utils as mutils

    seq, batch = 16, 2
    tokens = torch.arange(batch * seq).view(batch, seq)  # Megatron batches are [batch, seq]
    for r in range(cp):
        # Megatron asks torch.distributed for the CP group's size and rank; answer for rank r.
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: cp)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=r: r)
        ours = shard_sequence(tokens.t(), 0, 1, r, cp).t()
        theirs = mutils.get_batch_on_this_cp_rank({"tokens": tokens.clone(), "cu_seqlens": None},
                                                  is_hybrid_cp=False, cp_group=object())["tokens"]
        assert torch.equal(ours, theirs)


def test_indivisible_sequence_is_rejected():
    with pytest.raises(ValueError, match="sequence length 10 must be divisible by 2\\*CP = 4"):
        local_token_positions(10, 0, 1, 0, 2)
