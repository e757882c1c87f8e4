"""The training step of `megatron-fold train`: Megatron's own DDP, optimizer and pipeline schedules.

One global batch per step, split over data-parallel ranks and micro-batches, cut for context
parallelism by Megatron's own get_batch_on_this_cp_rank. Losses are per token
(`calculate_per_token_loss`): each rank's loss is a token sum and finalize_model_grads divides every
gradient by the global token count, so any split of the global batch over DP, CP and micro-batches
yields the gradients of one rank taking all of it. That is what lets a folded layout train exactly
as a single rank would (tests/distributed/test_whole_model.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank

__all__ = ["micro_batches", "StepResult", "Schedule", "Trainer"]


def micro_batches(tokens: torch.Tensor, micro_batch_size: int, pg_collection,
                  loss_mask: torch.Tensor | None = None) -> list[dict]:
    """This rank's micro-batches of a global batch `tokens` [sequences, seq_length + 1]: DP rank d
    takes the d-th contiguous share of the sequences, in micro-batches of `micro_batch_size`; each is
    cut for context parallelism by Megatron's own get_batch_on_this_cp_rank (sequence parallelism
    happens inside the model). `loss_mask` [sequences, seq_length] defaults to all ones."""
    dp, d = pg_collection.dp.size(), pg_collection.dp.rank()
    if tokens.shape[0] % (dp * micro_batch_size):
        raise ValueError(f"{tokens.shape[0]} sequences do not split into DP {dp} x micro-batches of "
                         f"{micro_batch_size}")
    share = tokens.shape[0] // dp
    seq = tokens.shape[1] - 1
    if loss_mask is None:
        loss_mask = torch.ones(tokens.shape[0], seq, device=tokens.device)
    out = []
    for start in range(d * share, (d + 1) * share, micro_batch_size):
        rows = tokens[start:start + micro_batch_size]
        batch = dict(tokens=rows[:, :-1].contiguous(), labels=rows[:, 1:].contiguous(),
                     loss_mask=loss_mask[start:start + micro_batch_size].float().contiguous(),
                     position_ids=torch.arange(seq, device=tokens.device).expand(rows.shape[0], seq).contiguous(),
                     cu_seqlens=None)
        if pg_collection.cp.size() > 1:
            batch = get_batch_on_this_cp_rank(batch, False, cp_group=pg_collection.cp)
        out.append(batch)
    return out


@dataclasses.dataclass
class StepResult:
    """One step over the whole global batch, as every rank sees it."""

    loss: float        # mean token loss over the global batch (before the step's update)
    grad_norm: float   # total gradient norm Megatron's optimizer computed (before clipping); nan in eval
    lr: float = float("nan")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Learning rate: linear warm-up to `lr`, then cosine (or linear / constant) decay to `min_lr`."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 0
    decay_steps: int | None = None   # None: no decay (constant after warm-up)
    decay_style: str = "cosine"
    weight_decay: float = 0.01
    clip_grad: float = 1.0


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s] token losses

    def loss_func(output_tensor):
        mask = batch["loss_mask"]
        total = (output_tensor.float() * mask).sum()
        tokens = mask.sum().to(torch.int)
        return total, tokens, {"lm loss": torch.stack([total.detach(), tokens.detach().float()])}

    return output, loss_func


class Trainer:
    """Megatron's own training step on this rank's model chunks: DistributedDataParallel,
    get_megatron_optimizer (plain or distributed), OptimizerParamScheduler, finalize_model_grads and
    the pipeline schedules (1F1B, interleaved with several chunks, or none with PP = 1)."""

    def __init__(self, chunks: list[torch.nn.Module], config, pg_collection, *, distributed_optimizer: bool = False,
                 lr: float = 1e-3, clip_grad: float = 1.0, micro_batch_size: int = 1,
                 schedule: Schedule | None = None):
        if not config.calculate_per_token_loss:
            raise ValueError("Trainer needs config.calculate_per_token_loss=True (layout-independent loss scaling)")
        schedule = schedule or Schedule(lr=lr, min_lr=lr, clip_grad=clip_grad)
        self.config, self.pg_collection, self.micro_batch_size = config, pg_collection, micro_batch_size
        self.distributed_optimizer = distributed_optimizer
        mixed = bool(config.bf16 or config.fp16)
        if mixed:
            # Megatron's mixed precision, as Megatron-LM's get_model sets it up: 16-bit weights and
            # activations in Float16Module (fp32 logits out of the last stage), gradients reduced in fp32
            # (--accumulate-allreduce-grads-in-fp32: the sum over DP must not round per layout), fp32
            # main weights in the optimizer below.
            chunks = [c if isinstance(c, Float16Module) else Float16Module(config, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer,
                                                   grad_reduce_in_fp32=mixed)
        self.model = [DistributedDataParallel(config, ddp_config, chunk, pg_collection=pg_collection)
                      for chunk in chunks]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=schedule.lr, min_lr=schedule.min_lr, clip_grad=schedule.clip_grad,
                            weight_decay=schedule.weight_decay, use_distributed_optimizer=distributed_optimizer,
                            params_dtype=config.params_dtype, bf16=config.bf16),
            self.model, pg_collection=pg_collection, use_gloo_process_groups=False)
        decay = schedule.decay_steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if schedule.warmup_steps else schedule.lr, max_lr=schedule.lr,
            min_lr=schedule.min_lr if decay else schedule.lr, lr_warmup_steps=schedule.warmup_steps,
            lr_decay_steps=max(decay or 0, schedule.warmup_steps + 1),
            lr_decay_style=schedule.decay_style if decay else "constant",
            start_wd=schedule.weight_decay, end_wd=schedule.weight_decay, wd_incr_steps=1, wd_incr_style="constant")
        config.finalize_model_grads_func = functools.partial(finalize_model_grads, pg_collection=pg_collection)
        if len(self.model) > 1:
            config.no_sync_func = [m.no_sync for m in self.model]
        vpp = len(self.model)
        self._forward_backward = get_forward_backward_func(pp_size=pg_collection.pp.size(),
                                                           vp_size=vpp if vpp > 1 else None)

    def _run(self, tokens: torch.Tensor, loss_mask: torch.Tensor | None, forward_only: bool):
        pgs, model = self.pg_collection, self.model
        device = next(model[0].parameters()).device  # batches and loss sums live where the model does
        tokens = tokens.to(device)
        loss_mask = loss_mask.to(device) if loss_mask is not None else None
        batches = micro_batches(tokens, self.micro_batch_size, pgs, loss_mask)
        iterators = [iter(batches) for _ in model]
        losses = self._forward_backward(
            forward_step_func=_forward_step, data_iterator=iterators if len(model) > 1 else iterators[0],
            model=model, num_microbatches=len(batches),
            seq_length=tokens.shape[1] - 1,  # the schedules divide it by CP (and by TP under SP) themselves
            micro_batch_size=self.micro_batch_size, forward_only=forward_only)
        total = torch.zeros(2, device=device)  # [token loss sum, tokens]
        if pgs.pp.rank() == pgs.pp.size() - 1:
            for entry in losses:
                total += entry["lm loss"]
        # Sums of the last stage over DP x CP, then from the last stage to every stage (others add 0).
        dist.all_reduce(total, group=pgs.dp_cp)
        dist.all_reduce(total, group=pgs.pp)
        return (total[0] / total[1]).item()

    def step(self, tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> StepResult:
        """One optimizer step on the global batch `tokens` [sequences, seq_length + 1]."""
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]
        loss = self._run(tokens, loss_mask, forward_only=False)
        if not math.isfinite(loss):
            # The loss is the same number on every rank (reduced over DP x CP and PP), so every rank stops
            # here, before a NaN reaches the weights: the check Megatron-LM's --check-for-nan-in-loss-and-grad
            # makes, and what stands in for the MoE router's NaN check (check_finite, off by default).
            raise FloatingPointError(f"training loss is {loss} at learning rate {lr:g}: diverged training or bad "
                                     "input; the optimizer step was not taken")
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return StepResult(loss=loss, grad_norm=float(grad_norm), lr=lr)

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> float:
        """Mean token loss of a global batch without updating anything (validation)."""
        for m in self.model:
            m.eval()
        try:
            return self._run(tokens, loss_mask, forward_only=True)
        finally:
            for m in self.model:
                m.train()
