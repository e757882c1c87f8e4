"""`megatron-fold plan`: argument wiring and output. See cost.py for the model, docs/planner.md for use."""

from __future__ import annotations

import json
import re
import sys
import time

from megatron_fold.layout import FoldedLayout
from megatron_fold.plan.cost import Choice, estimate
from megatron_fold.plan.explain import deciding_term, explain
from megatron_fold.plan.hardware import GPUS, get_gpu
from megatron_fold.plan.models import PRESETS, from_hf_config, get_model
from megatron_fold.plan.profile import load_profile
from megatron_fold.plan.search import is_coupled, layout_violations, plan

_LAYOUT_KEYS = {"tp", "cp", "pp", "vpp", "ep", "etp", "mbs"}
# Groups whose placement the cost model reads, as `--layout` reports them.
_PLACED = {"tp": "TP", "cp": "CP", "ep": "EP", "etp": "ETP", "pp": "PP", "dp_cp": "DP x CP", "edp": "EDP"}


# The drop-in: Megatron-LM's pretrain_gpt.py with the plugin (megatron_fold/pretrain_gpt.py).
DROP_IN = ["python", "-m", "megatron_fold.pretrain_gpt"]


def drop_in_args(megatron_args: list[str], drop_scope: str | None = None, dropping: bool = True) -> list[str]:
    """Megatron-LM arguments for the drop-in: Megatron's own dispatcher flag gives way to `--moe-fold`
    (FoldMoELayer brings its own dispatcher), and sequence-scope dropping to its plugin flag."""
    out = [a for a in megatron_args if a.split("=")[0] != "--moe-token-dispatcher-type"] + ["--moe-fold"]
    if drop_scope == "sequence" and dropping:
        out.append("--moe-fold-drop-scope=sequence")
    return out


def command_line(args: list[str]) -> str:
    return " ".join(DROP_IN + args)


