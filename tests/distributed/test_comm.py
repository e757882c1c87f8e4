"""Uneven collectives against closed-form expectations: forward, backward, zero-size blocks, size-1
groups, counters, bad input; tensors sent as they are (no staging copy) and received contiguous."""

import pytest
import torch
import torch.distributed as dist

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.moe.comm import CommCounter, all_gather_v, all_to_all_v, reduce_scatter_v
from megatron_fold.testing.multirank import run_on_ranks

W = 8


def _rows(rank, n, width=3, dtype=torch.float32):
    # Row i of rank r holds r*100 + i in every column: where a row came from is visible in its value.
    return (rank * 100 + torch.arange(n, dtype=torch.float64)).unsqueeze(1).repeat(1, width).to(dtype)


def _a2a_splits(rank):
    """Rank r sends (r + j) % 3 rows to rank j; rank 5 sends nothing at all, rank 6 receives nothing."""
    send = [0 if rank == 5 or j == 6 else (rank + j) % 3 for j in range(W)]
    recv = [0 if j == 5 or rank == 6 else (j + rank) % 3 for j in range(W)]
    return send, recv


AG_SIZES = [0 if r == 2 else r % 3 + 1 for r in range(W)]  # uneven, rank 2 contributes nothing


def _catch(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _collectives(rank, world_size):
    world = dist.group.WORLD
    out = {}
    # all_to_all_v of two dtypes, one collective each.
    send, recv = _a2a_splits(rank)
    x = _rows(rank, sum(send)).requires_grad_(True)
    p = torch.arange(sum(send), dtype=torch.float64).requires_grad_(True)
    counter = CommCounter()
    y, q = all_to_all_v([x, p], send, recv, world, counter)
    ((y * (rank + 1)).sum() + (q * q).sum()).backward()  # one backward collective for each gradient
    out["a2a"] = (y.detach(), q.detach(), x.grad, p.grad, dict(counter.calls), dict(counter.bytes_sent))

    # all_gather_v, uneven: the a2a fallback; even: the native all-gather. Backward: reduce-scatter.
    for name, sizes in (("ag", AG_SIZES), ("ag_even", [2] * W)):
        counter = CommCounter()
        x = _rows(rank, sizes[rank]).requires_grad_(True)
        y = all_gather_v(x, sizes, world, counter)
        (y * torch.arange(1, y.shape[0] + 1).unsqueeze(1) * (rank + 1)).sum().backward()
        out[name] = (y.detach(), x.grad, dict(counter.calls), dict(counter.bytes_sent))
    # Two tensors of two dtypes through the uneven (point-to-point) all-gather: one batch of sends.
    out["ag_pair"] = all_gather_v([_rows(rank, AG_SIZES[rank]), torch.arange(AG_SIZES[rank], dtype=torch.float64) - rank],
                                  AG_SIZES, world)

    # reduce_scatter_v: every rank contributes (rank+1) times a known pattern. Backward: all-gather.
    counter = CommCounter()
    x = (torch.arange(sum(AG_SIZES), dtype=torch.float32).unsqueeze(1).repeat(1, 2) * (rank + 1)).requires_grad_(True)
    y = reduce_scatter_v(x, AG_SIZES, world, counter)
    (y * (rank + 2)).sum().backward()
    out["rs"] = (y.detach(), x.grad, dict(counter.calls), dict(counter.bytes_sent))

    # bf16 reduce-scatter accumulates in fp32: 256 + 7 * 1 is 263 -> bf16 264 (bf16 partial sums
    # would stay at 256, since 257 is not representable).
    x = torch.full((W, 1), 256.0 if rank == 0 else 1.0, dtype=torch.bfloat16)
    out["rs_bf16"] = reduce_scatter_v(x, [1] * W, world)

    # The output of one collective feeds the next; values must be those of a plain two-step exchange.
    # Every tensor handed to torch.distributed is the caller's own memory (no staging copy) or the
    # previous collective's receive buffer, and every result is contiguous.
    hidden = _rows(rank, 2 * W, width=4, dtype=torch.bfloat16)
    probs = torch.arange(2 * W, dtype=torch.float32) + rank
    sent, real = [], dist.all_to_all_single

    def recording(output, input, *args, **kwargs):
        sent.append(input.data_ptr())
        return real(output, input, *args, **kwargs)

    dist.all_to_all_single = recording
    try:
        h1, p1 = all_to_all_v([hidden, probs], [2] * W, [2] * W, world)
        h2, p2 = all_to_all_v([h1, p1], [2] * W, [2] * W, world)
    finally:
        dist.all_to_all_single = real
    out["chain"] = (h2, p2)
    out["chain_no_copy"] = (sent == [t.data_ptr() for t in (hidden, probs, h1, p1)],
                            all(t.is_contiguous() for t in (h1, p1, h2, p2)))

    # Sub-groups (group ranks differ from global ranks) and a group of one rank.
    pgs = parallel_state.initialize_model_parallel(FoldedLayout(W, ep=4, etp=2))
    ep, etp, tp = pgs.ep, pgs.expt_tp, pgs.tp
    x = _rows(rank, 4)
    out["ep_a2a"] = all_to_all_v(x, [1] * 4, [1] * 4, ep)
    out["etp_ag"] = all_gather_v(_rows(rank, dist.get_rank(etp) + 1), [1, 2], etp)
    counter = CommCounter()
    x1 = _rows(rank, 2).requires_grad_(True)
    z = [all_to_all_v(x1, [2], [2], tp, counter), all_gather_v(x1, [2], tp, counter),
         reduce_scatter_v(x1, [2], tp, counter)]
    sum(t.sum() for t in z).backward()
    out["single"] = ([torch.equal(t, x1) for t in z], torch.equal(x1.grad, torch.full_like(x1, 3.0)),
                     counter.total_calls, counter.total_bytes)

    # Bad input: every rank passes the same bad arguments, so every rank raises before communicating.
    r6 = _rows(rank, 6)
    out["errors"] = [
        _catch(lambda: all_to_all_v(r6, [1] * 3, [1] * 3, world)),
        _catch(lambda: all_to_all_v(r6, [1] * W, [1] * W, world)),
        _catch(lambda: all_to_all_v(r6, [7] + [-1] * (W - 1), [0] * W, world)),
        _catch(lambda: all_gather_v(r6, [5] * W, world)),
        _catch(lambda: reduce_scatter_v(r6, [1] * W, world)),
        _catch(lambda: all_to_all_v([r6, torch.zeros(5)], [6] + [0] * (W - 1), [6] + [0] * (W - 1), world)),
    ]
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_collectives, W, timeout=120)


