"""Where the tokens of a sequence live under context and sequence parallelism.

Megatron splits a sequence in two steps. Context parallelism cuts it into 2*CP chunks and gives CP rank
r the chunks r and 2*CP-1-r (load balancing for causal attention: an early chunk with cheap attention
paired with a late, expensive one). Sequence parallelism then splits that CP-local sequence into TP
contiguous slices. Sequence-scope token dropping must see tokens in their true order, so it needs this
map; tests need it to shard a reference input the way Megatron does.
"""

from __future__ import annotations

import torch

__all__ = ["local_token_positions", "shard_sequence"]


def local_token_positions(seq_len: int, tp_rank: int, tp: int, cp_rank: int, cp: int,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """True positions (in [0, seq_len)) of the rows a rank holds, in the order it holds them. [S_local]"""
    if seq_len % (2 * cp if cp > 1 else 1) or (seq_len // cp) % tp:
        raise ValueError(
            f"sequence length {seq_len} must be divisible by 2*CP = {2 * cp} (CP {cp}) and the CP-local "
            f"length {seq_len // cp} by TP {tp} (sequence parallelism)"
        )
    if cp > 1:
        chunk = seq_len // (2 * cp)
        first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
        second_start = (2 * cp - 1 - cp_rank) * chunk
        second = torch.arange(second_start, second_start + chunk, device=device)
        cp_local = torch.cat([first, second])
    else:
        cp_local = torch.arange(seq_len, device=device)
    per_tp = cp_local.numel() // tp
    return cp_local[tp_rank * per_tp:(tp_rank + 1) * per_tp]


def shard_sequence(x: torch.Tensor, tp_rank: int, tp: int, cp_rank: int, cp: int) -> torch.Tensor:
    """This rank's rows of a full [seq, batch, ...] tensor, as Megatron's CP + SP split gives them."""
    return x.index_select(0, local_token_positions(x.shape[0], tp_rank, tp, cp_rank, cp, device=x.device))
