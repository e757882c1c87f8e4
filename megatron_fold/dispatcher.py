"""FlexFoldDispatcher: moves tokens from the attention grid to their experts on the folded expert grid.

Dispatch: permute local tokens by expert -> all-to-all-v over EP -> all-gather-v over ETP -> group rows
by local expert. Combine is the exact reverse, with a reduce-scatter-v over ETP (each ETP rank holds
a partial sum of the row-parallel fc2 output). The routing probabilities travel inside the same
collectives as the hidden states (rows are packed as bytes, see comm.py), so they cost no collective.

Collectives per forward (the backward mirrors them), with EP = P and ETP = T:
- dropless / dropping: 1 all-gather of per-expert counts over ETP x EP (sizes must be known on the
  host: one synchronisation), 1 all-to-all-v over EP, and with T > 1 one all-gather-v over ETP;
  the combine: (T > 1) 1 reduce-scatter-v over ETP and 1 all-to-all-v over EP.
- drop-and-pad: the same without the count exchange; every (rank, expert) block has the static size
  `capacity.padded_tokens_per_expert(...)`, so no host synchronisation happens at all.

Nothing here touches CUDA: buffers come from the input's device; collectives run on gloo and nccl.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_fold.capacity import DropScope, padded_tokens_per_expert
from megatron_fold.comm import CommCounter, all_gather_v, all_to_all_v, reduce_scatter_v

__all__ = ["FlexFoldDispatcher"]


class FlexFoldDispatcher(MoETokenDispatcher):
    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config, pg_collection,
                 *, drop_scope: DropScope | str = DropScope.SUBSEQUENCE):
        if pg_collection is None:
            raise ValueError("FlexFoldDispatcher needs the folded ProcessGroupCollection; it never uses globals")
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.drop_scope = DropScope.parse(drop_scope)
        self.pad = bool(config.moe_pad_expert_input_to_capacity)
        if self.pad and config.moe_expert_capacity_factor is None:
            raise ValueError("moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor (the capacity to pad to)")
        if self.num_experts % self.ep_size:
            raise ValueError(f"num_moe_experts {self.num_experts} is not divisible by EP {self.ep_size}")
        self.attn_tp_size = dist.get_world_size(pg_collection.tp)
        self.cp_size = dist.get_world_size(pg_collection.cp)
        self.comm_counter = CommCounter()
        self.last_tokens_per_local_expert: torch.Tensor | None = None

    # ---- dispatch -----------------------------------------------------------------------------------
    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """Local permutation: rows ordered by global expert id (so grouped by destination EP rank)."""
        self.hidden_shape = hidden_states.shape  # [S_local, B, H]
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [N, H]
        num_tokens = hidden.shape[0]
        if routing_map.shape != (num_tokens, self.num_experts):
            raise ValueError(f"routing_map has shape {tuple(routing_map.shape)}, expected ({num_tokens}, {self.num_experts})")
        # A zero row and zero probabilities at index N serve as padding.
        hidden_ext = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[1])])
        probs_ext = torch.cat([probs, probs.new_zeros(1, probs.shape[1])])
        if self.pad:
            self.capacity = padded_tokens_per_expert(
                self.drop_scope, local_seq_len=self.hidden_shape[0], local_batch=self.hidden_shape[1],
                seq_len=self.hidden_shape[0] * self.cp_size * (self.attn_tp_size if self.config.sequence_parallel else 1),
                topk=self.topk, num_experts=self.num_experts, capacity_factor=self.config.moe_expert_capacity_factor)
            source, expert_of_row = self._padded_layout(routing_map, num_tokens)
            counts = [self.capacity] * self.num_experts
        else:
            expert_of_row, source = routing_map.t().nonzero(as_tuple=True)  # expert-major, token order inside
            counts = routing_map.sum(dim=0).tolist()  # host sync: split sizes must be known
        self._source = source  # [M] token index (N = padding) of every permuted row
        self._num_tokens = num_tokens
        self._counts = counts
        return hidden_ext.index_select(0, source), probs_ext[source, expert_of_row]

    def _padded_layout(self, routing_map: torch.Tensor, num_tokens: int):
        """Static-shape permutation: expert e owns rows [e*C, (e+1)*C); free rows point at padding."""
        cap, num_experts = self.capacity, self.num_experts
        position = routing_map.long().cumsum(dim=0) - 1  # [N, E] rank of each token inside its expert
        if routing_map.device.type == "cpu":  # a check that would cost a GPU synchronisation
            worst = int(routing_map.sum(dim=0).max()) if num_tokens else 0
            if worst > cap:
                raise ValueError(f"an expert received {worst} tokens but drop-and-pad blocks hold {cap}; "
                                 "the router must drop to capacity before padding")
        else:
            torch._assert_async((routing_map.sum(dim=0) <= cap).all(), "an expert exceeds its padded capacity")
        dest = torch.where(routing_map, torch.arange(num_experts, device=routing_map.device) * cap + position,
                           num_experts * cap)  # unrouted pairs write to a scratch slot
        source = torch.full((num_experts * cap + 1,), num_tokens, dtype=torch.long, device=routing_map.device)
        tokens = torch.arange(num_tokens, device=routing_map.device).unsqueeze(1).expand_as(dest)
        source.scatter_(0, dest.reshape(-1), tokens.reshape(-1))
        source = source[:-1]
        expert_of_row = torch.arange(num_experts, device=routing_map.device).repeat_interleave(cap)
        return source, expert_of_row

    def token_dispatch(self, hidden: torch.Tensor, probs: torch.Tensor):
        P, T, L = self.ep_size, self.tp_size, self.num_local_experts
        if self.pad:
            blocks = [[[self.capacity] * L for _ in range(P)] for _ in range(T)]
        else:
            blocks = self._exchange_counts()
        me_t = self.tp_rank
        self._blocks = blocks  # blocks[t][s][l]: rows from EP source s via ETP peer t for local expert l
        self._send = [sum(self._counts[r * L:(r + 1) * L]) for r in range(P)]
        self._recv = [sum(blocks[me_t][s]) for s in range(P)]
        self._etp_sizes = [sum(sum(blocks[t][s]) for s in range(P)) for t in range(T)]
        hidden, probs = all_to_all_v([hidden, probs], self._send, self._recv, self.ep_group, self.comm_counter)
        if T > 1:
            hidden, probs = all_gather_v([hidden, probs], self._etp_sizes, self.tp_group, self.comm_counter)
        return hidden, probs

    def _exchange_counts(self) -> list[list[list[int]]]:
        """One all-gather over ETP x EP of (etp rank, ep rank, per-expert counts) gives every split size."""
        P, T, L = self.ep_size, self.tp_size, self.num_local_experts
        mine = torch.tensor([self.tp_rank, self.ep_rank, *self._counts], dtype=torch.long, device=self._source.device)
        group_size = dist.get_world_size(self.tp_ep_group)
        if group_size == 1:
            rows = [mine]
        else:
            rows = [torch.empty_like(mine) for _ in range(group_size)]
            dist.all_gather(rows, mine, group=self.tp_ep_group)
            self.comm_counter.record("all_gather_counts", mine.numel() * mine.element_size() * (group_size - 1))
        blocks = [[None] * P for _ in range(T)]
        first = self.ep_rank * L
        for row in torch.stack(rows).tolist():
            t, s, counts = row[0], row[1], row[2:]
            blocks[t][s] = counts[first:first + L]
        return blocks

    def dispatch_postprocess(self, hidden: torch.Tensor, probs: torch.Tensor):
        """Rows arrive as [ETP peer][EP source][local expert]; the experts want [local expert][...]."""
        P, T, L = self.ep_size, self.tp_size, self.num_local_experts
        offsets, start = {}, 0
        for t in range(T):
            for s in range(P):
                for l in range(L):
                    offsets[t, s, l] = start
                    start += self._blocks[t][s][l]
        order = [torch.arange(offsets[t, s, l], offsets[t, s, l] + self._blocks[t][s][l])
                 for l in range(L) for t in range(T) for s in range(P)]
        order = torch.cat(order).to(hidden.device) if order else torch.zeros(0, dtype=torch.long, device=hidden.device)
        self._group_order = order
        tokens_per_expert = torch.tensor([sum(self._blocks[t][s][l] for t in range(T) for s in range(P)) for l in range(L)])
        if self.pad:
            self.last_tokens_per_local_expert = None  # padding rows are not tokens; the router counts real ones
        else:
            self.last_tokens_per_local_expert = tokens_per_expert.clone()
        return hidden.index_select(0, order), tokens_per_expert, probs.index_select(0, order)

    # ---- combine ------------------------------------------------------------------------------------
    def combine_preprocess(self, hidden: torch.Tensor):
        inverse = torch.empty_like(self._group_order)
        inverse[self._group_order] = torch.arange(self._group_order.numel(), device=inverse.device)
        return hidden.index_select(0, inverse)

    def token_combine(self, hidden: torch.Tensor):
        if self.tp_size > 1:
            hidden = reduce_scatter_v(hidden, self._etp_sizes, self.tp_group, self.comm_counter)
        return all_to_all_v(hidden, self._recv, self._send, self.ep_group, self.comm_counter)

    def combine_postprocess(self, hidden: torch.Tensor):
        """Sum each token's top-k expert outputs (already weighted by their probabilities)."""
        out = hidden.new_zeros(self._num_tokens + 1, hidden.shape[-1])
        out = out.index_add(0, self._source, hidden)[:-1]
        return out.view(self.hidden_shape)
