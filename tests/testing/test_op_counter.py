"""OpCounter against hand-written code with a known number of kernels, copies and copied bytes."""

import torch

from megatron_fold.testing.op_counter import OpCounter


def test_copies_are_counted_with_the_bytes_they_write():
    x = torch.randn(6, 4)  # fp32: 16 bytes a row
    index = torch.tensor([2, 0, 1])
    with OpCounter() as counter:
        torch.cat([x.index_select(0, index), x[:2]])  # gather 3 rows, then write 5 rows
    assert dict(counter.ops) == {"index_select": 1, "cat": 1}
    assert (counter.copies, counter.copy_bytes) == (2, 3 * 16 + 5 * 16)
    with OpCounter() as counter:
        x.t().contiguous()  # a copy: the strided view materialised
        torch.empty(5, 4).copy_(x[:5])  # the allocation is no kernel; the in-place copy writes 5 rows
    assert dict(counter.ops) == {"clone": 1, "copy_": 1}
    assert (counter.copies, counter.copy_bytes) == (2, 6 * 16 + 5 * 16)


def test_views_and_allocations_launch_nothing():
    x = torch.randn(6, 4)
    with OpCounter() as counter:
        x.view(24).reshape(4, 6).transpose(0, 1)[1:3].unsqueeze(0).expand(2, 2, 4).detach()
        x.split([2, 4])
        torch.empty(3, 3)
    assert counter.kernels == 0 and counter.copies == 0


def test_arithmetic_is_a_kernel_not_a_copy_and_backward_is_counted():
    x = torch.randn(6, 4, requires_grad=True)
    with OpCounter() as counter:
        y = x.index_select(0, torch.tensor([1, 3]))
        (y * 2).sum().backward()
    # forward: index_select, mul, sum; backward: the seed (ones_like), mul, and index_select's backward
    # (new_zeros + index_add): every op autograd runs is seen.
    assert dict(counter.ops) == {"index_select": 1, "mul": 2, "sum": 1, "ones_like": 1, "new_zeros": 1,
                                 "index_add": 1}
    assert (counter.copies, counter.copy_bytes) == (1, 2 * 16)
    assert torch.equal(x.grad[1], torch.full((4,), 2.0)) and torch.equal(x.grad[0], torch.zeros(4))
