"""Collectives for the MoE layer that work on gloo (CPU) and nccl (GPU), with counters.

Every collective the router and the dispatcher issue goes through a `CommCounter`, so the MoE layer
can report collectives and bytes per forward (and the benchmark can compare them with the minimum the
routing requires).

What gloo offers in torch 2.14 (probed on 4 ranks): `all_to_all_single` with uneven split sizes,
`all_gather` / `all_gather_into_tensor` with EQUAL sizes only (uneven: "invalid tensor size"), list
`all_to_all` with equal sizes only, and `reduce_scatter` (list form, uneven sizes accepted). So:
- all_to_all_v is `all_to_all_single` with splits (gloo and nccl alike);
- all_gather_v is `all_gather_into_tensor` when every rank contributes the same number of rows (the
  drop-and-pad case) and otherwise point-to-point sends of the one send buffer to every peer (an
  all-to-all would need the buffer repeated once per rank: a group-size-fold copy);
- reduce_scatter_v is an all-to-all of the blocks followed by a local sum over source ranks. Not the
  native reduce-scatter, on purpose: the local sum runs in group-rank order with fp32 accumulation
  (bitwise reproducible, independent of the backend's algorithm, and bf16 partial sums are never
  rounded per hop, which is why Megatron upcasts to fp32 before its reduce-scatter: we get that
  accuracy at bf16 bytes), and it can carry tensors of several dtypes at once. The bytes a rank sends
  equal a ring reduce-scatter's: every row but its own block, once.

Tensors of different dtypes (hidden states in bf16, routing probabilities in fp32) travel side by side:
each in its own collective, all issued before any is waited on, as Megatron's alltoall dispatcher sends
hidden states and probabilities in two all-to-alls. They were once packed as raw bytes into one
[rows, bytes] buffer so that one collective moved both; that cost a full copy of the hidden states into
the buffer, and since the columns of a packed row are strided views, the experts' GEMMs copied them out
again (and the backward packed the gradients once more): about three activation copies a layer to save
one collective of [rows] probabilities (scripts/bench_moe_layer.py --baseline-rev compares the two).
A contiguous tensor is sent as it is and every result is a fresh contiguous receive buffer: no copy
beyond what the exchange itself writes.
"""

from __future__ import annotations

import math
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


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _check_rows(tensors: list[torch.Tensor]) -> int:
    rows = tensors[0].shape[0]
    for t in tensors[1:]:
        if t.shape[0] != rows or t.device != tensors[0].device:
            raise ValueError(f"tensors sent together must share rows and device, got "
                             f"{[(tuple(x.shape), str(x.device)) for x in tensors]}")
    return rows


def _check_sizes(name: str, sizes: list[int], group_size: int) -> None:
    if len(sizes) != group_size:
        raise ValueError(f"{name} must have one entry per rank of the group ({group_size}), got {len(sizes)}: {sizes}")
    if any(s < 0 for s in sizes):
        raise ValueError(f"{name} must be non-negative, got {sizes}")


# ---- collectives on lists of row-aligned tensors (not autograd-aware) --------------------------------

def exchange_rows(tensors: list[torch.Tensor], send_splits: list[int], recv_splits: list[int], group,
                  counter: CommCounter | None = None, kind: str = "all_to_all_v") -> list[torch.Tensor]:
    """Send rows send_splits[i] (in order) to group rank i; receive recv_splits[j] rows from rank j.

    All `tensors` share their row count; each moves in its own collective, all issued before any is
    waited on. Returns one fresh contiguous receive buffer per tensor.
    """
    size = dist.get_world_size(group)
    _check_sizes("send splits", send_splits, size)
    _check_sizes("receive splits", recv_splits, size)
    rows = _check_rows(tensors)
    if sum(send_splits) != rows:
        raise ValueError(f"send splits {send_splits} sum to {sum(send_splits)} but {rows} rows were given")
    if size == 1:
        if recv_splits != send_splits:
            raise ValueError(f"a group of one rank receives what it sends: splits {send_splits} vs {recv_splits}")
        return list(tensors)
    sends = [t.contiguous() for t in tensors]  # no copy when contiguous (the usual case)
    recvs = [t.new_empty((sum(recv_splits), *t.shape[1:])) for t in sends]
    works = [dist.all_to_all_single(recv, send, list(recv_splits), list(send_splits), group=group, async_op=True)
             for recv, send in zip(recvs, sends)]
    for work in works:
        work.wait()
    if counter is not None:
        me = dist.get_rank(group)
        for send in sends:
            counter.record(kind, (rows - send_splits[me]) * _row_bytes(send))
    return recvs


def all_gather_rows(tensors: list[torch.Tensor], sizes: list[int], group, counter: CommCounter | None = None,
                    kind: str = "all_gather_v") -> list[torch.Tensor]:
    """Every rank's rows, concatenated in group-rank order; rank i contributes sizes[i] rows."""
    size = dist.get_world_size(group)
    _check_sizes("sizes", sizes, size)
    rows = _check_rows(tensors)
    me = dist.get_rank(group)
    if rows != sizes[me]:
        raise ValueError(f"group rank {me} holds {rows} rows but sizes {sizes} say {sizes[me]}")
    if size == 1:
        return list(tensors)
    sends = [t.contiguous() for t in tensors]
    if all(s == rows for s in sizes):  # even: the native all-gather (no replicated send buffer)
        recvs = [t.new_empty((rows * size, *t.shape[1:])) for t in sends]
        works = [dist.all_gather_into_tensor(recv, send, group=group, async_op=True) for recv, send in zip(recvs, sends)]
        for work in works:
            work.wait()
    else:
        recvs = _all_gather_point_to_point(sends, sizes, group)
    if counter is not None:
        for send in sends:
            counter.record(kind, (size - 1) * rows * _row_bytes(send))
    return recvs


