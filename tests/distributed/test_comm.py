"""Uneven collectives against closed-form expectations: forward, backward, zero-size blocks, counters."""

import torch
import torch.distributed as dist

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.comm import CommCounter, all_gather_v, all_to_all_v, reduce_scatter_v
from tests.multirank import run_on_ranks


def _rows(rank, n, width=3):
    # Row i of rank r holds r*100 + i in every column: where a row came from is visible in its value.
    return (rank * 100 + torch.arange(n, dtype=torch.float32)).unsqueeze(1).repeat(1, width)


def _collectives(rank, world_size):
    W = world_size
    world = dist.group.WORLD
    out = {}
    # all_to_all_v: rank r sends (r + j) % 3 rows to rank j (zero-size blocks included).
    send = [(rank + j) % 3 for j in range(W)]
    recv = [(j + rank) % 3 for j in range(W)]
    x = _rows(rank, sum(send)).requires_grad_(True)
    probs = torch.arange(sum(send), dtype=torch.float64).requires_grad_(True)  # another dtype, same collective
    counter = CommCounter()
    y, p = all_to_all_v([x, probs], send, recv, world, counter)
    ((y * (rank + 1)).sum() + p.sum()).backward()  # one backward: one reverse collective for both
    out["a2a"] = (y.detach(), p.detach(), x.grad, probs.grad, dict(counter.calls), dict(counter.bytes_sent))
    # all_gather_v with uneven sizes (rank 2 contributes nothing).
    sizes = [0 if r == 2 else r % 3 + 1 for r in range(W)]
    x = _rows(rank, sizes[rank]).requires_grad_(True)
    y = all_gather_v(x, sizes, world)
    (y * torch.arange(1, y.shape[0] + 1).unsqueeze(1)).sum().backward()
    out["ag"] = (y.detach(), x.grad)
    # reduce_scatter_v: the same sizes; every rank contributes rank+1 times a known block pattern.
    x = (torch.arange(sum(sizes), dtype=torch.float32).unsqueeze(1).repeat(1, 2) * (rank + 1)).requires_grad_(True)
    y = reduce_scatter_v(x, sizes, world)
    (y * 2).sum().backward()
    out["rs"] = (y.detach(), x.grad)
    # A group of one rank is a no-op that counts nothing.
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(W))
    counter = CommCounter()
    z = all_to_all_v(_rows(rank, 2), [2], [2], pgs.tp, counter)
    out["single"] = (torch.equal(z, _rows(rank, 2)), counter.total_calls)
    parallel_state.destroy_model_parallel()
    return out


def test_collectives_closed_form():
    W = 4
    results = run_on_ranks(_collectives, W, timeout=60)
    sizes = [0 if r == 2 else r % 3 + 1 for r in range(W)]
    total_ar = torch.arange(1, sum(sizes) + 1, dtype=torch.float32)
    for rank, out in enumerate(results):
        y, p, gx, gp, calls, sent = out["a2a"]
        expected, expected_p = [], []
        for j in range(W):  # from rank j: rows offset by what j sent to ranks before me
            n_j = [(j + k) % 3 for k in range(W)]
            start = sum(n_j[:rank])
            expected.append(_rows(j, sum(n_j))[start:start + n_j[rank]])
            expected_p.append(torch.arange(sum(n_j), dtype=torch.float64)[start:start + n_j[rank]])
        assert torch.equal(y, torch.cat(expected))
        assert torch.equal(p, torch.cat(expected_p))
        # Backward: each row's gradient is (destination rank + 1).
        send = [(rank + j) % 3 for j in range(W)]
        assert torch.equal(gx, torch.cat([torch.full((n, 3), float(j + 1)) for j, n in enumerate(send)]))
        assert torch.equal(gp, torch.ones(sum(send), dtype=torch.float64))
        row_bytes = 3 * 4 + 8
        assert calls == {"all_to_all_v": 1, "all_to_all_v.backward": 1}
        assert sent["all_to_all_v"] == (sum(send) - send[rank]) * row_bytes

        y, gx = out["ag"]
        assert torch.equal(y, torch.cat([_rows(r, sizes[r]) for r in range(W)]))
        start = sum(sizes[:rank])
        # d/dx of sum(y * i) summed over all ranks' identical losses: W copies of the row index weight.
        assert torch.equal(gx, (W * total_ar[start:start + sizes[rank]]).unsqueeze(1).repeat(1, 3))

        y, gx = out["rs"]
        block = torch.arange(sum(sizes), dtype=torch.float32)[start:start + sizes[rank]]
        assert torch.equal(y, (block * sum(r + 1 for r in range(W))).unsqueeze(1).repeat(1, 2))
        assert torch.equal(gx, torch.full((sum(sizes), 2), 2.0))

        assert out["single"] == (True, 0)
