"""capacity.py against Megatron's get_capacity and drop-and-pad, and a brute-force maximum over every
kept set of a sequence's tokens split among TP x CP ranks the way Megatron splits them
(tests/moe/capacity_oracle.py)."""

import itertools

import pytest

from megatron_fold.moe.capacity import DropScope, expert_capacity, padded_tokens_per_expert
from tests.moe.capacity_oracle import (megatron_capacity, most_kept_on_one_rank, sequence_padded,
                                       subsequence_padded)

ROUTINGS = [(8, 1), (8, 2), (8, 8), (64, 2), (64, 8), (4, 3)]  # (experts, top-k)
FACTORS = [0.1, 0.25, 0.5, 1.0, 1.1, 1.5, 2.0, 4.0, 8.0]
BATCHES = [1, 3]
# (sequence length, TP, CP): every TP x CP <= 8 Megatron can split the sequence over, S <= 16
SPLITS = [(s, tp, cp) for s in (4, 8, 16) for tp in (1, 2, 4, 8) for cp in (1, 2, 4)
          if tp * cp <= 8 and (cp == 1 or s % (2 * cp) == 0) and (s // cp) % tp == 0 and s // cp >= tp]


def test_expert_capacity_is_megatrons():
    for n, (E, k), cf in itertools.product(range(0, 40), ROUTINGS, FACTORS + [1 / 3, 0.3, 1.2, 2.2]):
        assert expert_capacity(n, k, E, cf) == megatron_capacity(n, k, E, cf), (n, E, k, cf)


@pytest.mark.parametrize("seq_len,tp,cp", SPLITS, ids=[f"S{s}-tp{t}-cp{c}" for s, t, c in SPLITS])
def test_sequence_scope_pads_to_the_brute_force_maximum(seq_len, tp, cp):
    local = seq_len // (tp * cp)
    for (E, k), cf, b in itertools.product(ROUTINGS, FACTORS, BATCHES):
        got = padded_tokens_per_expert("sequence", local_seq_len=local, seq_len=seq_len, local_batch=b, topk=k,
                                       num_experts=E, capacity_factor=cf)
        assert got == sequence_padded(seq_len, tp, cp, b, k, E, cf), (E, k, cf, b)


@pytest.mark.parametrize("seq_len,tp,cp", SPLITS, ids=[f"S{s}-tp{t}-cp{c}" for s, t, c in SPLITS])
def test_subsequence_scope_pads_like_megatron(seq_len, tp, cp):
    local = seq_len // (tp * cp)
    for (E, k), cf, b in itertools.product(ROUTINGS, FACTORS, BATCHES):
        got = padded_tokens_per_expert(DropScope.SUBSEQUENCE, local_seq_len=local, seq_len=seq_len, local_batch=b,
                                       topk=k, num_experts=E, capacity_factor=cf)
        assert got == subsequence_padded(local * b, k, E, cf), (E, k, cf, b)


def test_the_cases_cover_both_regimes():
    """Guards the comparisons above against vacuity: the sequence bound is sometimes every local token,
    sometimes fewer, and sometimes differs from the subsequence size (mutations of either show)."""
    full, fewer, differ = set(), set(), set()
    for (s, tp, cp), (E, k), cf, b in itertools.product(SPLITS, ROUTINGS, FACTORS, BATCHES):
        local = s // (tp * cp)
        seq = sequence_padded(s, tp, cp, b, k, E, cf)
        (full if seq == local * b else fewer).add((s, tp, cp))
        if seq != subsequence_padded(local * b, k, E, cf):
            differ.add((s, tp, cp))
    assert len(full) > 5 and len(fewer) > 5 and len(differ) > 5


def test_brute_force_by_hand():
    # 8 tokens over CP 2 x TP 2: ranks hold [0,1] [6,7] [2,3] [4,5]. Keeping 3 tokens of a sequence,
    # one rank can hold 2 of them (say 0, 1 and 2); keeping 1, one.
    assert [most_kept_on_one_rank(8, 2, 2, kept) for kept in range(5)] == [0, 1, 2, 2, 2]
    # With no parallelism the one rank holds every kept token.
    assert [most_kept_on_one_rank(8, 1, 1, kept) for kept in range(10)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]
    # 64 experts top-2, cf 1, 16 tokens: one kept per sequence; 2 sequences on the rank -> 2 rows.
    assert sequence_padded(16, 2, 2, 2, 2, 64, 1.0) == 2
    # Megatron's drop-and-pad: 8 local tokens, 8 experts top-2, cf 1 -> capacity 2; cf 8 -> every token.
    assert subsequence_padded(8, 2, 8, 1.0) == 2 and subsequence_padded(8, 2, 8, 8.0) == 8


def test_scope_and_factor_errors():
    assert DropScope.parse("sequence") is DropScope.SEQUENCE
    with pytest.raises(ValueError, match="unknown drop scope 'global'; choose one of: subsequence, sequence"):
        DropScope.parse("global")
    for cf in (None, 0, -1.0):
        with pytest.raises(ValueError, match="capacity_factor must be a positive number"):
            expert_capacity(8, 2, 8, cf)
