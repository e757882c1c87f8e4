"""Per-step records of `megatron-fold train` (metrics.jsonl), and the MoE part of them.

One JSON object per line:
  step, loss, grad_norm, lr, tokens_per_s, step_time_s, valid_loss (when validation ran at that step),
  moe: {layer (1-based global layer number): {tokens_per_expert, dropped_fraction, max_over_mean_load,
        bytes_sent: {collective: bytes}}}
MoE figures cover every micro-batch of the step (the whole global batch): tokens per expert after
dropping, summed over data-parallel replicas; bytes each collective kind sent (forward and backward,
e.g. `dispatcher.all_to_all_v.backward`), summed over every rank of the layer's pipeline stage.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from megatron_fold.moe.layer import FoldMoELayer

__all__ = ["RECORD_KEYS", "MoEMetrics", "MetricsWriter", "loss_agreement", "read_metrics"]

RECORD_KEYS = ("step", "loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "moe")


class MoEMetrics:
    """Token counts and bytes of every FoldMoELayer over ALL micro-batches of an armed step.

    A forward hook reads each layer's metrics after every micro-batch while armed (its first read
    all-reduces 2 x E counts over the layer's TP x CP group, whose ranks run the same micro-batches),
    so a step's figures cover the whole global batch whatever the micro-batching, and agree between
    layouts with sequence-scope dropping. `collect` merges them on global rank 0.
    """

    def __init__(self, chunks):
        self.layers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, FoldMoELayer)]
        self._armed = False
        self._acc: dict[int, dict] = {}
        for layer in self.layers:
            layer.register_forward_pre_hook(self._before_forward)
            layer.register_forward_hook(self._after_forward)

    def arm(self) -> None:
        self._armed, self._acc = True, {}
        for layer in self.layers:  # what earlier steps sent is not this step's
            for counter in layer.comm_counters().values():
                counter.reset()

    def _entry(self, layer) -> dict:
        return self._acc.setdefault(layer.layer_number, {"before": 0.0, "after": None, "bytes_sent": {}})

    def _harvest_bytes(self, layer) -> None:
        """Add what the layer's counters hold to the step's bytes. Each forward resets the counters,
        and backward passes of earlier micro-batches record into them between forwards, so they are
        read before every forward and once more when the step ends."""
        sent = self._entry(layer)["bytes_sent"]
        for source, counter in layer.comm_counters().items():
            for kind, n in counter.bytes_sent.items():
                sent[f"{source}.{kind}"] = sent.get(f"{source}.{kind}", 0) + n

    def _before_forward(self, module, args) -> None:
        if self._armed and torch.is_grad_enabled():
            self._harvest_bytes(module)

    def _after_forward(self, module, inputs, output) -> None:
        if not self._armed or not torch.is_grad_enabled():  # training forwards only, not validation
            return
        before, after = module.router.token_counts()
        acc = self._entry(module)
        acc["before"] += float(before.sum())
        acc["after"] = after.clone() if acc["after"] is None else acc["after"] + after

    def collect(self, pg_collection) -> dict[str, dict] | None:
        """Collective over the world: the armed step's figures per layer on rank 0 (None elsewhere)."""
        for layer in self.layers:
            if layer.layer_number in self._acc:
                self._harvest_bytes(layer)  # the last micro-batch's forward and the backwards since
        self._armed = False
        first_of_replica = pg_collection.tp_cp.rank() == 0  # one token report per data-parallel replica
        mine = [(layer, first_of_replica, acc["before"], [int(t) for t in acc["after"].tolist()], acc["bytes_sent"])
                for layer, acc in self._acc.items()]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if dist.get_rank() != 0:
            return None
        merged: dict[int, dict] = {}
        for reports in everyone:
            for layer, counts_tokens, routed, tokens, sent in reports:
                entry = merged.setdefault(layer, {"tokens_per_expert": [0] * len(tokens), "_routed": 0.0,
                                                  "bytes_sent": {}})
                if counts_tokens:
                    entry["tokens_per_expert"] = [a + b for a, b in zip(entry["tokens_per_expert"], tokens)]
                    entry["_routed"] += routed
                for kind, n in sent.items():
                    entry["bytes_sent"][kind] = entry["bytes_sent"].get(kind, 0) + n
        for entry in merged.values():
            routed = entry.pop("_routed")
            tokens = entry["tokens_per_expert"]
            entry["dropped_fraction"] = 1.0 - sum(tokens) / routed if routed else 0.0
            mean = sum(tokens) / len(tokens)
            entry["max_over_mean_load"] = max(tokens) / mean if mean else 0.0
        return {str(layer): merged[layer] for layer in sorted(merged)}  # JSON object keys are strings


class MetricsWriter:
    """Appends one JSON record per step to `path` (rank 0 only), flushed so a killed job keeps its records."""

    def __init__(self, path: str, append: bool = False):
        self.path = path
        self._f = open(path, "a" if append else "w")

    def write(self, record: dict) -> None:
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise ValueError(f"metrics record lacks {missing}")
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def loss_agreement(runs: dict[str, list[dict]], rtol: float = 1e-5) -> tuple[list[float], int]:
    """Per step, the relative spread of the compared runs' losses, and the first step whose spread
    exceeds `rtol` (the number of steps when none does)."""
    losses = [[r["loss"] for r in records] for records in runs.values()]
    relative = [(max(col) - min(col)) / abs(min(col)) for col in zip(*losses)]
    parted = next((i for i, d in enumerate(relative) if d > rtol), len(relative))
    return relative, parted


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
