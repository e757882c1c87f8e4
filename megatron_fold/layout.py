"""FoldedLayout: the two parallel grids of MoE Parallel Folding, in pure Python.

Attention layers run on a TP x CP x DP x PP grid, MoE layers on an ETP x EP x EDP x PP grid over the
same ranks (arXiv 2504.14960). Megatron-Core builds both grids with two `RankGenerator`s that share one
order string (attention: tp, cp, dp, pp with ep = 1; experts: tp := ETP, ep, dp := EDP, pp with cp = 1).
This module reproduces that arithmetic exactly, without torch, so that layouts can be explained,
validated and searched on a laptop in milliseconds; tests prove equality with Megatron's generator.

Rank numbering: in an order string the leftmost dimension varies fastest (smallest stride), so the
default "tp-cp-ep-dp-pp" puts TP peers on adjacent ranks and PP stages furthest apart.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

__all__ = ["FoldedLayout", "LayoutError", "GROUP_NAMES", "DEFAULT_ORDER", "TP_PP_DP_ORDER"]

DEFAULT_ORDER = "tp-cp-ep-dp-pp"
# Megatron-LM's --use-tp-pp-dp-mapping.
TP_PP_DP_ORDER = "tp-cp-ep-pp-dp"
_DIMS = ("tp", "cp", "ep", "dp", "pp")

# group name -> (grid, tokens passed to Megatron's RankGenerator.get_ranks)
_GROUP_TOKENS: dict[str, tuple[str, str]] = {
    "tp": ("attention", "tp"),
    "cp": ("attention", "cp"),
    "dp": ("attention", "dp"),
    "dp_cp": ("attention", "dp-cp"),
    "tp_cp": ("attention", "tp-cp"),
    "pp": ("attention", "pp"),
    "mp": ("attention", "tp-pp"),
    "tp_dp_cp": ("attention", "tp-dp-cp"),
    "ep": ("expert", "ep"),
    "etp": ("expert", "tp"),
    "tp_ep": ("expert", "tp-ep"),
    "tp_ep_pp": ("expert", "tp-ep-pp"),
    "edp": ("expert", "dp"),
}
GROUP_NAMES: tuple[str, ...] = tuple(_GROUP_TOKENS)


class LayoutError(ValueError):
    """An impossible parallel layout. `violations` lists every violated constraint, one per line."""

    def __init__(self, violations: list[str], rules: list[str] | None = None):
        self.violations = list(violations)
        # The same constraints without their "values that fit" hints: a caller with more rules (the
        # planner's model checks) states these and suggests only values that pass all of its rules.
        self.rules = list(rules) if rules is not None else list(violations)
        super().__init__(
            "invalid folded layout:\n" + "\n".join(f"  - {v}" for v in self.violations)
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fmt(values: list[int]) -> str:
    return ", ".join(str(v) for v in values) if values else "none"


def _nearest(values: list[int], wanted: int, limit: int = 6) -> list[int]:
    """The `limit` values closest to `wanted` by ratio (a user who asked for EP 48 wants 32 or 64)."""
    return sorted(sorted(values, key=lambda v: (abs(math.log(v / wanted)), v))[:limit])


def _alternatives(world: int, dims: dict[str, int], extra_rules: dict | None = None) -> str:
    """For a product of `dims` that does not divide `world`: the nearby values of each dimension that
    would fit with the others unchanged, e.g. "TP values that fit: 1, 2, 4; PP values that fit: 1, 2"."""
    product = math.prod(dims.values())
    parts = []
    for name, value in dims.items():
        rest = product // value
        rule = (extra_rules or {}).get(name)
        fit = [v for v in _divisors(world) if world % (v * rest) == 0 and (rule is None or rule(v))]
        if fit:
            parts.append(f"{name} values that fit: {_fmt(_nearest(fit, value))}")
    if not parts:
        return (f"no change of one of {', '.join(dims)} alone fits; their product must divide {world} "
                f"(divisors: {_fmt(_divisors(world))})")
    return "; ".join(parts)


def masked_orthogonal_groups(sizes: list[int], mask: list[bool]) -> list[list[int]]:
    """All rank groups spanning the masked dimensions of a grid.

    Same enumeration as Megatron's `generate_masked_orthogonal_rank_groups`: groups are numbered by the
    unmasked coordinates and ranks inside a group by the masked ones, leftmost dimension fastest.
    """
    return [list(g) for g in _canonical_groups(*_canonical_grid(sizes, mask))]


def _canonical_grid(sizes: list[int], mask: list[bool]) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The same grid with size-1 dimensions dropped and neighbouring dimensions of equal mask merged.

    Neither changes the groups (a size-1 dimension has one coordinate; two neighbouring masked
    dimensions of sizes a, b enumerate the same offsets, in the same order, as one of size a*b), but
    many layouts share a canonical grid: `megatron-fold plan` builds thousands of layouts and their
    PP, TP, EP groups repeat, so the canonical grid is what the cache below is keyed by.
    """
    out_sizes: list[int] = []
    out_mask: list[bool] = []
    for size, masked in zip(sizes, mask):
        if size == 1:
            continue
        if out_mask and out_mask[-1] == bool(masked):
            out_sizes[-1] *= size
        else:
            out_sizes.append(size)
            out_mask.append(bool(masked))
    return tuple(out_sizes), tuple(out_mask)