def test_all_to_all_v_forward_backward_and_counter(results):
    for rank, out in enumerate(results):
        y, q, gx, gp, calls, sent = out["a2a"]
        send, recv = _a2a_splits(rank)
        exp_y, exp_q = [], []
        for j in range(W):  # from rank j: its rows after those it sent to ranks before me
            s_j, _ = _a2a_splits(j)
            start = sum(s_j[:rank])
            exp_y.append(_rows(j, sum(s_j))[start:start + s_j[rank]])
            exp_q.append(torch.arange(sum(s_j), dtype=torch.float64)[start:start + s_j[rank]])
        assert sum(recv) == y.shape[0]
        assert torch.equal(y, torch.cat(exp_y)) and torch.equal(q, torch.cat(exp_q))
        # d/dx of (rank'+1) * y on the receiving rank: a row sent to rank j gets gradient j+1.
        assert torch.equal(gx, torch.cat([torch.full((n, 3), float(j + 1)) for j, n in enumerate(send)]))
        assert torch.equal(gp, 2 * torch.arange(sum(send), dtype=torch.float64))
        # One collective per tensor: a row is 12 bytes of fp32 plus 8 of fp64, nothing added.
        assert calls == {"all_to_all_v": 2, "all_to_all_v.backward": 2}
        assert sent == {"all_to_all_v": (sum(send) - send[rank]) * 20,
                        "all_to_all_v.backward": (sum(recv) - recv[rank]) * 20}


