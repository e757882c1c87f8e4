"""`megatron-fold` command line: explain a layout, plan layouts for a model and a cluster.

Invalid input exits with status 2 and a one-paragraph message, never a traceback: users paste these
commands from Slurm scripts and need the constraint, not our stack.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_fold.layout import DEFAULT_ORDER, GROUP_NAMES, FoldedLayout, LayoutError

# Groups whose placement decides whether a layout is fast: EP all-to-all, ETP x EP dispatch, TP x CP.
_PLACEMENT_GROUPS = {"ep": "EP", "tp_ep": "ETP x EP", "tp_cp": "TP x CP"}


class UsageError(Exception):
    """Bad command-line input; printed as `megatron-fold: error: ...` with exit status 2."""


def _layout_from_args(args) -> FoldedLayout:
    return FoldedLayout(
        world_size=args.world,
        tp=args.tp,
        cp=args.cp,
        pp=args.pp,
        ep=args.ep,
        etp=args.etp,
        order=args.order,
        gpus_per_node=args.gpus_per_node,
        num_experts=args.num_experts,
    )


def explain_dict(layout: FoldedLayout, rank: int | None = None) -> dict:
    rank_view = {} if rank is None else {"rank": {
        "rank": rank, "node": layout.node_of(rank), "coords": layout.rank_coords(rank),
        "groups": {name: layout.group_of(name, rank) for name in GROUP_NAMES}}}
    return rank_view | {
        "world_size": layout.world_size,
        "gpus_per_node": layout.gpus_per_node,
        "order": layout.order,
        "attention_grid": {"tp": layout.tp, "cp": layout.cp, "dp": layout.dp, "pp": layout.pp},
        "expert_grid": {"etp": layout.etp, "ep": layout.ep, "edp": layout.edp, "pp": layout.pp},
        "folded": layout.is_folded,
        "intra_node": {name: layout.intra_node(name) for name in GROUP_NAMES},
        "groups": {name: layout.groups(name) for name in GROUP_NAMES},
        "megatron_args": layout.megatron_args() if layout.megatron_lm_order() else None,
        "command": _drop_in(layout),
        "warnings": _explain_warnings(layout),
    }


def _explain_warnings(layout: FoldedLayout) -> list[str]:
    # The printed arguments set --sequence-parallel with TP > 1; without arguments (an order Megatron-LM
    # cannot select) the advice covers both.
    return layout.warnings(sequence_parallel=True if layout.megatron_lm_order() else None)


def _drop_in(layout: FoldedLayout) -> list[str] | None:
    """The layout's Megatron-LM arguments as the drop-in command (python -m megatron_fold.pretrain_gpt ... --moe-fold)."""
    from megatron_fold.plan.command import DROP_IN, drop_in_args

    return DROP_IN + drop_in_args(layout.megatron_args()) if layout.megatron_lm_order() else None


def _compact_group(group: list[int]) -> str:
    """[0, 2, 4, 6, 8] -> "[0,2,...,8]", [0..7, 16..23] -> "[0-7,16-23]": large worlds stay readable."""
    if len(group) > 3:
        step = group[1] - group[0]
        if step > 1 and all(b - a == step for a, b in zip(group, group[1:])):
            return f"[{group[0]},{group[1]},...,{group[-1]}]"
    runs, start = [], 0
    for i in range(1, len(group) + 1):
        if i == len(group) or group[i] != group[i - 1] + 1:
            runs.append(str(group[start]) if i - start == 1 else f"{group[start]}-{group[i - 1]}")
            start = i
    return "[" + ",".join(runs) + "]"


def _compact(groups: list[list[int]], limit: int = 4) -> str:
    shown = " ".join(_compact_group(g) for g in groups[:limit])
    return shown + (f" ... ({len(groups)} groups)" if len(groups) > limit else "")


def _placement_line(layout: FoldedLayout, name: str) -> str:
    groups = layout.placement(name)
    crossing = sum(not g["intra_node"] for g in groups)
    if not crossing:
        return "inside one node"
    widest = max(len(g["nodes"]) for g in groups)
    return f"CROSSES NODES ({crossing} of {len(groups)} groups, spanning up to {widest} nodes)"


def explain_text(layout: FoldedLayout, rank: int | None) -> str:
    lines = [
        f"world {layout.world_size} = {layout.num_nodes} node(s) x {layout.gpus_per_node} GPUs, order {layout.order}",
        f"attention grid: TP {layout.tp} x CP {layout.cp} x DP {layout.dp} x PP {layout.pp}",
        f"expert grid:    ETP {layout.etp} x EP {layout.ep} x EDP {layout.edp} x PP {layout.pp}"
        + ("   (folded)" if layout.is_folded else "   (not folded: same as attention grid)"),
        "",
        "placement:",
    ]
    for name, label in _PLACEMENT_GROUPS.items():
        lines.append(f"  {label:<9} groups of {len(layout.groups(name)[0]):>4} ranks: {_placement_line(layout, name)}")
    lines.append("")
    if rank is not None:
        coords = layout.rank_coords(rank)
        lines.append(f"rank {rank} (node {layout.node_of(rank)}): " + " ".join(f"{k}={v}" for k, v in coords.items()))
        for name in GROUP_NAMES:
            g = layout.group_of(name, rank)
            lines.append(f"  {name:<9} {_compact_group(g)}  nodes {_compact_group(layout.nodes_of(g))}")
    else:
        lines.append("groups:")
        for name in GROUP_NAMES:
            lines.append(f"  {name:<9} {_compact(layout.groups(name))}")
    lines += ["", ("Megatron-LM command: " + " ".join(_drop_in(layout)) if layout.megatron_lm_order()
                   else "Megatron-LM arguments: none select this order (see warnings)")]
    warnings = _explain_warnings(layout)
    if warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in warnings]
    return "\n".join(lines)


def _add_layout_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: TP)")
    p.add_argument("--order", default=DEFAULT_ORDER)
    p.add_argument("--num-experts", type=int, default=None)


def cmd_explain(args) -> int:
    layout = _layout_from_args(args)
    if args.rank is not None and not 0 <= args.rank < layout.world_size:
        raise UsageError(f"--rank {args.rank} is outside the world of {layout.world_size} ranks")
    if args.json:
        print(json.dumps(explain_dict(layout, args.rank), indent=1))
    else:
        print(explain_text(layout, args.rank))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-fold", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="print both grids, the groups and placement of a folded layout")
    _add_layout_arguments(p)
    p.add_argument("--rank", type=int, default=None, help="show every group of this rank")
    p.add_argument("--json", action="store_true", help="machine-readable, with every group")
    p.set_defaults(func=cmd_explain)

    from megatron_fold.plan import command as plan_command

    p = sub.add_parser("plan", help="rank folded layouts for a model and a cluster")
    plan_command.add_arguments(p)
    p.set_defaults(func=plan_command.run)

    from megatron_fold.plan import calibrate

    p = sub.add_parser("calibrate", help="measure this machine's GEMMs, attention and links into a profile for plan --profile")
    calibrate.add_arguments(p)
    p.set_defaults(func=calibrate.run)

    from megatron_fold.train import command as train_command

    p = sub.add_parser("train", help="train a MoE model under a folded layout (ranks on this machine, or under torchrun)")
    train_command.add_arguments(p)
    p.set_defaults(func=train_command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # `train` forks its ranks after asking whether CUDA is there; torch's default check initialises
    # CUDA, after which no forked child can use it. The NVML-based check answers without doing so.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (LayoutError, UsageError, ValueError) as e:
        print(f"megatron-fold: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
