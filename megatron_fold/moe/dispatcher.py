"""FlexFoldDispatcher: moves tokens from the attention grid to their experts on the folded expert grid.

Dispatch: permute local tokens by expert -> all-to-all-v over EP -> all-gather-v over ETP -> group rows
by local expert. Combine is the exact reverse, with a reduce-scatter-v over ETP (each ETP rank holds
a partial sum of the row-parallel fc2 output). As in Megatron-Core 0.19, the experts apply the routing
probabilities themselves (SequentialMLP/MLP scale the activation by `permuted_probs`), so the combine
only sums each token's expert outputs. The probabilities travel beside the hidden states, each in
its own collective (issued together, waited on together: see comm.py for why not packed).

Collectives per forward and per backward, with EP = P and ETP = T (a group of one rank is skipped
and costs nothing), as counted in `comm_counter` under these kinds:
  dropless / dropping, forward (7): all_to_all_counts (ETP x EP), all_to_all_v x2 (EP, dispatch:
      hidden states and probabilities), all_gather_v x2 (ETP, the same two), reduce_scatter_v (ETP,
      combine), all_to_all_v (EP, combine)
  drop-and-pad, forward (6): the same without all_to_all_counts
  backward, every mode (6): all_to_all_v.backward x3, all_gather_v.backward x2, reduce_scatter_v.backward
The count exchange is the only host synchronisation (split sizes must be known on the host before an
uneven all-to-all): each rank sends every rank of its ETP x EP group the counts for that rank's
experts (L integers, plus the most and the fewest experts one of its tokens is routed to, so that a
malformed map on one rank fails the whole group; Megatron all-gathers all E counts), and one
device-to-host copy reads them with this rank's own counts. As in Megatron, the host reads them only
after the permutation is queued, in token_dispatch just before the all-to-all: the permutation is
sized for the N*K-row bound (cut to the routed rows once known; TE's fused dropless permutation is
sized N*K exactly, Megatron's contract), so nothing waits for the counts before it. Drop-and-pad needs
neither: every (rank, expert) block has the static size `capacity.padded_tokens_per_expert`, so it
runs without any host synchronisation. tests/distributed/test_host_sync_budget.py counts them
against Megatron's alltoall dispatcher.

With moe_permute_fusion and a CUDA device with Transformer Engine, the local permutation and its
inverse are TE's fused kernels (fused.py, the GPU boundary); the rows and their order are the same,
and the collectives stay ours. With moe_shared_expert_overlap, the layer hands its shared expert to
`set_shared_experts` and the dispatcher calls Megatron's overlapped stages around its all-to-alls, as
Megatron's alltoall dispatcher does (side stream on CUDA, in line elsewhere).

Received rows come grouped [ETP peer][EP source][local expert]; the experts want them per local
expert. The chunk sort is one device-side gather whose index is built on the device from the exchanged
counts (TE's moe_sort_chunks_by_index where the fused permutation runs), not a loop over T*P*L chunks.

Summation is deterministic everywhere (no atomic accumulation into a kept value): a token's expert outputs are placed in a
[tokens, topk] grid and summed in expert order, and the input gradient of the permutation is summed
the same way. Nothing here touches CUDA: buffers come from the input's device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_fold.moe import fused
from megatron_fold.moe.capacity import DropScope, padded_tokens_per_expert
from megatron_fold.moe.comm import CommCounter, all_gather_v, all_to_all_v, exchange_rows, reduce_scatter_v
from megatron_fold.moe.flags import validate_fold_moe_config

__all__ = ["FlexFoldDispatcher"]

# Padding rows carry probability -0.0: routers produce probabilities >= +0.0, so the sign bit tells a
# receiver which rows are padding (for its token counts) without exchanging counts.
_PAD_PROB = -0.0


class _TokenRows(torch.autograd.Function):
    """Tokens [N, H] <-> expert rows [M, H]; each direction is the other's backward.

    Row r belongs to token dest[r] // K, in the slot dest[r] % K of that token's (at most K) experts;
    dest[r] = N*K marks a padding row (zero input, output discarded). Gathering copies token rows;
    scattering places rows in a zeroed [N*K, H] grid and sums each token's K slots in order, which is
    deterministic on every device (an index_add over tokens would use atomics on GPUs).
    """

    @staticmethod
    def forward(ctx, to_rows: bool, t: torch.Tensor, dest: torch.Tensor, num_tokens: int, k: int, padded: bool):
        ctx.save_for_backward(dest)
        ctx.to_rows, ctx.num_tokens, ctx.k, ctx.padded = to_rows, num_tokens, k, padded
        return _gather(t, dest, k, padded) if to_rows else _scatter(t, dest, num_tokens, k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dest,) = ctx.saved_tensors
        if ctx.to_rows:
            g = _scatter(grad, dest, ctx.num_tokens, ctx.k)
        else:
            g = _gather(grad, dest, ctx.k, ctx.padded)
        return None, g, None, None, None, None


def _gather(x: torch.Tensor, dest: torch.Tensor, k: int, padded: bool) -> torch.Tensor:
    """[N, H] -> [M, H]: row r is x[dest[r] // K]; padding rows are zeros (drop-and-pad, where they
    reach the experts) or a copy of the last token (rows cut before they leave the rank)."""
    index = torch.div(dest, k, rounding_mode="floor")
    if padded:
        x = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])  # index N: the zero row
    else:
        index = index.clamp(max=max(x.shape[0] - 1, 0))
    return x.index_select(0, index)


def _scatter(rows: torch.Tensor, dest: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    """[M, H] -> [N, H]: each token's rows summed in slot order (fp32 accumulation for 16-bit types)."""
    grid = rows.new_zeros((num_tokens * k + 1, *rows.shape[1:]))  # last row: padding rows land here
    grid.index_copy_(0, dest, rows.contiguous())
    acc = torch.float32 if rows.dtype in (torch.bfloat16, torch.float16) else rows.dtype
    return grid[:-1].view(num_tokens, k, *rows.shape[1:]).sum(dim=1, dtype=acc).to(rows.dtype)