@functools.lru_cache(maxsize=1024)
def _canonical_groups(sizes: tuple[int, ...], mask: tuple[bool, ...]) -> tuple[tuple[int, ...], ...]:
    strides = [math.prod(sizes[:i]) for i in range(len(sizes))]
    masked = [(s, st) for s, st, m in zip(sizes, strides, mask) if m]
    unmasked = [(s, st) for s, st, m in zip(sizes, strides, mask) if not m]

    def offsets(dims: list[tuple[int, int]]) -> list[int]:
        out = [0]
        for size, stride in dims:  # leftmost varies fastest
            out = [base + i * stride for i in range(size) for base in out]
        return out

    inner = offsets(masked)
    return tuple(tuple(base + o for o in inner) for base in offsets(unmasked))


@functools.lru_cache(maxsize=4096)
def _intra_node(sizes: tuple[int, ...], mask: tuple[bool, ...], gpus_per_node: int) -> bool:
    # Nodes hold contiguous rank ranges: a group is inside one node iff its extremes are.
    return all(min(g) // gpus_per_node == max(g) // gpus_per_node for g in _canonical_groups(sizes, mask))


@dataclass(frozen=True)
class FoldedLayout:
    """One folded layout; construction validates it and raises LayoutError naming every violation."""

    world_size: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # None: ETP = TP, as in Megatron
    order: str = DEFAULT_ORDER
    gpus_per_node: int = 8
    num_experts: int | None = None
    _groups_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        etp_set = self.etp is not None
        if not etp_set:
            object.__setattr__(self, "etp", self.tp)
        object.__setattr__(self, "order", self.order.lower())
        violations = self._violations(etp_set)
        if violations:
            raise LayoutError([rule + (f"; {hint}" if hint else "") for rule, hint in violations],
                              [rule for rule, _ in violations])

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.cp * self.pp)

    @property
    def edp(self) -> int:
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def num_nodes(self) -> int:
        return -(-self.world_size // self.gpus_per_node)

    @property
    def is_folded(self) -> bool:
        """True for a layout only MoE Parallel Folding can build.

        The others are *coupled*: experts share attention's TP groups (ETP groups = TP groups) and every
        EP group lies inside one DP x CP group, the expert grid Megatron-Core built before folding (EP
        carved out of the data- and context-parallel ranks). Decided on the groups, since an order
        other than Megatron-LM's two can give equal sizes different groups.
        """
        key = ("is_folded",)
        if key not in self._groups_cache:
            coupled = self.groups("etp") == self.groups("tp")
            if coupled and self.ep > 1:
                dp_cp_of = {r: i for i, g in enumerate(self.groups("dp_cp")) for r in g}
                coupled = all(len({dp_cp_of[r] for r in g}) == 1 for g in self.groups("ep"))
            self._groups_cache[key] = not coupled
        return self._groups_cache[key]

    def megatron_lm_order(self) -> str | None:
        """The Megatron-LM order (DEFAULT_ORDER, or TP_PP_DP_ORDER via --use-tp-pp-dp-mapping) that builds
        exactly this layout's groups, or None when only Megatron-Core's `order=` argument reaches them."""
        if self.order in (DEFAULT_ORDER, TP_PP_DP_ORDER):
            return self.order
        key = ("megatron_lm_order",)
        if key not in self._groups_cache:  # explain asks for it several times
            self._groups_cache[key] = None
            for order in (DEFAULT_ORDER, TP_PP_DP_ORDER):
                try:
                    other = dataclasses.replace(self, order=order)
                except LayoutError:
                    continue
                if all(other.groups(name) == self.groups(name) for name in GROUP_NAMES):
                    self._groups_cache[key] = order
                    break
        return self._groups_cache[key]

    def megatron_args(self) -> list[str]:
        """Megatron-LM arguments that build this layout (with `--sequence-parallel` when TP > 1, which
        megatron-core 0.19's MoE layer requires); ValueError when its order is not one
        Megatron-LM can select (see megatron_lm_order)."""
        order = self.megatron_lm_order()
        if order is None:
            raise ValueError(
                f"order {self.order!r} builds groups that neither Megatron-LM order ({DEFAULT_ORDER!r}, or "
                f"{TP_PP_DP_ORDER!r} with --use-tp-pp-dp-mapping) builds; pass it to Megatron-Core's "
                "initialize_model_parallel(order=...) directly (megatron_fold.parallel_state does)"
            )
        args = [
            f"--tensor-model-parallel-size={self.tp}",
            f"--context-parallel-size={self.cp}",
            f"--pipeline-model-parallel-size={self.pp}",
            f"--expert-model-parallel-size={self.ep}",
            f"--expert-tensor-parallel-size={self.etp}",
        ]
        if self.tp > 1:
            # megatron-core 0.19's MoELayer refuses TP > 1 without it (see warnings()).
            args.append("--sequence-parallel")
        if order == TP_PP_DP_ORDER:
            args.append("--use-tp-pp-dp-mapping")
        return args

    def warnings(self, *, sequence_parallel: bool | None = None, add_bias_linear: bool | None = None) -> list[str]:
        """Advice worth acting on, each naming the numbers and what to change. `sequence_parallel` and
        `add_bias_linear` say what the run sets (None: unknown, so the advice covers both)."""
        out = []
        gpn = self.gpus_per_node
        if not self.intra_node("tp_ep"):
            out.append(
                f"the ETP x EP group ({self.etp} x {self.ep} = {self.etp * self.ep} ranks) crosses nodes "
                f"({gpn} GPUs per node): the MoE all-to-all then runs over the network; the paper keeps "
                "ETP x EP inside a node where it can")
        if not self.intra_node("tp"):
            out.append(f"TP {self.tp} is larger than a node ({gpn} GPUs): tensor-parallel all-reduces cross the network")
        if self.etp > 1:
            out.append(
                f"ETP {self.etp} > 1: the paper and Megatron-Core recommend ETP = 1 (expert GEMMs are already "
                "small; ETP adds an all-gather and a reduce-scatter per MoE layer); try --etp 1 with a larger EP")
        if self.tp > 1:
            norm = ("megatron-core 0.19's torch LayerNorm fallback refuses sequence parallelism, so this needs "
                    "Transformer Engine or Apex")
            if sequence_parallel:
                out.append(f"TP {self.tp} > 1 with sequence parallelism: {norm}")
            else:
                out.append(f"TP {self.tp} > 1: megatron-core 0.19's MoELayer refuses to train with TP > 1 unless "
                           f"--sequence-parallel is set (and {norm})")
        if self.etp > 1 and add_bias_linear is not False:
            out.append(f"ETP {self.etp} > 1: megatron-core 0.19 rejects --add-bias-linear for MoE layers unless ETP = 1")
        if not self.order.endswith("pp") and self.pp > 1:
            out.append(
                f"order {self.order!r} does not end with pp, so with PP > 1 Megatron requires EDP == DP "
                f"(ETP*EP == TP*CP): folding is restricted; order {DEFAULT_ORDER!r} folds freely")
        if self.megatron_lm_order() is None:
            out.append(
                f"order {self.order!r} builds groups neither Megatron-LM order builds: no Megatron-LM argument "
                "selects it; pass it to Megatron-Core's initialize_model_parallel(order=...)")
        if self.num_experts is None and self.ep > 1:
            out.append("pass --num-experts to check that the experts divide evenly over EP")
        return out

    # ---- validation ----------------------------------------------------------------------------
    def _violations(self, etp_set: bool = True) -> list[tuple[str, str]]:
        """(rule, hint) per violated constraint. Values are named as the user gave them: an ETP that
        defaults to TP is not reported as a bad ETP of its own (`explain --tp 0` is about tp=0)."""
        out: list[tuple[str, str]] = []
        sizes = {"world_size": self.world_size, "tp": self.tp, "cp": self.cp, "pp": self.pp,
                 "ep": self.ep, "gpus_per_node": self.gpus_per_node}
        if etp_set:
            sizes["etp"] = self.etp
        if self.num_experts is not None:
            sizes["num_experts"] = self.num_experts
        bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad:
            return [(f"sizes must be positive integers, got {', '.join(bad)}", "")]

        tokens = self.order.split("-")
        if any(t not in _DIMS for t in tokens) or len(set(tokens)) != len(tokens):
            out.append((
                f"order {self.order!r} must name each of tp, cp, ep, dp, pp at most once "
                f"(e.g. {DEFAULT_ORDER!r}, or {TP_PP_DP_ORDER!r} for --use-tp-pp-dp-mapping)", ""
            ))
        W = self.world_size
        attn = self.tp * self.cp * self.pp
        if W % attn:
            out.append((
                f"world_size {W} is not divisible by TP*CP*PP = {self.tp}*{self.cp}*{self.pp} = {attn}",
                _alternatives(W, {"TP": self.tp, "CP": self.cp, "PP": self.pp}),
            ))
        expert = self.etp * self.ep * self.pp
        if W % expert:
            ep_ok = (lambda e: self.num_experts % e == 0) if self.num_experts is not None else None
            out.append((
                f"world_size {W} is not divisible by ETP*EP*PP = {self.etp}*{self.ep}*{self.pp} = {expert}"
                + ("" if etp_set or self.tp == 1 else f" (ETP not set: it follows TP {self.tp})"),
                _alternatives(W, {"ETP": self.etp, "EP": self.ep, "PP": self.pp}, {"EP": ep_ok}),
            ))
        if self.num_experts is not None and self.num_experts % self.ep:
            fit = [e for e in _divisors(self.num_experts) if W % (self.etp * e * self.pp) == 0]
            out.append((f"num_experts {self.num_experts} is not divisible by EP {self.ep}",
                        f"EP values that fit: {_fmt(fit)}"))
        if out:
            return out
        # Like Megatron's RankGenerator, an order may leave out dimensions of size 1 (in both grids).
        sized = {"tp": [("TP", self.tp), ("ETP", self.etp)], "cp": [("CP", self.cp)], "ep": [("EP", self.ep)],
                 "dp": [("DP", self.dp), ("EDP", self.edp)], "pp": [("PP", self.pp)]}
        left_out = [" / ".join(f"{n} = {v}" for n, v in sized[d]) for d in _DIMS
                    if d not in tokens and any(v > 1 for _, v in sized[d])]
        if left_out:
            return [(f"order {self.order!r} leaves out {', '.join(left_out)}: an order may omit only dimensions "
                     f"of size 1", f"name them, e.g. {DEFAULT_ORDER!r}")]
        if "tp" not in tokens:
            # Megatron-Core 0.19 injects a 'gtp_remat' axis and then tests `"tp" in order` as a
            # substring, so a left-out tp is never appended and its generator fails on every group.
            return [(f"order {self.order!r} leaves out tp, which megatron-core 0.19 cannot build (its rank "
                     "generator mistakes the 'gtp_remat' axis it injects for tp)", f"name tp, e.g. {'tp-' + self.order!r}")]
        # Megatron asserts this in initialize_model_parallel: with PP not outermost the two grids only
        # share PP groups when both have the same DP size.
        if not self.order.endswith("pp") and self.pp > 1 and self.edp != self.dp:
            out.append((
                f"order {self.order!r} does not end with pp, so with PP {self.pp} > 1 Megatron requires "
                f"EDP == DP, got EDP {self.edp} != DP {self.dp} (need ETP*EP == TP*CP = {self.tp * self.cp})",
                f"use order {DEFAULT_ORDER!r} to fold freely",
            ))
        elif (_canonical_groups(*self._canonical("attention", "pp"))
              != _canonical_groups(*self._canonical("expert", "pp"))):
            out.append((
                "pipeline groups of the attention grid and the expert grid differ "
                f"(attention {self.groups('pp')[:2]}..., expert {self._expert_pp_groups()[:2]}...)",
                f"put pp last in the order, e.g. {DEFAULT_ORDER!r}",
            ))
        return out

    # ---- groups --------------------------------------------------------------------------------
    def _grid(self, grid: str) -> tuple[list[str], list[int]]:
        size = (
            {"tp": self.tp, "cp": self.cp, "ep": 1, "dp": self.dp, "pp": self.pp}
            if grid == "attention"
            else {"tp": self.etp, "cp": 1, "ep": self.ep, "dp": self.edp, "pp": self.pp}
        )
        tokens = self._order_tokens()
        return tokens, [size[t] for t in tokens]

    def _order_tokens(self) -> list[str]:
        """The order with left-out (size-1) dimensions appended, as Megatron's RankGenerator does."""
        tokens = self.order.split("-")
        return tokens + [d for d in ("tp", "pp", "dp", "ep", "cp") if d not in tokens]

    def _canonical(self, grid: str, token: str) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        tokens, sizes = self._grid(grid)
        wanted = token.split("-")
        return _canonical_grid(sizes, [t in wanted for t in tokens])

    def _ranks(self, grid: str, token: str) -> list[list[int]]:
        key = (grid, token)
        if key not in self._groups_cache:
            self._groups_cache[key] = [list(g) for g in _canonical_groups(*self._canonical(grid, token))]
        return self._groups_cache[key]

    def _expert_pp_groups(self) -> list[list[int]]:
        return self._ranks("expert", "pp")

    def groups(self, name: str) -> list[list[int]]:
        """Every group of kind `name`, exactly as Megatron-Core creates them (see GROUP_NAMES)."""
        if name not in _GROUP_TOKENS:
            raise KeyError(f"unknown group {name!r}; known groups: {', '.join(GROUP_NAMES)}")
        return self._ranks(*_GROUP_TOKENS[name])

    def group_of(self, name: str, rank: int) -> list[int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world_size {self.world_size}")
        for g in self.groups(name):
            if rank in g:
                return g
        raise AssertionError(f"rank {rank} is in no {name} group")  # impossible for a valid layout

    def rank_coords(self, rank: int) -> dict[str, int]:
        """The rank's coordinate in every dimension of both grids (etp/ep/edp are the expert grid's)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world_size {self.world_size}")
        coords = {}
        for grid, names in (("attention", {"tp": "tp", "cp": "cp", "dp": "dp", "pp": "pp"}),
                            ("expert", {"tp": "etp", "ep": "ep", "dp": "edp"})):
            tokens, sizes = self._grid(grid)
            rest = rank
            for t, s in zip(tokens, sizes):
                if t in names:
                    coords[names[t]] = rest % s
                rest //= s
        return coords

    # ---- placement -----------------------------------------------------------------------------
    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def nodes_of(self, group: list[int]) -> list[int]:
        return sorted({self.node_of(r) for r in group})

    def intra_node(self, name: str) -> bool:
        """True when every `name` group stays inside one node (NVLink rather than the network)."""
        key = ("intra_node", name)
        if key not in self._groups_cache:
            if name not in _GROUP_TOKENS:
                raise KeyError(f"unknown group {name!r}; known groups: {', '.join(GROUP_NAMES)}")
            self._groups_cache[key] = _intra_node(*self._canonical(*_GROUP_TOKENS[name]), self.gpus_per_node)
        return self._groups_cache[key]

    def placement(self, name: str) -> list[dict]:
        return [{"ranks": g, "nodes": self.nodes_of(g), "intra_node": len(self.nodes_of(g)) == 1}
                for g in self.groups(name)]
