"""The dispatcher's chunk sort index against Python's split-and-concatenate (Megatron's unfused
sort_chunks_by_idxs does exactly that), including empty chunks; its inverse restores the rows."""

import torch

from megatron_fold.moe.dispatcher import _chunk_gather_index, _inverse_permutation, _SortRows


def _split_cat(rows: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    chunks = rows.split(sizes)
    return torch.cat([chunks[i] for i in order])


def test_chunk_gather_index_matches_split_and_cat():
    g = torch.Generator().manual_seed(3)
    for T, P, L in ((1, 4, 2), (2, 2, 4), (2, 4, 3), (4, 1, 2)):
        for _ in range(5):
            counts = torch.randint(0, 4, (T, P, L), generator=g)
            counts.view(-1)[torch.randint(0, T * P * L, (2,), generator=g)] = 0  # empty chunks
            rows = int(counts.sum())
            data = torch.randn(rows, 3, generator=g)
            sizes = counts.reshape(-1).tolist()
            to_experts = [(t * P + s) * L + l for l in range(L) for t in range(T) for s in range(P)]
            expected = _split_cat(data, sizes, to_experts)
            chunks = torch.arange(T * P * L)
            index = _chunk_gather_index(counts.reshape(-1), chunks.view(T * P, L).t().reshape(-1), rows)
            assert torch.equal(data.index_select(0, index), expected)
            # The way back: chunks in expert order [l][t][s] return to arrival order [t][s][l], both by the
            # inverse permutation and by the same construction from the expert-order sizes.
            expert_sizes = counts.reshape(T * P, L).t().reshape(-1)
            back = _chunk_gather_index(expert_sizes, chunks.view(L, T * P).t().reshape(-1), rows)
            assert torch.equal(expected.index_select(0, back), data)
            assert torch.equal(_inverse_permutation(index), back)


def test_sort_rows_backward_is_the_inverse_gather():
    index = torch.tensor([2, 0, 3, 1])
    inverse = torch.tensor([1, 3, 0, 2])  # inverse[index[j]] = j
    x = torch.arange(8.0).view(4, 2).requires_grad_(True)
    p = torch.arange(4.0, dtype=torch.float64).requires_grad_(True)
    y, q = _SortRows.apply(index, inverse, x, p)
    assert torch.equal(y, x.detach()[index]) and torch.equal(q, p.detach()[index])
    weight = torch.arange(1.0, 9.0).view(4, 2)
    ((y * weight).sum() + (q * torch.arange(1.0, 5.0, dtype=torch.float64)).sum()).backward()
    # d/dx[i] = weight[j] where index[j] = i
    assert torch.equal(x.grad, weight[inverse])
    assert torch.equal(p.grad, torch.arange(1.0, 5.0, dtype=torch.float64)[inverse])