class _SortRows(torch.autograd.Function):
    """rows[index] for several row-aligned tensors; the backward gathers with the inverse permutation
    (a gather again: no index_add, whose CUDA kernel accumulates with atomics)."""

    @staticmethod
    def forward(ctx, index: torch.Tensor, inverse: torch.Tensor, *tensors: torch.Tensor):
        ctx.save_for_backward(inverse)
        return tuple(t.index_select(0, index) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        (inverse,) = ctx.saved_tensors
        return (None, None, *(g.index_select(0, inverse) for g in grads))


def _chunk_gather_index(sizes: torch.Tensor, order: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows] index that lays chunks out in `order` (output chunk j is input chunk order[j]), built on
    the device from the chunk sizes with a dozen small kernels; `rows` (their sum, known on the host)
    sizes it without a sync."""
    starts = sizes.cumsum(0) - sizes  # where each input chunk begins
    out_sizes = sizes.index_select(0, order)
    out_starts = out_sizes.cumsum(0) - out_sizes  # where each output chunk begins
    chunk = torch.repeat_interleave(out_sizes, output_size=rows)  # the output chunk of each output row
    shift = starts.index_select(0, order) - out_starts  # per output chunk: source row - output row
    return torch.arange(rows, device=sizes.device) + shift.index_select(0, chunk)


def _inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """inverse[index[j]] = j: one scatter of distinct positions (deterministic on every device)."""
    return torch.empty_like(index).scatter_(0, index, torch.arange(index.numel(), device=index.device))


class _ChunkSort:
    """The dispatcher's chunk sort: received rows [t][s][l] <-> expert order [l][t][s] (dropless and
    dropping; drop-and-pad blocks have one static size and are sorted by a transpose instead).

    One device-side gather per direction, its index built on the device from the exchanged counts, as
    Megatron's sort_chunks_by_idxs does it with TE (moe_sort_chunks_by_index, used here too when the
    fused permutation runs); Megatron's unfused version splits and concatenates T*P*L chunks in Python.
    """

    def __init__(self, counts: torch.Tensor, rows: int, fused_sort: bool):
        T, P, L = counts.shape
        self.arrived_sizes = counts.reshape(-1)  # chunk (t, s, l) at (t*P + s)*L + l
        self.to_expert_order, self.to_arrival_order = _chunk_orders(T * P, L, counts.device)
        self.fused = fused_sort
        if fused_sort:
            self.expert_sizes = counts.reshape(T * P, L).t().reshape(-1)  # chunk (l, t, s) at l*T*P + t*P + s
        else:
            self.index = _chunk_gather_index(self.arrived_sizes, self.to_expert_order, rows)
            self.inverse = _inverse_permutation(self.index)

    def to_experts(self, hidden: torch.Tensor, probs: torch.Tensor):
        if self.fused:
            return fused.sort_chunks(hidden, self.arrived_sizes, self.to_expert_order, probs)
        return _SortRows.apply(self.index, self.inverse, hidden, probs)

    def from_experts(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused.sort_chunks(hidden, self.expert_sizes, self.to_arrival_order)[0]
        return _SortRows.apply(self.inverse, self.index, hidden)[0]


_ORDERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _chunk_orders(sources: int, local_experts: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(arrival -> expert order, expert -> arrival order) of the chunks: static for a layout, made once
    per device (as Megatron's dispatcher makes its sort_input_by_local_experts at construction)."""
    key = (sources, local_experts, str(device))
    if key not in _ORDERS:
        chunks = torch.arange(sources * local_experts, device=device)
        _ORDERS[key] = (chunks.view(sources, local_experts).t().reshape(-1),
                        chunks.view(local_experts, sources).t().reshape(-1))
    return _ORDERS[key]


