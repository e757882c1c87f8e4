"""Collectives for the MoE layer that work on gloo (CPU) and nccl (GPU), with counters.

Every collective the router and the dispatcher issue goes through a `CommCounter`, so the MoE layer
can report collectives and bytes per forward (and the benchmark can compare them with the minimum the
routing requires).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CommCounter"]


@dataclass
class CommCounter:
    """Collectives issued and bytes this rank sent, per collective kind (e.g. "all_to_all_v")."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, nbytes: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + int(nbytes)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent.clear()
