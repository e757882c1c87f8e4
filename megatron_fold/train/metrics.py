"""Per-step records of `megatron-fold train` (metrics.jsonl), and the MoE part of them.

One JSON object per line:
  step, loss, grad_norm, lr, tokens_per_s, step_time_s, valid_loss (when validation ran at that step),
  moe: {layer (1-based global layer number): {tokens_per_expert, dropped_fraction, max_over_mean_load,
        bytes_sent: {collective: bytes}}}
MoE figures describe the last micro-batch of the step: tokens per expert summed over the data-parallel
replicas (each replica's tokens counted once), bytes summed over every rank of the layer's stage.
"""

from __future__ import annotations

import json

import torch.distributed as dist

from megatron_fold.moe.layer import FoldMoELayer

__all__ = ["RECORD_KEYS", "moe_metrics", "MetricsWriter"]

RECORD_KEYS = ("step", "loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "moe")


def moe_metrics(chunks, pg_collection) -> dict[int, dict] | None:
    """Every FoldMoELayer's metrics of the latest step, merged on global rank 0 (None elsewhere).

    Collective over the world: each layer's metrics() first all-reduces its counts over TP x CP, then
    every rank's layers go to rank 0 (one all_gather_object, at logging steps only).
    """
    mine = []
    first_of_replica = pg_collection.tp_cp.rank() == 0  # one report per data-parallel replica
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, FoldMoELayer):
                m = module.metrics()
                mine.append((module.layer_number, first_of_replica, m.tokens_per_expert,
                             m.dropped_fraction, m.bytes_sent))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() != 0:
        return None
    merged: dict[int, dict] = {}
    for reports in everyone:
        for layer, counts_tokens, tokens, dropped, sent in reports:
            entry = merged.setdefault(layer, {"tokens_per_expert": [0] * len(tokens), "_dropped": [],
                                              "bytes_sent": {}})
            if counts_tokens:
                entry["tokens_per_expert"] = [a + b for a, b in zip(entry["tokens_per_expert"], tokens)]
                entry["_dropped"].append(dropped)
            for kind, n in sent.items():
                entry["bytes_sent"][kind] = entry["bytes_sent"].get(kind, 0) + n
    for entry in merged.values():
        drops = entry.pop("_dropped")
        entry["dropped_fraction"] = sum(drops) / len(drops) if drops else 0.0
        tokens = entry["tokens_per_expert"]
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


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