def _all_gather_point_to_point(sends: list[torch.Tensor], sizes: list[int], group) -> list[torch.Tensor]:
    """Uneven all-gather. Gloo has no all-gather-v, so: point-to-point, each send buffer goes to every
    peer (an all-to-all would need it repeated once per rank, a group-size-fold copy) and each peer's
    rows land in their place of the receive buffer; one batch for all tensors (matched per peer in
    issue order on both sides)."""
    me, size = dist.get_rank(group), dist.get_world_size(group)
    recvs, ops = [], []
    for send in sends:
        recv = send.new_empty((sum(sizes), *send.shape[1:]))
        blocks = recv.split(list(sizes))
        blocks[me].copy_(send)
        recvs.append(recv)
        for peer in range(size):
            if peer == me:
                continue
            peer_rank = dist.get_global_rank(group, peer)
            if sizes[me]:
                ops.append(dist.P2POp(dist.isend, send, peer_rank, group))
            if sizes[peer]:
                ops.append(dist.P2POp(dist.irecv, blocks[peer], peer_rank, group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return recvs


def reduce_scatter_rows(tensors: list[torch.Tensor], sizes: list[int], group, counter: CommCounter | None = None,
                        kind: str = "reduce_scatter_v") -> list[torch.Tensor]:
    """Sum [sum(sizes), ...] over the group; rank i keeps its sizes[i] rows of the sum."""
    size = dist.get_world_size(group)
    _check_sizes("sizes", sizes, size)
    rows = _check_rows(tensors)
    if rows != sum(sizes):
        raise ValueError(f"reduce-scatter input has {rows} rows but sizes {sizes} sum to {sum(sizes)}")
    if size == 1:
        return list(tensors)
    n = sizes[dist.get_rank(group)]
    received = exchange_rows(tensors, list(sizes), [n] * size, group, counter, kind)  # [source rank][n rows]
    out = []
    for t in received:
        blocks = t.view(size, n, *t.shape[1:])
        acc = torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype
        out.append(blocks.sum(dim=0, dtype=acc).to(t.dtype))
    return out


# ---- autograd-aware wrappers -------------------------------------------------------------------------

class _AllToAllV(torch.autograd.Function):
    """Uneven all-to-all; its backward is the reverse all-to-all (splits swapped)."""

    @staticmethod
    def forward(ctx, send_splits, recv_splits, group, counter, *tensors):
        ctx.splits, ctx.group, ctx.counter = (send_splits, recv_splits), group, counter
        return tuple(exchange_rows(list(tensors), send_splits, recv_splits, group, counter, "all_to_all_v"))

    @staticmethod
    def backward(ctx, *grads):
        send, recv = ctx.splits
        out = exchange_rows(list(grads), recv, send, ctx.group, ctx.counter, "all_to_all_v.backward")
        return (None, None, None, None, *out)


class _DualCollective(torch.autograd.Function):
    """All-gather-v and reduce-scatter-v are each other's backward: one Function serves both."""

    @staticmethod
    def forward(ctx, forward_fn, backward_fn, kind, sizes, group, counter, *tensors):
        ctx.backward_fn, ctx.kind, ctx.sizes, ctx.group, ctx.counter = backward_fn, kind, sizes, group, counter
        return tuple(forward_fn(list(tensors), sizes, group, counter, kind))

    @staticmethod
    def backward(ctx, *grads):
        out = ctx.backward_fn(list(grads), ctx.sizes, ctx.group, ctx.counter, f"{ctx.kind}.backward")
        return (None, None, None, None, None, None, *out)


def _as_list(tensors) -> tuple[bool, list[torch.Tensor]]:
    single = isinstance(tensors, torch.Tensor)
    tensors = [tensors] if single else list(tensors)
    if not tensors:
        raise ValueError("no tensor to communicate")
    return single, tensors


def all_to_all_v(tensors, send_splits: list[int], recv_splits: list[int], group, counter: CommCounter | None = None):
    """Autograd-aware uneven all-to-all of a [N, ...] tensor, or of a list of row-aligned tensors (one
    collective each, issued together). A group of one rank returns the input unchanged and communicates nothing."""
    single, tensors = _as_list(tensors)
    if dist.get_world_size(group) == 1:
        exchange_rows(tensors, list(send_splits), list(recv_splits), group)  # validates only
        out = tensors
    else:
        out = _AllToAllV.apply(list(send_splits), list(recv_splits), group, counter, *tensors)
    return out[0] if single else list(out)


def _dual_v(forward, backward, name: str, tensors, sizes: list[int], group, counter: CommCounter | None):
    """Run `forward` (with `backward` as its gradient) on one tensor or a list; size-1 groups skip autograd."""
    single, tensors = _as_list(tensors)
    if dist.get_world_size(group) == 1:
        out = forward(tensors, list(sizes), group)
    else:
        out = _DualCollective.apply(forward, backward, name, list(sizes), group, counter, *tensors)
    return out[0] if single else list(out)


def all_gather_v(tensors, sizes: list[int], group, counter: CommCounter | None = None):
    """Concatenate every rank's rows in group-rank order; rank i contributes sizes[i] rows.
    Backward: reduce_scatter_v of the gradient."""
    return _dual_v(all_gather_rows, reduce_scatter_rows, "all_gather_v", tensors, sizes, group, counter)


def reduce_scatter_v(tensors, sizes: list[int], group, counter: CommCounter | None = None):
    """Sum [sum(sizes), ...] over the group; rank i keeps its sizes[i] rows of the sum.
    Backward: all_gather_v of the gradient."""
    return _dual_v(reduce_scatter_rows, all_gather_rows, "reduce_scatter_v", tensors, sizes, group, counter)