def test_all_gather_v_of_two_dtypes(results):
    expected_rows = torch.cat([_rows(r, AG_SIZES[r]) for r in range(W)])
    expected_probs = torch.cat([torch.arange(AG_SIZES[r], dtype=torch.float64) - r for r in range(W)])
    for out in results:
        rows, probs = out["ag_pair"]
        assert torch.equal(rows, expected_rows) and torch.equal(probs, expected_probs)


@pytest.mark.parametrize("name", ["ag", "ag_even"])
def test_all_gather_v_forward_backward_and_counter(results, name):
    sizes = AG_SIZES if name == "ag" else [2] * W
    total = sum(sizes)
    # Loss on rank r: (r+1) * sum_i (i+1) * y_i, so row i's gradient summed over ranks is (i+1) * 36.
    weight = torch.arange(1, total + 1, dtype=torch.float32) * sum(r + 1 for r in range(W))
    for rank, out in enumerate(results):
        y, gx, calls, sent = out[name]
        start = sum(sizes[:rank])
        assert torch.equal(y, torch.cat([_rows(r, sizes[r]) for r in range(W)]))
        assert torch.equal(gx, weight[start:start + sizes[rank]].unsqueeze(1).repeat(1, 3))
        assert calls == {"all_gather_v": 1, "all_gather_v.backward": 1}
        assert sent == {"all_gather_v": (W - 1) * sizes[rank] * 12,
                        "all_gather_v.backward": (total - sizes[rank]) * 12}


def test_reduce_scatter_v_forward_backward_and_counter(results):
    for rank, out in enumerate(results):
        y, gx, calls, sent = out["rs"]
        start = sum(AG_SIZES[:rank])
        block = torch.arange(sum(AG_SIZES), dtype=torch.float32)[start:start + AG_SIZES[rank]]
        assert torch.equal(y, (block * sum(r + 1 for r in range(W))).unsqueeze(1).repeat(1, 2))
        # Backward all-gathers each rank's gradient block: rows of rank r's block get r+2.
        owner = torch.cat([torch.full((n,), float(r + 2)) for r, n in enumerate(AG_SIZES)])
        assert torch.equal(gx, owner.unsqueeze(1).repeat(1, 2))
        assert calls == {"reduce_scatter_v": 1, "reduce_scatter_v.backward": 1}
        assert sent == {"reduce_scatter_v": (sum(AG_SIZES) - AG_SIZES[rank]) * 8,
                        "reduce_scatter_v.backward": (W - 1) * AG_SIZES[rank] * 8}
        assert out["rs_bf16"].dtype == torch.bfloat16 and out["rs_bf16"].item() == 264.0


def test_chained_collectives_and_subgroups(results):
    layout = FoldedLayout(W, ep=4, etp=2)
    for rank, out in enumerate(results):
        # Two uniform all-to-alls are the identity: round 1 gives rank j my block j, round 2 returns it.
        h2, p2 = out["chain"]
        assert torch.equal(h2, _rows(rank, 2 * W, width=4, dtype=torch.bfloat16))
        assert torch.equal(p2, torch.arange(2 * W, dtype=torch.float32) + rank)
        assert out["chain_no_copy"] == (True, True)

        ep = layout.group_of("ep", rank)
        me = ep.index(rank)
        assert torch.equal(out["ep_a2a"], torch.cat([_rows(g, 4)[me:me + 1] for g in ep]))
        etp = layout.group_of("etp", rank)
        assert torch.equal(out["etp_ag"], torch.cat([_rows(g, i + 1) for i, g in enumerate(etp)]))
        assert out["single"] == ([True, True, True], True, 0, 0)


def test_bad_input_names_the_problem(results):
    msgs = results[0]["errors"]
    assert "one entry per rank of the group (8), got 3" in msgs[0]
    assert "sum to 8 but 6 rows" in msgs[1]
    assert "non-negative" in msgs[2]
    assert "holds 6 rows but sizes" in msgs[3]
    assert "6 rows but sizes [1, 1, 1, 1, 1, 1, 1, 1] sum to 8" in msgs[4]
    assert "share rows" in msgs[5]
