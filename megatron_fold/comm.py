"""Collectives for the MoE layer that work on gloo (CPU) and nccl (GPU), with counters.

Every collective the router and the dispatcher issue goes through a `CommCounter`, so the MoE layer
can report collectives and bytes per forward (and the benchmark can compare them with the minimum the
routing requires).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["CommCounter", "exchange_rows", "all_gather_rows", "reduce_scatter_rows",
           "all_to_all_v", "all_gather_v", "reduce_scatter_v"]


@dataclass
class CommCounter:
    """Collectives issued and bytes this rank sent, per collective kind (e.g. "all_to_all_v")."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, nbytes: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + int(nbytes)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent.clear()


# ---- row exchange: the one primitive everything below is built from ---------------------------------
#
# gloo has an uneven all-to-all (all_to_all_single with split sizes) but no uneven all-gather and no
# uneven reduce-scatter, so all three are built from it; on nccl the same calls run unchanged.
# Tensors of different dtypes (hidden states in bf16, routing probabilities in fp32) travel together:
# rows are packed as raw bytes, so one collective moves both without a lossy cast.


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[rows, ...] tensors of any dtypes -> [rows, total_bytes] uint8."""
    rows = tensors[0].shape[0]
    return torch.cat([t.reshape(rows, _row_bytes(t) // t.element_size()).contiguous().view(torch.uint8)
                      for t in tensors], dim=1)


def _unpack(buf: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, col = [], 0
    for t in like:
        width = _row_bytes(t)
        chunk = buf[:, col:col + width].contiguous().view(t.dtype)
        out.append(chunk.reshape(buf.shape[0], *t.shape[1:]))
        col += width
    return out


def _row_bytes(t: torch.Tensor) -> int:
    n = 1
    for d in t.shape[1:]:
        n *= d
    return n * t.element_size()


def exchange_rows(tensors: list[torch.Tensor], send_splits: list[int], recv_splits: list[int], group,
                  counter: CommCounter | None = None, kind: str = "all_to_all_v") -> list[torch.Tensor]:
    """Send rows send_splits[i] (in order) to group rank i; receive recv_splits[j] rows from rank j.

    All `tensors` share their row count and move in ONE collective. Not autograd-aware (see below).
    """
    size = dist.get_world_size(group)
    if len(send_splits) != size or len(recv_splits) != size:
        raise ValueError(f"split lists must have one entry per rank of the group ({size}), got "
                         f"{len(send_splits)} send and {len(recv_splits)} receive entries")
    rows = tensors[0].shape[0]
    if sum(send_splits) != rows:
        raise ValueError(f"send splits {send_splits} sum to {sum(send_splits)} but {rows} rows were given")
    if size == 1:
        return [t for t in tensors]
    send = _pack(tensors)
    recv = send.new_empty((sum(recv_splits), send.shape[1]))
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    if counter is not None:
        me = dist.get_rank(group)
        counter.record(kind, (rows - send_splits[me]) * send.shape[1])
    return _unpack(recv, tensors)


def _sum_chunks(tensors: list[torch.Tensor], sizes: list[int], n: int) -> list[torch.Tensor]:
    """Rows arrive as [source rank][n rows]; sum over sources in rank order (bitwise reproducible)."""
    return [t.reshape(len(sizes), n, *t.shape[1:]).sum(dim=0) if len(sizes) > 1 else t for t in tensors]


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, send_splits, recv_splits, group, counter, *tensors):
        ctx.splits, ctx.group, ctx.counter = (send_splits, recv_splits), group, counter
        return tuple(exchange_rows(list(tensors), send_splits, recv_splits, group, counter, "all_to_all_v"))

    @staticmethod
    def backward(ctx, *grads):
        send, recv = ctx.splits
        grads = [g.contiguous() for g in grads]
        out = exchange_rows(grads, recv, send, ctx.group, ctx.counter, "all_to_all_v.backward")
        return (None, None, None, None, *out)


class _DualCollective(torch.autograd.Function):
    """All-gather-v and reduce-scatter-v are each other's backward: one Function serves both."""

    @staticmethod
    def forward(ctx, forward_fn, backward_fn, kind, sizes, group, counter, *tensors):
        ctx.backward_fn, ctx.kind, ctx.sizes, ctx.group, ctx.counter = backward_fn, kind, sizes, group, counter
        return tuple(forward_fn(list(tensors), sizes, group, counter, kind))

    @staticmethod
    def backward(ctx, *grads):
        grads = [g.contiguous() for g in grads]
        out = ctx.backward_fn(grads, ctx.sizes, ctx.group, ctx.counter, f"{ctx.kind}.backward")
        return (None, None, None, None, None, None, *out)


def all_gather_rows(tensors, sizes, group, counter=None, kind="all_gather_v"):
    """Not autograd-aware: every rank's rows, concatenated in group-rank order."""
    size = dist.get_world_size(group)
    if size == 1:
        return list(tensors)
    me = dist.get_rank(group)
    if tensors[0].shape[0] != sizes[me]:
        raise ValueError(f"rank {me} holds {tensors[0].shape[0]} rows but sizes say {sizes[me]}")
    # Every rank receives our rows: send them once per destination.
    repeated = [t.repeat(size, *([1] * (t.dim() - 1))) for t in tensors]
    return exchange_rows(repeated, [sizes[me]] * size, list(sizes), group, counter, kind)


def reduce_scatter_rows(tensors, sizes, group, counter=None, kind="reduce_scatter_v"):
    """Not autograd-aware: sum over ranks, rank i keeps rows of block i (sizes[i] rows)."""
    size = dist.get_world_size(group)
    if size == 1:
        return list(tensors)
    me = dist.get_rank(group)
    received = exchange_rows(tensors, list(sizes), [sizes[me]] * size, group, counter, kind)
    return _sum_chunks(received, [sizes[me]] * size, sizes[me])


def all_to_all_v(tensors, send_splits: list[int], recv_splits: list[int], group, counter=None):
    """Autograd-aware uneven all-to-all of one tensor or a list of row-aligned tensors (one collective)."""
    single = isinstance(tensors, torch.Tensor)
    out = _AllToAllV.apply(list(send_splits), list(recv_splits), group, counter, *([tensors] if single else tensors))
    return out[0] if single else list(out)


def all_gather_v(tensors, sizes: list[int], group, counter=None):
    """Concatenate every rank's rows in group-rank order; rank i contributes sizes[i] rows."""
    single = isinstance(tensors, torch.Tensor)
    out = _DualCollective.apply(all_gather_rows, reduce_scatter_rows, "all_gather_v", list(sizes), group, counter,
                                *([tensors] if single else tensors))
    return out[0] if single else list(out)


def reduce_scatter_v(tensors, sizes: list[int], group, counter=None):
    """Sum [sum(sizes), ...] over the group; rank i keeps its sizes[i] rows of the sum."""
    single = isinstance(tensors, torch.Tensor)
    out = _DualCollective.apply(reduce_scatter_rows, all_gather_rows, "reduce_scatter_v", list(sizes), group, counter,
                                *([tensors] if single else tensors))
    return out[0] if single else list(out)
