"""The positions of a sequence each rank holds, as Megatron cuts them, for tests that need them outside
the ranks (in the parent process, with no process group at hand).

`megatron_fold.testing.moe_reference.shard_like_megatron` cuts with Megatron's own
`get_batch_on_this_cp_rank`, which asks torch.distributed for the CP group's size and this rank's
place in it. Here that question is answered for a stand-in group, for every CP rank in turn; any
other group goes to torch.distributed as usual. Nothing here imports megatron_fold.moe.token_order.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from megatron_fold.testing.moe_reference import shard_like_megatron

__all__ = ["positions_like_megatron", "shard_positions"]


class _StandInCPGroup:
    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


@contextlib.contextmanager
def _answer_for(group: _StandInCPGroup):
    get_world_size, get_rank = dist.get_world_size, dist.get_rank
    dist.get_world_size = lambda g=None: group.size if g is group else get_world_size(g)
    dist.get_rank = lambda g=None: group.rank if g is group else get_rank(g)
    try:
        yield
    finally:
        dist.get_world_size, dist.get_rank = get_world_size, get_rank


@functools.cache
def _positions(seq_len: int, tp_rank: int, tp: int, cp_rank: int, cp: int) -> tuple[int, ...]:
    group = _StandInCPGroup(cp_rank, cp)
    with _answer_for(group):
        return tuple(shard_like_megatron(torch.arange(seq_len)[:, None], tp_rank, tp, group)[:, 0].tolist())


def positions_like_megatron(seq_len: int, tp_rank: int, tp: int, cp_rank: int, cp: int) -> torch.Tensor:
    """Positions (in [0, seq_len)) of the rows the rank (tp_rank, cp_rank) holds, in its order. [S_local]

    Raises ValueError where Megatron cannot cut the sequence (seq_len not divisible by 2*CP, or the
    CP-local length by TP)."""
    if cp > 1 and seq_len % (2 * cp):
        raise ValueError(f"Megatron's CP split needs the sequence length {seq_len} divisible by 2*CP = {2 * cp}")
    return torch.tensor(_positions(seq_len, tp_rank, tp, cp_rank, cp), dtype=torch.long)


def shard_positions(t: torch.Tensor, tp_rank: int, tp: int, cp_rank: int, cp: int) -> torch.Tensor:
    """The rank's rows of a full [seq, ...] tensor, cut as Megatron cuts them."""
    return t.index_select(0, positions_like_megatron(t.shape[0], tp_rank, tp, cp_rank, cp))
