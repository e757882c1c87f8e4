"""Hardware profile: the kernel- and link-level numbers the cost terms read, and their sources.

A profile is what `megatron-fold calibrate` measures on a machine and `plan --profile` reads; the
shipped ones (`profiles/*.json`: h100, h200, a100, b200) take every number from a cited public
measurement or datasheet, named per field in `sources`. Constants are fitted only on kernel-level
data (a GEMM, an attention kernel, a collective), never on end-to-end training throughput.

Schema (`megatron-fold-profile/1`), all numbers positive:
- name, peak_tflops (dense BF16 datasheet peak: the MFU denominator), memory_gb, sms (streaming
  multiprocessors: GEMM wave quantization);
- gemm_max_efficiency: fraction of the peak that the best large BF16 GEMM reaches (MAMF);
- grouped_gemm_factor: a grouped GEMM's throughput relative to the dense GEMM model at equal shape
  (1.0: as efficient);
- hbm_gbs: HBM bandwidth that copies achieve (GB/s);
- attention: [[chunk tokens, achieved TFLOP/s], ...], causal flash attention by query/key block length;
- nvlink_gbs / network_gbs: bus bandwidth per GPU and direction that NCCL collectives achieve inside
  an NVLink domain / across the network (GB/s);
- nvlink_domain: GPUs that share one NVLink fabric, or null for "one node" (NVL72: 72);
- collective_latency_us: fixed cost of one collective call;
- host_sync_us: GPU idle time one host synchronisation costs (the device-to-host copy's round trip
  and relaunching the queue behind it): dropless MoE layers read their token counts on the host;
- sources: {field: citation}; measured: raw calibration points (optional, informative).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

__all__ = ["SCHEMA", "Profile", "load_profile", "shipped_profiles"]

SCHEMA = "megatron-fold-profile/1"
_PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
_POSITIVE = ("peak_tflops", "memory_gb", "sms", "gemm_max_efficiency", "grouped_gemm_factor", "hbm_gbs",
             "nvlink_gbs", "network_gbs", "collective_latency_us", "host_sync_us")


@dataclass(frozen=True)
class Profile:
    name: str
    peak_tflops: float
    memory_gb: float
    sms: int
    gemm_max_efficiency: float
    grouped_gemm_factor: float
    hbm_gbs: float
    attention: tuple[tuple[float, float], ...]
    nvlink_gbs: float
    network_gbs: float
    nvlink_domain: int | None = None
    collective_latency_us: float = 20.0
    host_sync_us: float = 20.0
    sources: dict = field(default_factory=dict, compare=False, hash=False)
    measured: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        problems = _problems(self)
        if problems:
            raise ValueError(f"profile {self.name!r}: " + "; ".join(problems))

    def with_overrides(self, **values) -> "Profile":
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def attention_tflops(self, chunk: float) -> float:
        """Achieved causal attention TFLOP/s at this block length: linear in log(chunk) between the
        profile's points, flat beyond its ends (no extrapolation past what was measured)."""
        pts = self.attention
        if chunk <= pts[0][0]:
            return pts[0][1] * chunk / pts[0][0]  # below the shortest measured block: proportional
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if chunk <= x1:
                w = math.log(chunk / x0) / math.log(x1 / x0)
                return y0 + w * (y1 - y0)
        return pts[-1][1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attention"] = [list(p) for p in self.attention]
        return {"schema": SCHEMA} | d

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")


def _problems(p: Profile) -> list[str]:
    out = []
    for name in _POSITIVE:
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            out.append(f"{name} must be a positive number, got {v!r}")
    if not out and p.gemm_max_efficiency > 1:
        out.append(f"gemm_max_efficiency is a fraction of the peak, at most 1, got {p.gemm_max_efficiency}")
    if p.nvlink_domain is not None and (not isinstance(p.nvlink_domain, int) or isinstance(p.nvlink_domain, bool)
                                        or p.nvlink_domain < 1):
        out.append(f"nvlink_domain must be a positive integer or null, got {p.nvlink_domain!r}")
    pts = p.attention
    ok = (isinstance(pts, tuple) and pts
          and all(isinstance(q, tuple) and len(q) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                                and math.isfinite(x) and x > 0 for x in q) for q in pts))
    if not ok:
        out.append(f"attention must be a non-empty list of [chunk tokens, TFLOP/s] pairs of positive numbers, got {pts!r}")
    elif any(b[0] <= a[0] for a, b in zip(pts, pts[1:])):
        out.append(f"attention chunk lengths must increase, got {[q[0] for q in pts]}")
    return out


def _from_dict(d: dict, where: str) -> Profile:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a profile is a JSON object, got {type(d).__name__}")
    if d.get("schema") != SCHEMA:
        raise ValueError(f"{where}: schema must be {SCHEMA!r}, got {d.get('schema')!r}")
    known = set(Profile.__dataclass_fields__)
    required = {n for n, f in Profile.__dataclass_fields__.items()
                if f.default is f.default_factory is __import__("dataclasses").MISSING}
    missing = sorted(required - set(d))
    unknown = sorted(set(d) - known - {"schema"})
    if missing or unknown:
        raise ValueError(f"{where}: " + "; ".join(
            ([f"missing fields: {', '.join(missing)}"] if missing else [])
            + ([f"unknown fields: {', '.join(unknown)}"] if unknown else [])))
    values = {k: v for k, v in d.items() if k != "schema"}
    att = values["attention"]
    if isinstance(att, list):
        values["attention"] = tuple(tuple(p) if isinstance(p, list) else p for p in att)
    for key in ("sources", "measured"):
        if key in values and not isinstance(values[key], dict):
            raise ValueError(f"{where}: {key} must be an object, got {values[key]!r}")
    try:
        return Profile(**values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_profile(path: str) -> Profile:
    """Read and check a profile file; ValueError naming the file and the bad field."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read profile {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"profile {path} is not JSON: {e}") from None
    return _from_dict(data, f"profile {path}")


def shipped_profiles() -> dict[str, Profile]:
    out = {}
    for name in sorted(os.listdir(_PROFILE_DIR)):
        if name.endswith(".json"):
            p = load_profile(os.path.join(_PROFILE_DIR, name))
            out[p.name] = p
    return out