class FlexFoldDispatcher(MoETokenDispatcher):
    """Megatron's token-dispatcher interface on folded groups (pg_collection.ep / expt_tp / tp_ep).

    After a dispatch, `last_tokens_per_local_expert` [L] holds the rows each local expert received,
    padding excluded (a CPU tensor; with drop-and-pad a tensor on the input's device, so that reading
    it stays the caller's choice of synchronisation). `comm_counter` accumulates every collective of
    forward and backward until reset.
    """

    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config, pg_collection,
                 *, drop_scope: DropScope | str = DropScope.SUBSEQUENCE):
        if pg_collection is None:
            raise ValueError("FlexFoldDispatcher needs the folded ProcessGroupCollection; it never uses globals")
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        if self.num_experts is None or self.num_experts % self.ep_size:
            raise ValueError(f"num_moe_experts {self.num_experts} must be divisible by EP {self.ep_size}")
        L = self.num_experts // self.ep_size
        expected = list(range(self.ep_rank * L, (self.ep_rank + 1) * L))
        if num_local_experts != L or self.local_expert_indices != expected:
            raise ValueError(
                f"EP rank {self.ep_rank} of {self.ep_size} holds experts {expected[0]}..{expected[-1]} "
                f"({L} of {self.num_experts}); got num_local_experts={num_local_experts}, "
                f"local_expert_indices={self.local_expert_indices}")
        validate_fold_moe_config(config, drop_scope)
        self.drop_scope = DropScope.parse(drop_scope)
        self.pad = bool(config.moe_pad_expert_input_to_capacity)
        # Width of the rows the dispatcher moves: the hidden size, or the latent size where MoELayer
        # projects into a latent space before dispatching (moe_latent_size).
        self.hidden_size = config.moe_latent_size or config.hidden_size
        self.attn_tp_size = dist.get_world_size(pg_collection.tp)
        self.cp_size = dist.get_world_size(pg_collection.cp)
        self._check_tp_ep_order(pg_collection)
        self.comm_counter = CommCounter()
        self.last_tokens_per_local_expert: torch.Tensor | None = None

    def _check_tp_ep_order(self, pgs) -> None:
        """The count exchange addresses ETP x EP rank (t, p) as group rank t + T*p (ETP fastest, as
        Megatron's expert rank generator orders it and its alltoall dispatcher assumes)."""
        T = self.tp_size
        order = dist.get_process_group_ranks(self.tp_ep_group)
        where = {g: i for i, g in enumerate(order)}
        wrong = [(g, where.get(g), self.tp_rank + T * p) for p, g in enumerate(dist.get_process_group_ranks(self.ep_group))
                 if where.get(g) != self.tp_rank + T * p]
        wrong += [(g, where.get(g), t + T * self.ep_rank) for t, g in enumerate(dist.get_process_group_ranks(self.tp_group))
                  if where.get(g) != t + T * self.ep_rank]
        if len(order) != T * self.ep_size or wrong:
            raise ValueError(
                f"pg_collection.tp_ep {order} is not the ETP x EP grid with ETP varying fastest "
                f"(ETP {T}, EP {self.ep_size}); (global rank, position, expected): {wrong}")

    # ---- dispatch -----------------------------------------------------------------------------------
    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """Local permutation: one row per routed (token, expert) pair, ordered by expert (hence by
        destination EP rank), tokens in order inside an expert. Returns ([M, H], [M]).

        hidden_states [S_local, B, H], or [N, H] (tokens without a sequence axis, dispatched as
        [N, 1, H]; refused for sequence-scope drop-and-pad, whose static block size needs S and B)."""
        E, K = self.num_experts, self.topk
        self._check_input(hidden_states)
        self.hidden_shape = hidden_states.shape  # [S_local, B, H] or [N, H]
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [N, H]
        N = hidden.shape[0]
        if routing_map.shape != (N, E) or routing_map.dtype != torch.bool:
            raise ValueError(f"routing_map must be a bool tensor [tokens, experts] = [{N}, {E}], got "
                             f"{routing_map.dtype} {list(routing_map.shape)}")
        if probs.shape != (N, E):
            raise ValueError(f"probs must be [tokens, experts] = [{N}, {E}], got {list(probs.shape)}")
        self._num_tokens = N
        if self.shared_experts is not None:
            # moe_shared_expert_overlap: the shared expert's input gather starts on its side stream
            # (Megatron's SharedExpertMLP stages; synchronous where there is no CUDA stream).
            self.shared_experts.pre_forward_comm(hidden_states)
        self._splits_on_host = None
        if self.pad:
            # Drop-and-pad: every block has its static size, no count exchange, no host synchronisation.
            self._fused = fused.permute_fusion(self.config, hidden, padded=True)  # always the portable path
            pair = self._padded_pairs(routing_map)  # [E*C]
            return self._permute(hidden, probs, routing_map, pair)
        # The count exchange is queued first, then the permutation; the host reads the counts only
        # in token_dispatch, right before the all-to-all that needs them (Megatron's order: its
        # device-to-host copy overlaps permutation 1, its event wait comes before the EP all-to-all).
        self._queue_count_exchange(routing_map)
        dropless = self.config.moe_expert_capacity_factor is None
        # Fused dropless: Megatron's contract, every token goes to exactly top-k experts, so TE's output
        # has N*K rows before any count is known (checked on the ETP x EP group when the counts arrive).
        num_out = N * K if dropless else None
        self._fused = fused.permute_fusion(self.config, hidden, padded=False)
        if self._fused:
            if num_out is None:  # TE sizes its output from num_out_tokens: it must be exact
                num_out = sum(self._read_splits())
            # TE >= 2.15 asserts num_out_tokens > 0 in its fused permute: a rank left without tokens
            # (all dropped, or an empty micro-batch) permutes with the portable path (no rows either way).
            self._fused = fused.fused_permute_can_run(num_out)
        if self._fused:
            self._routing_map = routing_map
            permuted, permuted_probs, self._row_id_map = fused.fused_permute(hidden, probs, routing_map, num_out)
            return permuted, permuted_probs
        # Portable path: the routed rows are at most N*K (fewer where tokens were dropped, or a map routes
        # a token to fewer experts); the permutation is queued for that bound (rows past the routed ones
        # land in the combine's spare slot) and cut to the routed count once known, in token_dispatch.
        return self._permute(hidden, probs, routing_map, self._routed_pairs(routing_map, N * K))

    def _permute(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor, pair: torch.Tensor):
        """Rows [M, H] and probabilities [M] of the (token, expert) pairs `pair` (token*E + expert;
        pair N*E is padding), and where each row lands in the combine's [N, K] grid."""
        N, E, K = routing_map.shape[0], self.num_experts, self.topk
        # Each row's slot: its token, and its rank among the token's experts (ascending expert id).
        # Pair N*E is padding (grid index N*K, the combine's spare slot).
        slot = routing_map.cumsum(dim=1) - 1  # [N, E]
        grid = torch.arange(N, device=slot.device).unsqueeze(1) * K + slot
        self._dest = torch.cat([grid.reshape(-1), grid.new_full((1,), N * K)]).index_select(0, pair)  # [M]
        probs_ext = torch.cat([probs.reshape(-1), probs.new_full((1,), _PAD_PROB)])
        permuted_probs = probs_ext.index_select(0, pair)  # [M]
        permuted = _TokenRows.apply(True, hidden, self._dest, N, K, self.pad)  # [M, H]
        return permuted, permuted_probs

    def _check_input(self, hidden_states: torch.Tensor) -> None:
        shape = tuple(hidden_states.shape)
        if hidden_states.dim() not in (2, 3) or shape[-1] != self.hidden_size:
            raise ValueError(f"FlexFoldDispatcher expects hidden states [seq_local, batch, hidden={self.hidden_size}] "
                             f"or [tokens, hidden={self.hidden_size}], got shape {shape}")
        if hidden_states.dim() == 2 and self.pad and self.drop_scope is DropScope.SEQUENCE:
            raise ValueError(
                f"FlexFoldDispatcher got hidden states [tokens, hidden] = {list(shape)} without a sequence axis, "
                "but drop_scope='sequence' with moe_pad_expert_input_to_capacity=True sizes each padded expert "
                "block from the local sequence length and batch: pass [seq_local, batch, hidden]")

    def _routed_pairs(self, routing_map: torch.Tensor, bound: int) -> torch.Tensor:
        """[bound] flat (token*E + expert) index of every routed pair, expert-major (tokens ascending
        inside an expert), then padding pairs (N*E) up to `bound`: a static size, no synchronisation."""
        N, E = routing_map.shape
        expert_major = routing_map.t().reshape(-1)  # [E*N]
        index = torch.nonzero_static(expert_major, size=bound, fill_value=E * N).squeeze(1)
        expert, token = torch.div(index, N, rounding_mode="floor"), index % N
        return torch.where(index == E * N, N * E, token * E + expert)

    def _queue_count_exchange(self, routing_map: torch.Tensor) -> None:
        """Start the exchange of per-expert counts over ETP x EP (no host synchronisation here)."""
        N = routing_map.shape[0]
        counts = routing_map.sum(dim=0)  # [E] int64
        per_token = routing_map.sum(dim=1)  # [N]
        # The widest and the narrowest token travel with the counts, so a bad map on one rank stops
        # every rank of the ETP x EP group at the sync instead of leaving its peers blocked in the
        # all-to-all that follows. (The fused dropless permutation is sized for exactly top-k a token.)
        if N:
            widest = torch.stack([per_token.amax(), -per_token.amin()])  # [2]
        else:
            widest = torch.full((2,), -self.topk, dtype=counts.dtype, device=counts.device)
        received, group_widest = self._exchange_counts(counts, widest)  # [T, P, L], [2]
        self._received_counts = received  # on the device: the chunk sort's sizes, no host copy needed
        self._pending_counts = torch.cat([counts, received.reshape(-1), widest, group_widest])

    def _read_splits(self) -> list[int]:
        """The one host synchronisation of a dropless / dropping dispatch: read the exchanged counts,
        check them, set the split sizes. Returns the rows this rank sends to each expert."""
        if self._splits_on_host is not None:
            return self._splits_on_host
        E, P, L, T, K = self.num_experts, self.ep_size, self.num_local_experts, self.tp_size, self.topk
        host = self._pending_counts.tolist()  # the one host synchronisation
        own, received = host[:E], host[E:E + T * P * L]
        (mine, mine_narrowest), (widest, narrowest) = host[-4:-2], host[-2:]
        mine_narrowest, narrowest = -mine_narrowest, -narrowest
        if widest > K:
            raise ValueError(f"a token is routed to {widest} experts but moe_router_topk is {K} "
                             f"({mine} on this rank, {widest} on the ranks of its ETP x EP group)")
        if self.config.moe_permute_fusion and self.config.moe_expert_capacity_factor is None and narrowest < K:
            # Decided from the config and group-wide numbers, so every rank of the group raises together.
            raise ValueError(f"dropless MoE with moe_permute_fusion=True sizes Transformer Engine's permutation for "
                             f"exactly moe_router_topk={K} experts a token (as Megatron's alltoall dispatcher does), "
                             f"but a token is routed to {narrowest} ({mine_narrowest} on this rank, {narrowest} on the "
                             "ranks of its ETP x EP group); route every token to top-k experts or set "
                             "moe_permute_fusion=False")
        self._set_splits(own, [[received[(t * P + s) * L:(t * P + s + 1) * L] for s in range(P)] for t in range(T)])
        self._splits_on_host = own
        return own

    def _exchange_counts(self, counts: torch.Tensor, widest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One all-to-all over ETP x EP: rank (t, p) receives, from every (t', s), the L counts of
        the tokens (t', s) routes to p's experts, and (s's widest token, minus its narrowest token).
        -> ([T, P, L], [2] the group's maxima) on the counts' device."""
        P, L, T = self.ep_size, self.num_local_experts, self.tp_size
        if T * P == 1:
            return counts.view(1, 1, L), widest
        rows = torch.cat([counts.view(P, L), widest.expand(P, 2)], dim=1)  # [P, L+2]
        send = rows.view(P, 1, L + 2).expand(P, T, L + 2).reshape(P * T, L + 2)  # row t + T*p -> rank t + T*p
        (recv,) = exchange_rows([send], [1] * (T * P), [1] * (T * P), self.tp_ep_group, self.comm_counter,
                                "all_to_all_counts")
        recv = recv.view(P, T, L + 2).transpose(0, 1)
        return recv[..., :L], recv[..., L:].reshape(-1, 2).amax(dim=0)

    def _padded_pairs(self, routing_map: torch.Tensor) -> torch.Tensor:
        """Static layout: expert e owns rows [e*C, (e+1)*C); free rows point at padding (pair N*E)."""
        N, E, C = routing_map.shape[0], self.num_experts, self._capacity()
        # Checked on the device, without a host synchronisation (on a CPU it raises right here).
        torch._assert_async((routing_map.sum(dim=0) <= C).all(),
                            f"FlexFoldDispatcher: an expert received more tokens than the drop-and-pad blocks hold ({C}) "
                            f"(drop scope {self.drop_scope.value}, capacity factor {self.config.moe_expert_capacity_factor}); "
                            "the router must drop to capacity first")
        torch._assert_async((routing_map.sum(dim=1) <= self.topk).all(),
                            f"FlexFoldDispatcher: a token is routed to more experts than moe_router_topk={self.topk}")
        position = routing_map.cumsum(dim=0) - 1  # [N, E] rank of each token inside its expert
        experts = torch.arange(E, device=routing_map.device)
        row = torch.where(routing_map, experts * C + position, E * C)  # unrouted pairs -> scratch row E*C
        pair = torch.full((E * C + 1,), N * E, dtype=torch.long, device=routing_map.device)
        pair.scatter_(0, row.reshape(-1), torch.arange(N * E, device=routing_map.device))
        L, P, T = self.num_local_experts, self.ep_size, self.tp_size
        self._set_splits([C] * E, [[[C] * L for _ in range(P)] for _ in range(T)])
        return pair[:-1]

    def _capacity(self) -> int:
        # [N, H] input is one sequence of N local tokens (subsequence scope; sequence scope refuses it).
        S, B = (self.hidden_shape[0], self.hidden_shape[1]) if len(self.hidden_shape) == 3 else (self.hidden_shape[0], 1)
        seq_len = S * self.cp_size * (self.attn_tp_size if self.config.sequence_parallel else 1)
        return padded_tokens_per_expert(self.drop_scope, local_seq_len=S, seq_len=seq_len, local_batch=B,
                                        topk=self.topk, num_experts=self.num_experts,
                                        capacity_factor=self.config.moe_expert_capacity_factor)

    def _set_splits(self, own: list[int], blocks: list[list[list[int]]]) -> None:
        """own[e]: rows this rank sends to expert e; blocks[t][s][l]: rows for local expert l that
        EP source s sends ETP peer t (this rank is t = tp_rank)."""
        P, T, L = self.ep_size, self.tp_size, self.num_local_experts
        self._blocks = blocks
        self._send = [sum(own[p * L:(p + 1) * L]) for p in range(P)]  # EP all-to-all
        self._recv = [sum(blocks[self.tp_rank][s]) for s in range(P)]
        self._etp_sizes = [sum(sum(blocks[t][s]) for s in range(P)) for t in range(T)]  # ETP all-gather

    def token_dispatch(self, hidden: torch.Tensor, probs: torch.Tensor):
        if self.shared_experts is not None:
            # As Megatron's alltoall dispatcher: the side stream catches up with the permutation, then
            # the shared expert's fc1 is launched right after the all-to-all and overlaps it.
            self.shared_experts.wait_current_stream()
        if not self.pad:
            rows = sum(self._read_splits())  # the host waits here, with the permutation already queued
            if hidden.shape[0] != rows:  # the portable dropping path permuted for the N*K bound
                hidden, probs = hidden[:rows], probs[:rows]
                self._dest = self._dest[:rows]
        hidden, probs = all_to_all_v([hidden, probs], self._send, self._recv, self.ep_group, self.comm_counter)
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act(hidden)
        return tuple(all_gather_v([hidden, probs], self._etp_sizes, self.tp_group, self.comm_counter))

    def dispatch_postprocess(self, hidden: torch.Tensor, probs: torch.Tensor):
        """Rows arrive as [ETP peer t][EP source s][local expert l]; the experts want [l][t][s].
        Returns (rows [M', H], tokens_per_expert [L] on the CPU as SequentialMLP splits it, probs [M'])."""
        P, T, L = self.ep_size, self.tp_size, self.num_local_experts
        per_expert = [sum(self._blocks[t][s][l] for t in range(T) for s in range(P)) for l in range(L)]
        tokens_per_expert = torch.tensor(per_expert, dtype=torch.long)
        self._chunk_sort = None
        if L > 1 and T * P > 1:  # otherwise the rows already are in [l][t][s] order
            if self.pad:
                C = self._blocks[0][0][0]
                hidden = hidden.view(T * P, L, C, *hidden.shape[1:]).transpose(0, 1).reshape(hidden.shape)
                probs = probs.view(T * P, L, C).transpose(0, 1).reshape(-1)
            else:
                self._chunk_sort = _ChunkSort(self._received_counts, hidden.shape[0], self._use_fused_sort(hidden))
                hidden, probs = self._chunk_sort.to_experts(hidden, probs)
        if self.pad:  # real rows only: padding carries probability -0.0
            real = ~((probs == 0) & torch.signbit(probs))
            self.last_tokens_per_local_expert = real.view(L, -1).sum(dim=1)
        else:
            self.last_tokens_per_local_expert = tokens_per_expert.clone()
        return hidden, tokens_per_expert, probs

    def _use_fused_sort(self, hidden: torch.Tensor) -> bool:
        """TE's moe_sort_chunks_by_index where the fused permutation runs (Megatron's alltoall dispatcher
        couples the two the same way: moe_permute_fusion sorts its chunks with TE too)."""
        return fused.permute_fusion(self.config, hidden, padded=False)

    # ---- combine ------------------------------------------------------------------------------------
    def combine_preprocess(self, hidden: torch.Tensor):
        """[local expert l][t][s] -> [t][s][l], the order the reduce-scatter and all-to-all expect."""
        P, T, L = self.ep_size, self.tp_size, self.num_local_experts
        if L == 1 or T * P == 1:
            return hidden
        if self.pad:
            C = self._blocks[0][0][0]
            return hidden.view(L, T * P, C, *hidden.shape[1:]).transpose(0, 1).reshape(hidden.shape)
        return self._chunk_sort.from_experts(hidden)

    def token_combine(self, hidden: torch.Tensor):
        hidden = reduce_scatter_v(hidden, self._etp_sizes, self.tp_group, self.comm_counter)
        if self.shared_experts is not None:
            # The shared expert's fc2 overlaps the combine all-to-all, not the routed experts' GEMMs.
            self.shared_experts.wait_current_stream()
        hidden = all_to_all_v(hidden, self._recv, self._send, self.ep_group, self.comm_counter)
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2_forward(hidden)
            self.shared_experts.post_forward_comm()
        return hidden

    def combine_postprocess(self, hidden: torch.Tensor):
        """Sum each token's expert outputs (the experts already weighted them by their probabilities),
        then add the overlapped shared expert's output (moe_shared_expert_overlap)."""
        if self._fused:
            out = fused.fused_unpermute(hidden, self._row_id_map, self._routing_map, self._num_tokens)  # [N, H]
        else:
            out = _TokenRows.apply(False, hidden, self._dest, self._num_tokens, self.topk, self.pad)  # [N, H]
        out = out.view(*self.hidden_shape[:-1], hidden.shape[-1])
        if self.shared_experts is not None:
            out = out + self.shared_experts.get_output()  # waits for the side stream (Megatron's stage)
        return out