def add_arguments(p) -> None:
    p.add_argument("--model", help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--hf-config", help="a Hugging Face config.json (Mixtral, Qwen2-MoE, Qwen3-MoE)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100", help=f"preset: {', '.join(GPUS)}")
    p.add_argument("--profile", help="a hardware profile from `megatron-fold calibrate` (replaces --gpu)")
    p.add_argument("--nvlink-domain", type=int,
                   help="GPUs sharing one NVLink fabric, e.g. 72 for NVL72 (default: the profile's, else one node)")
    p.add_argument("--drop-scope", choices=("subsequence", "sequence"), default="subsequence",
                   help="with --capacity-factor: Megatron's per-rank drops, or megatron-fold's sequence scope")
    p.add_argument("--peak-tflops", type=float, help="override the preset's dense BF16 peak (TFLOP/s)")
    p.add_argument("--gpu-memory-gb", type=float, help="override the preset's memory (GB)")
    p.add_argument("--nvlink-gbs", type=float, help="override NVLink GB/s per GPU and direction")
    p.add_argument("--network-gbs", type=float, help="override network GB/s per GPU and direction")
    p.add_argument("--hbm-gbs", type=float, help="override the preset's memory bandwidth (GB/s)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-fold", action="store_true",
                   help="only coupled layouts, as before folding (ETP = TP, EP groups inside DP x CP groups)")
    drop = p.add_mutually_exclusive_group()
    drop.add_argument("--capacity-factor", type=float, help="token dropping with this capacity factor")
    drop.add_argument("--dropless", action="store_true", help="dropless MoE (the default)")
    p.add_argument("--layout", help="evaluate one layout, e.g. tp2,pp8,ep8,etp1[,cp1,vpp1,mbs1,recompute]")
    p.add_argument("--slurm", metavar="FILE",
                   help="write an sbatch script that trains the chosen layout (the best, or --layout) with the drop-in")


def _model(args):
    if bool(args.model) == bool(args.hf_config):
        raise ValueError("pass exactly one of --model or --hf-config")
    return get_model(args.model) if args.model else from_hf_config(args.hf_config)


def parse_layout(text: str) -> dict:
    out, given = {"recompute": False}, {}
    for part in filter(None, (x.strip() for x in text.lower().split(","))):
        if part == "recompute":
            key, value = "recompute", True
        else:
            match = re.fullmatch(r"([a-z]+)(\d+)", part)
            if not match or match.group(1) not in _LAYOUT_KEYS:
                raise ValueError(f"--layout: cannot read {part!r}; use e.g. tp2,pp8,ep8,etp1,cp1,vpp1,mbs1[,recompute]")
            key, value = match.group(1), int(match.group(2))
        if key in given:  # the last one would silently win
            raise ValueError(f"--layout {text}: {key} is given twice ({given[key]} and {part}); give each key once")
        given[key] = part
        out[key] = value
    return out


def _row(rank, est) -> str:
    return (f"{rank:>3}  {est.choice.label():<58} {est.step_time_s:>8.2f}s {est.tokens_per_s_per_gpu:>8.0f} "
            f"{est.tflops_per_gpu:>7.0f} {100 * est.mfu:>5.1f}% {est.memory_total_gb:>6.1f}  {est.bottleneck}")


def _header() -> str:
    return f"{'#':>3}  {'layout':<58} {'step':>9} {'tok/s/GPU':>8} {'TFLOP/s':>7} {'MFU':>6} {'mem GB':>6}  bottleneck"


def _breakdown(est) -> list[str]:
    lines = ["time per step:"]
    lines += [f"  {k:<20} {v:8.3f} s  ({100 * v / est.step_time_s:4.1f}%)" for k, v in est.time_s.items()]
    lines += [f"memory per GPU ({est.memory_stage} pipeline stage, the fuller one):"]
    lines += [f"  {k:<20} {v:8.2f} GB" for k, v in est.memory_gb.items()]
    lines += [f"  {'total':<20} {est.memory_total_gb:8.2f} GB"]
    return lines


def _placement(layout: FoldedLayout) -> str:
    where = [f"{label} {'NVLink' if layout.intra_node(name) else 'network'}" for name, label in _PLACED.items()
             if len(layout.groups(name)[0]) > 1]
    return "links: " + (", ".join(where) if where else "none (one GPU)")


def _as_dict(est, args) -> dict:
    return est.to_dict() | {"coupled": is_coupled(est.choice.layout), "warnings": _warnings(est.choice.layout),
                            "command": _command(est, args)}


def _command(est, args) -> list[str] | None:
    """The drop-in command as argv; None with --no-fold (Megatron's own MoE layer: megatron_args)."""
    if args.no_fold:
        return None
    return DROP_IN + drop_in_args(est.megatron_args, args.drop_scope, args.capacity_factor is not None)


def _write_slurm(est, args, model) -> None:
    from megatron_fold.plan.slurm import sbatch_script

    invocation = ["megatron-fold", "plan", "--model" if args.model else "--hf-config", args.model or args.hf_config,
                  "--gpus", str(args.gpus), "--gpus-per-node", str(args.gpus_per_node), "--gpu", args.gpu,
                  "--seq-len", str(args.seq_len), "--global-batch", str(args.global_batch)]
    if args.profile:
        invocation += ["--profile", args.profile]
    if args.capacity_factor is not None:
        invocation += ["--capacity-factor", f"{args.capacity_factor:g}", "--drop-scope", args.drop_scope]
    if args.layout:
        invocation += ["--layout", args.layout]
    invocation += ["--slurm", args.slurm]
    text = sbatch_script(est.choice.layout, _command(est, args)[len(DROP_IN):],
                         job_name=f"mfold-{model.name}",
                         generated_by=" ".join(invocation),
                         summary=f"{model.name} on {args.gpus} GPUs: {est.choice.label()}, predicted "
                                 f"{est.step_time_s:.2f} s/step, {100 * est.mfu:.1f}% MFU")
    with open(args.slurm, "w") as f:
        f.write(text)
    print(f"\nwrote {args.slurm}: sbatch script for {est.choice.layout.world_size // args.gpus_per_node} nodes "
          f"x {args.gpus_per_node} GPUs ({est.choice.label()})", file=sys.stderr if args.json else sys.stdout)


def _command_text(est, args) -> str:
    if args.no_fold:
        return "Megatron-LM arguments: " + " ".join(est.megatron_args)
    return "Megatron-LM command: " + " ".join(_command(est, args))


def _padding_note(capacity_factor: float | None) -> list[str]:
    """The one argument the planner adds beyond what the user asked for, said in words."""
    if capacity_factor is None:
        return []
    return [f"--capacity-factor {capacity_factor:g}: the arguments also set --moe-pad-expert-input-to-capacity "
            "(every expert processes exactly its capacity, padded, as the model times it); drop that flag "
            "for unpadded token dropping"]


def _warnings(layout: FoldedLayout) -> list[str]:
    # The planner's arguments set --sequence-parallel with TP > 1 and --disable-bias-linear.
    return layout.warnings(sequence_parallel=True, add_bias_linear=False)


def _one_layout(args, model, gpu, cf) -> int:
    spec = parse_layout(args.layout)
    sizes = {k: spec.get(k, None if k == "etp" else 1) for k in ("tp", "cp", "pp", "ep", "etp", "vpp", "mbs")}
    layout, problems = layout_violations(model, args.gpus, args.gpus_per_node, args.seq_len, args.global_batch,
                                         sizes)
    if problems:
        raise ValueError(f"{model.name} cannot train with --layout {args.layout} on {args.gpus} GPUs:\n"
                         + "\n".join(f"  - {p}" for p in problems))
    mbs, vpp = sizes["mbs"], sizes["vpp"]
    est = estimate(model, gpu, Choice(layout, vpp, mbs, spec["recompute"]), args.seq_len, args.global_batch, cf,
                   drop_scope=args.drop_scope)
    if args.json:
        print(json.dumps(_as_dict(est, args), indent=1))
        if args.slurm:
            _write_slurm(est, args, model)
        return 0
    fits = "fits" if est.fits else f"DOES NOT FIT in {gpu.memory_gb:g} GB"
    lines = [_header(), _row(1, est), "", _placement(layout) + f"; memory: {fits}", ""] + _breakdown(est)
    lines += ["", *_padding_note(cf), _command_text(est, args)]
    warnings = _warnings(layout)
    if warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in warnings]
    print("\n".join(lines))
    if args.slurm:
        _write_slurm(est, args, model)
    return 0


