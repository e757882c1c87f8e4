"""One rank's part of `megatron-fold train`: folded groups, model, data, steps, validation, checkpoints.

Every rank runs `run_job(rank, world_size, spec)`; the spec has been validated before any rank started
(command.py), so what can fail here is what only the ranks can see. Rank 0 writes metrics.jsonl and
draws the progress bar.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch
import torch.distributed as dist

from megatron_fold import FoldedLayout, checkpointing, models, parallel_state
from megatron_fold.train import silence_library_noise
from megatron_fold.train import data as data_mod
from megatron_fold.train.loop import Schedule, Trainer
from megatron_fold.train.metrics import MetricsWriter, MoEMetrics

__all__ = ["JobSpec", "folded_layout", "run_job"]


@dataclasses.dataclass
class JobSpec:
    """Everything a rank needs; picklable (it crosses fork and is compared between layouts)."""

    family: str
    config_overrides: dict
    layout: dict                      # tp cp pp ep etp (FoldedLayout) + vpp, mbs
    drop_scope: str
    vocab_size: int                   # padded for TP
    seq_length: int
    global_batch: int
    steps: int
    schedule: Schedule
    out_dir: str
    data_prefix: str | None = None    # None: Megatron's mock dataset
    tokenizer: str | None = None      # None: bytes
    cache_dir: str = ""
    seed: int = 1234
    eval_interval: int = 0            # 0: validate only at the end
    eval_batches: int = 2
    log_interval: int = 1             # MoE metrics every N steps (a small collective)
    # Megatron's distributed optimizer (sharded over DP x CP; one shard at DP x CP = 1), or the plain one.
    # Always the same kind, whatever the layout: Megatron cannot load one kind's checkpoint into the other.
    distributed_optimizer: bool = True
    save: str | None = None
    load: str | None = None
    init_checkpoint: str | None = None  # load model weights only (same initial weights across layouts)
    save_initial: str | None = None     # save the initial model weights there before the first step
    progress: bool = True
    quiet: bool = True                  # silence Megatron's deprecation notices and library warnings
    title: str = ""
    rotary_base: float = 10000.0        # RoPE base (a Hugging Face config's rope_theta)

    @property
    def mbs(self) -> int:
        return self.layout.get("mbs", 1)

    @property
    def vpp(self) -> int | None:
        vpp = self.layout.get("vpp", 1)
        return vpp if vpp > 1 else None

    def folded_layout(self, world_size: int) -> FoldedLayout:
        return folded_layout(world_size, self.layout)


def folded_layout(world_size: int, layout: dict) -> FoldedLayout:
    """The FoldedLayout of a `--layout` dictionary (its vpp and mbs keys are not grid sizes)."""
    return FoldedLayout(world_size, **{k: v for k, v in layout.items() if k in ("tp", "cp", "pp", "ep", "etp")})


def _grids(layout: FoldedLayout) -> str:
    return (f"attention TP{layout.tp} CP{layout.cp} DP{layout.dp} PP{layout.pp}, "
            f"experts ETP{layout.etp} EP{layout.ep} EDP{layout.edp} PP{layout.pp}")


def _enable_cpu_mode_if_needed():
    if not torch.cuda.is_available():
        from megatron_fold import cpu

        cpu.enable_cpu_mode()


def run_job(rank: int, world_size: int, spec: JobSpec) -> dict | None:
    """Train as `spec` says; returns the summary on rank 0 (None elsewhere)."""
    if spec.quiet:
        silence_library_noise()
    _enable_cpu_mode_if_needed()
    from megatron.core import tensor_parallel

    layout = spec.folded_layout(world_size)
    pgs = parallel_state.initialize_model_parallel(layout, virtual_pipeline_model_parallel_size=spec.vpp)
    try:
        return _train(rank, layout, pgs, spec, tensor_parallel)
    finally:
        parallel_state.destroy_model_parallel()


def _train(rank, layout, pgs, spec: JobSpec, tensor_parallel) -> dict | None:
    torch.manual_seed(spec.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(spec.seed)
    config = models.model_config(spec.family, layout, virtual_pipeline_stages=spec.vpp,
                                 calculate_per_token_loss=True, **spec.config_overrides)
    chunks = models.build_model(config, pgs, vocab_size=spec.vocab_size, seq_length=spec.seq_length,
                                rotary_base=spec.rotary_base,
                                drop_scope=spec.drop_scope)
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]

    dist_opt = spec.distributed_optimizer
    trainer = Trainer(chunks, config, pgs, distributed_optimizer=dist_opt, micro_batch_size=spec.mbs,
                      schedule=spec.schedule)
    start, stored_samples = 0, 0
    if spec.load:
        extra = checkpointing.load(spec.load, trainer.model, trainer.optimizer, pgs, config=config,
                                   vocab_size=spec.vocab_size)
        start, stored_samples = int(extra.get("iteration", 0)), int(extra.get("train_samples", 0))
        for _ in range(start):  # the LR schedule is a function of the step
            trainer.scheduler.step(increment=1)
    elif spec.init_checkpoint:
        checkpointing.load(spec.init_checkpoint, trainer.model, None, pgs, config=config, vocab_size=spec.vocab_size)
        trainer.optimizer.reload_model_params()  # fp16/bf16: the optimizer's fp32 copies follow the loaded weights
    if spec.save_initial:
        checkpointing.save(spec.save_initial, trainer.model, None, pgs, config=config, vocab_size=spec.vocab_size,
                           extra={"iteration": 0, "layout": str(layout)})

    tokenizer = data_mod.load_tokenizer(spec.tokenizer)
    # GPTDataset's shuffle depends on how many samples are asked for (epochs, a separate last epoch):
    # a resumed run asks for what the checkpointed run asked for, so its batches continue that order.
    needed = (start + spec.steps) * spec.global_batch
    train_samples = max(needed, stored_samples)
    if rank == 0 and stored_samples and needed > stored_samples:
        print(f"megatron-fold: note: this run needs {needed} training samples, more than the {stored_samples} "
              "the checkpointed run planned; the sample order differs from an uninterrupted run", flush=True)
    datasets = data_mod.build_datasets(
        spec.data_prefix, tokenizer, seq_length=spec.seq_length, train_samples=train_samples,
        valid_samples=max(spec.eval_batches * spec.global_batch, 1), seed=spec.seed, cache_dir=spec.cache_dir)
    def batch(dataset, index):  # on the CPU; Trainer moves it to the model's device
        return data_mod.global_batch(dataset, index, spec.global_batch)

    def validate() -> float | None:
        """The same validation batches every time, so the validation curve compares like with like."""
        if datasets.valid is None or spec.eval_batches == 0:
            return None
        losses = [trainer.evaluate(*batch(datasets.valid, i)) for i in range(spec.eval_batches)]
        return sum(losses) / len(losses)

    writer = MetricsWriter(os.path.join(spec.out_dir, "metrics.jsonl"), append=bool(spec.load)) if rank == 0 else None
    bar = None
    if rank == 0 and spec.progress:
        from tqdm import tqdm

        bar = tqdm(total=spec.steps, desc=spec.title or "train", unit="step", dynamic_ncols=True)
    records = []
    dropped_shown = "-"
    moe_metrics = MoEMetrics(chunks)
    tokens_per_step = spec.global_batch * spec.seq_length
    try:
        for step in range(start, start + spec.steps):
            tokens, mask = batch(datasets.train, step)
            last = step == start + spec.steps - 1
            logging_step = (step - start) % spec.log_interval == 0 or last
            if logging_step:
                moe_metrics.arm()
            t0 = time.perf_counter()
            result = trainer.step(tokens, mask)
            elapsed = time.perf_counter() - t0
            moe = moe_metrics.collect(pgs) if logging_step else None
            valid = None
            if (spec.eval_interval and (step + 1) % spec.eval_interval == 0) or last:
                valid = validate()
            if spec.save and last:
                checkpointing.save(spec.save, trainer.model, trainer.optimizer, pgs, config=config,
                                   vocab_size=spec.vocab_size,
                                   extra={"iteration": step + 1, "layout": str(layout), "train_samples": train_samples,
                                          "distributed_optimizer": dist_opt,
                                          "lr_decay_steps": spec.schedule.decay_steps,
                                          "warmup_steps": spec.schedule.warmup_steps})
            if rank == 0:
                record = dict(step=step, loss=result.loss, grad_norm=result.grad_norm, lr=result.lr,
                              tokens_per_s=tokens_per_step / elapsed, step_time_s=elapsed,
                              valid_loss=valid, moe=moe)
                writer.write(record)
                records.append(record)
                if bar is not None:
                    if moe:  # the latest logging step's mean drop fraction over layers
                        dropped_shown = f"{100 * sum(m['dropped_fraction'] for m in moe.values()) / len(moe):.1f}%"
                    bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{tokens_per_step / elapsed:.0f}",
                                    dropped=dropped_shown)
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    if rank != 0:
        return None
    speeds = [r["tokens_per_s"] for r in records[1:]] or [r["tokens_per_s"] for r in records]
    valid_losses = [r["valid_loss"] for r in records if r.get("valid_loss") is not None]
    return dict(records=records, first_loss=records[0]["loss"], final_loss=records[-1]["loss"],
                final_valid_loss=valid_losses[-1] if valid_losses else None,
                tokens_per_s=sum(speeds) / len(speeds), world_size=dist.get_world_size(), layout=_grids(layout),
                distributed_optimizer=dist_opt)