def run(args) -> int:
    model = _model(args)
    for flag, value in (("--peak-tflops", args.peak_tflops), ("--gpu-memory-gb", args.gpu_memory_gb),
                        ("--nvlink-gbs", args.nvlink_gbs), ("--network-gbs", args.network_gbs),
                        ("--hbm-gbs", args.hbm_gbs), ("--nvlink-domain", args.nvlink_domain)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be positive, got {value:g}")
    base = load_profile(args.profile) if args.profile else get_gpu(args.gpu)
    gpu = base.with_overrides(peak_tflops=args.peak_tflops, memory_gb=args.gpu_memory_gb,
                              nvlink_gbs=args.nvlink_gbs, network_gbs=args.network_gbs, hbm_gbs=args.hbm_gbs,
                              nvlink_domain=args.nvlink_domain)
    # Placement is decided by the NVLink domain (a node, or an NVL72 rack): it takes the place of the
    # node in every layout the planner builds.
    args.gpus_per_node = gpu.nvlink_domain or args.gpus_per_node
    if args.capacity_factor is not None and args.capacity_factor <= 0:
        raise ValueError(f"--capacity-factor must be positive, got {args.capacity_factor}")
    for flag, value in (("--gpus", args.gpus), ("--gpus-per-node", args.gpus_per_node),
                        ("--global-batch", args.global_batch), ("--seq-len", args.seq_len), ("--top", args.top)):
        if value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.slurm and args.no_fold:
        raise ValueError("--slurm writes a script for the drop-in (--moe-fold); --no-fold plans Megatron's own MoE "
                         "layer: drop one of them")
    cf = args.capacity_factor
    if args.layout:
        return _one_layout(args, model, gpu, cf)

    start = time.perf_counter()
    ranked, evaluated = plan(model, gpu, args.gpus, args.gpus_per_node, args.seq_len, args.global_batch, cf,
                             no_fold=args.no_fold, drop_scope=args.drop_scope)
    elapsed = time.perf_counter() - start
    top = ranked[: args.top]
    # The coupled layouts are a subset of the folded search: the best of them is what folding is
    # measured against, with no second search.
    coupled = next((e for e in ranked if is_coupled(e.choice.layout)), None)
    folded = next((e for e in ranked if not is_coupled(e.choice.layout)), None)
    why = explain(coupled, folded) if coupled and folded else []
    if args.json:
        print(json.dumps({"model": model.name, "gpu": gpu.name, "gpus": args.gpus, "evaluated": evaluated,
                          "fitting": len(ranked), "seconds": elapsed, "results": [_as_dict(e, args) for e in top],
                          "best_coupled": _as_dict(coupled, args) if coupled else None,
                          "best_folded": _as_dict(folded, args) if folded else None,
                          "deciding_term": (deciding_term(*sorted((coupled, folded), key=lambda e: -e.step_time_s))
                                            if why else None),
                          "explanation": why}, indent=1))
        if args.slurm:
            _write_slurm(top[0], args, model)
        return 0
    print(f"{model.name} ({model.total_params / 1e9:.1f}B params, {model.active_params / 1e9:.1f}B active) on "
          f"{args.gpus} x {gpu.name}, seq {args.seq_len}, global batch {args.global_batch}, "
          f"{'dropless' if cf is None else f'capacity factor {cf:g}'}"
          f"{', coupled layouts only' if args.no_fold else ''}")
    print(f"{evaluated} choices (layout x VPP x micro-batch x recompute) evaluated, {len(ranked)} fit in "
          f"{gpu.memory_gb:g} GB, {elapsed:.2f} s\n")
    print(_header())
    for i, est in enumerate(top, 1):
        print(_row(i, est))
    best = top[0]
    print("\nbest: " + best.choice.label() + "; " + _placement(best.choice.layout))
    print("\n".join(_breakdown(best)))
    if not args.no_fold:
        if coupled is None:
            print("\nno coupled layout (ETP = TP, EP inside DP x CP) fits: only folding trains this model here")
        elif coupled is best:
            print("\nthe best layout is coupled: folding buys nothing for this model and cluster"
                  + (f" (best folded: {folded.choice.label()}, {100 * folded.mfu:.1f}% MFU)" if folded else ""))
        else:
            print(f"\nbest coupled layout (no folding): {coupled.choice.label()}, {100 * coupled.mfu:.1f}% MFU; "
                  f"the folded best is {100 * (coupled.step_time_s / best.step_time_s - 1):.1f}% faster")
        if why:
            print("\n".join(why))
    print("\n" + "".join(line + "\n" for line in _padding_note(cf)) + _command_text(best, args))
    if args.slurm:
        _write_slurm(best, args, model)
    return 0
