"""Megatron-LM integration: the plugin as Megatron-LM flags and a `--spec` target, with no edit to Megatron-LM.

Why this route: Megatron-LM's `pretrain_gpt.py` (core_v0.19) hard-codes its `extra_args_provider`, but
`parse_args` looks `add_megatron_arguments` up at call time and `parse_and_validate_args` does the same
with `validate_args`, so `install_arguments()` adds the plugin flags to Megatron's own parser (its
`--help` lists them) and checks them at argument time. The model is built by `GPTModelBuilder`, which
calls the layer spec given with `--spec MODULE FUNCTION` as `fn(model_config, vp_stage=...)`:
`fold_layer_spec` is that function. It installs the plugin into Megatron's spec builders, returns
Megatron's own default spec for the config (local or Transformer Engine, dense and MoE layers; the MTP
block GPTModelBuilder derives afterwards is built with the plugin installed too), checks the groups
Megatron built against FoldedLayout, and appends a pre-wrap hook that checks every MoE position is a
FoldMoELayer and tags expert parameters for EDP before DDP wraps the model.

    python -m megatron_fold.pretrain_gpt [Megatron-LM arguments] --moe-fold [--moe-fold-drop-scope sequence]

sets `--spec megatron_fold.megatron_lm fold_layer_spec` itself (SPEC below).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import traceback

import torch
import torch.distributed as dist

from megatron_fold import parallel_state, portable, specs
from megatron_fold.layout import DEFAULT_ORDER, TP_PP_DP_ORDER, FoldedLayout, LayoutError
from megatron_fold.moe.capacity import DropScope

__all__ = ["SPEC", "add_arguments", "plugin_usage", "install_arguments", "uninstall_arguments", "validate_fold_args",
           "check_moe_flags", "check_implementation", "FoldArgumentError", "layout_from_args", "fold_layer_spec",
           "with_fold_spec", "add_fold_spec_to_sys_argv", "is_first_rank"]

SPEC = ["megatron_fold.megatron_lm", "fold_layer_spec"]
_DEFAULTS = {"moe_fold_drop_scope": DropScope.SUBSEQUENCE.value, "moe_fold_check_finite": False,
             "moe_fold_metrics": True, "moe_fold_log_interval": 0}
_OPTION_FLAGS = {"moe_fold_drop_scope": "--moe-fold-drop-scope", "moe_fold_check_finite": "--moe-fold-check-finite",
                 "moe_fold_metrics": "--moe-fold-no-metrics", "moe_fold_log_interval": "--moe-fold-log-interval"}


class FoldArgumentError(ValueError):
    """Megatron-LM arguments the plugin cannot run with; the message names the flags and values."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's flags to a Megatron-LM argument parser (an `extra_args_provider`)."""
    g = parser.add_argument_group(
        "megatron-fold", "MoE Parallel Folding: MoE layers on their own ETP x EP x EDP grid with "
        "megatron-fold's router and token dispatcher (https://arxiv.org/abs/2504.14960)")
    g.add_argument("--moe-fold", action="store_true",
                   help="build every MoE layer as megatron-fold's FoldMoELayer (replaces "
                        "--moe-token-dispatcher-type); needs --spec " + " ".join(SPEC) + ", which "
                        "`python -m megatron_fold.pretrain_gpt` sets")
    g.add_argument("--moe-fold-drop-scope", choices=[s.value for s in DropScope], default=_DEFAULTS["moe_fold_drop_scope"],
                   help="with --moe-expert-capacity-factor: decide token drops per rank's sub-sequence "
                        "(Megatron's semantics) or over whole sequences (the same drops under every layout)")
    g.add_argument("--moe-fold-check-finite", dest="moe_fold_check_finite", action="store_true",
                   default=_DEFAULTS["moe_fold_check_finite"],
                   help="raise, naming the layer, when router scores are NaN or infinite (costs one small "
                        "all-reduce and one host synchronisation per MoE layer and micro-batch; off by default: "
                        "Megatron-LM's --check-for-nan-in-loss-and-grad stops such a step anyway)")
    g.add_argument("--moe-fold-no-check-finite", dest="moe_fold_check_finite", action="store_false",
                   help="the default (kept for earlier command lines): no NaN / Inf check of router scores")
    g.add_argument("--moe-fold-no-metrics", dest="moe_fold_metrics", action="store_false",
                   help="skip the per-layer token counting behind FoldMoELayer.metrics()")
    g.add_argument("--moe-fold-log-interval", type=int, default=0, metavar="N",
                   help="print every MoE layer's tokens per expert, drop rate and load imbalance every N "
                        "forward passes of that layer (0: never; needs metrics)")
    return parser


def plugin_usage() -> str:
    """The plugin's flags as argparse writes them in a usage line, from the parser add_arguments builds
    (so the drop-in's usage cannot drift from the flags)."""
    parser = add_arguments(argparse.ArgumentParser(prog="", add_help=False))
    return " ".join(parser.format_usage().removeprefix("usage:").split())


def is_first_rank() -> bool:
    """Rank 0 of a torchrun / srun job, or a single process (no RANK): the one process that prints errors
    and notes, which every rank would otherwise print alike."""
    return os.environ.get("RANK", "0") == "0"


def with_fold_spec(argv: list[str]) -> list[str]:
    """`--moe-fold` brings its --spec, unless the user gave a --spec (then validation says whether it fits)."""
    if "--moe-fold" in argv and "--spec" not in argv and not any(a.startswith("--spec=") for a in argv):
        return [*argv, "--spec", *SPEC]
    return list(argv)


def add_fold_spec_to_sys_argv() -> None:
    """with_fold_spec on this process's command line (the patched pretrain_gpt.py calls it)."""
    sys.argv[1:] = with_fold_spec(sys.argv[1:])


_ORIGINAL: dict[str, object] = {}


def install_arguments() -> None:
    """Make Megatron-LM's own `parse_args` / `parse_and_validate_args` take and check the plugin flags.

    Both names are looked up in `megatron.training.arguments` when called, so this works for an
    unmodified `pretrain_gpt.py` that imports `parse_and_validate_args` before this runs.
    """
    from megatron.training import arguments

    if _ORIGINAL:
        return
    _ORIGINAL.update(add=arguments.add_megatron_arguments, validate=arguments.validate_args)
    add, validate = _ORIGINAL["add"], _ORIGINAL["validate"]

    @functools.wraps(add)
    def add_megatron_arguments(parser):
        parser.error = functools.partial(_argument_error, parser.prog)
        return _escape_broken_help(add_arguments(add(parser)))

    @functools.wraps(validate)
    def validate_args(args, defaults={}):  # noqa: B006 - Megatron's own signature
        # Ours first: Megatron's checks assert on the same sizes without naming our flags. The MoE flags
        # after Megatron's, on the config it builds from the validated arguments.
        validate_fold_args(args)
        check_implementation(args)
        try:
            result = validate(args, defaults)
        except AssertionError as e:  # Megatron's argument checks are asserts: one line, not a traceback per rank
            frame = traceback.extract_tb(e.__traceback__)[-1]
            raise FoldArgumentError(f"Megatron-LM refused the arguments ({os.path.basename(frame.filename)}:"
                                    f"{frame.lineno}): {e}") from None
        if args.moe_fold:
            check_moe_flags(args)
        return result

    arguments.add_megatron_arguments = add_megatron_arguments
    arguments.validate_args = validate_args


def _argument_error(prog: str, message: str):
    """argparse's error without the usage (Megatron-LM's runs to ~700 lines), printed by the first rank only."""
    if is_first_rank():
        print(f"{prog}: error: {message} (--help lists every argument)", file=sys.stderr, flush=True)
    sys.exit(2)


def check_implementation(args) -> None:
    """Megatron-LM defaults to Transformer Engine layers, and to kernels from Transformer Engine and NVIDIA
    Apex. Without Transformer Engine its default layers fail deep in model building ('NoneType' object is
    not callable): refused here, naming the flag, because Megatron's local layers are a choice with a cost
    on GPUs. A fused kernel whose package is missing has one value that runs, off: set, with a note."""
    from megatron.core.models import backends
    from megatron.core.tensor_parallel import layers

    have_te = specs._have_transformer_engine()
    if args.transformer_impl == "transformer_engine" and not have_te:
        raise FoldArgumentError("Transformer Engine is not installed, and --transformer-impl is transformer_engine "
                                "(Megatron-LM's default): pass --transformer-impl local (Megatron's own layers; "
                                "slower on GPUs), or install Transformer Engine (pip install 'megatron-fold[te]')")
    local = args.transformer_impl == "local"
    rope = args.position_embedding_type == "rope" or args.use_rotary_position_embeddings
    only_value = [  # (missing kernel, argument, the value that runs, its flag, why)
        (local and not backends.HAVE_APEX, "no_persist_layer_norm", True, "--no-persist-layer-norm",
         "without NVIDIA Apex, Megatron's local layers use torch's layer norm, which has no persistent kernel"),
        (local and not layers._grad_accum_fusion_available, "gradient_accumulation_fusion", False,
         "--no-gradient-accumulation-fusion", "its kernel, fused_weight_gradient_mlp_cuda, comes with NVIDIA Apex"),
        (rope and not have_te, "apply_rope_fusion", False, "--no-rope-fusion",
         "the fused RoPE kernel comes with Transformer Engine"),
    ]
    for missing, dest, value, flag, why in only_value:
        if missing and getattr(args, dest) != value:
            setattr(args, dest, value)
            if is_first_rank():
                print(f"megatron-fold: note: {flag} set: {why}", flush=True)


def _escape_broken_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM core_v0.19's own `--help` raises ValueError: the help of
    --moe-paged-stash-buffer-size-factor-cuda says "10%", which argparse reads as a format directive.
    A help text that does not format is escaped, so `--help` prints (and lists our flags)."""
    for action in parser._actions:
        if action.help and "%" in action.help:
            try:
                action.help % dict(vars(action), prog=parser.prog)
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")
    return parser


def uninstall_arguments() -> None:
    from megatron.training import arguments

    if _ORIGINAL:
        arguments.add_megatron_arguments = _ORIGINAL.pop("add")
        arguments.validate_args = _ORIGINAL.pop("validate")


def layout_from_args(args) -> FoldedLayout:
    """The FoldedLayout Megatron-LM builds for these arguments (initialize.py's sizes and order)."""
    return FoldedLayout(
        world_size=args.world_size, tp=args.tensor_model_parallel_size, cp=args.context_parallel_size,
        pp=args.pipeline_model_parallel_size, ep=args.expert_model_parallel_size,
        etp=args.expert_tensor_parallel_size,
        order=TP_PP_DP_ORDER if getattr(args, "use_tp_pp_dp_mapping", False) else DEFAULT_ORDER,
        gpus_per_node=min(args.world_size, 8), num_experts=args.num_experts,
    )


def check_moe_flags(args) -> None:
    """Megatron's MoE flags FoldMoELayer cannot honour, decided by megatron_fold.moe.flags on the
    TransformerConfig Megatron-LM builds from these (validated) arguments; FoldArgumentError names the
    Megatron-LM flags of the refused fields."""
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_fold.moe.flags import validate_fold_moe_config

    config = core_transformer_config_from_args(args)  # Megatron's own errors stay Megatron's
    try:
        validate_fold_moe_config(config, args.moe_fold_drop_scope)
    except ValueError as e:
        flags = [flag for dest, flag in _flags_by_dest().items() if re.search(rf"(?<![\w]){dest}(?![\w])", str(e))]
        raise FoldArgumentError(f"--moe-fold cannot run with these Megatron-LM arguments: {e}"
                                + (f" (Megatron-LM flags: {', '.join(flags)})" if flags else "")) from None


@functools.cache
def _flags_by_dest() -> dict[str, str]:
    """Megatron-LM's own flag for each argument name (moe_token_dispatcher_type -> --moe-token-dispatcher-type)."""
    from megatron.training import arguments

    parser = _ORIGINAL.get("add", arguments.add_megatron_arguments)(argparse.ArgumentParser(add_help=False))
    out = {}
    for action in parser._actions:
        longest = max(action.option_strings, key=len, default=None)
        if longest and action.dest not in out:
            out[action.dest] = longest
    return out


def validate_fold_args(args) -> None:
    """Raise FoldArgumentError naming the flags when the plugin flags (or what they meet) cannot run.

    Runs before Megatron's own validate_args, on the arguments as parsed (ETP may still be None: it
    then follows TP, as Megatron sets it).
    """
    if not getattr(args, "moe_fold", False):
        given = [flag for dest, flag in _OPTION_FLAGS.items() if getattr(args, dest, _DEFAULTS[dest]) != _DEFAULTS[dest]]
        if given:
            raise FoldArgumentError(f"{', '.join(given)} only apply with --moe-fold; add --moe-fold or drop them")
        return
    problems = []
    if not args.num_experts:
        problems.append("--moe-fold needs an MoE model: set --num-experts")
    spec = list(args.spec) if args.spec is not None else None
    if spec != SPEC:
        problems.append(f"--moe-fold builds its layers through --spec {' '.join(SPEC)}, but --spec is "
                        f"{' '.join(spec) if spec else 'not set'}; run `python -m megatron_fold.pretrain_gpt`, "
                        f"which sets it, or pass --spec {' '.join(SPEC)}")
    if args.moe_fold_log_interval < 0:
        problems.append(f"--moe-fold-log-interval must be >= 0, got {args.moe_fold_log_interval}")
    if args.moe_fold_log_interval and not args.moe_fold_metrics:
        problems.append("--moe-fold-log-interval needs the metrics --moe-fold-no-metrics turns off")
    if args.num_experts:
        try:
            layout_from_args(args)
        except LayoutError as e:
            sizes = (f"--tensor-model-parallel-size {args.tensor_model_parallel_size}, --context-parallel-size "
                     f"{args.context_parallel_size}, --pipeline-model-parallel-size {args.pipeline_model_parallel_size}, "
                     f"--expert-model-parallel-size {args.expert_model_parallel_size}, --expert-tensor-parallel-size "
                     f"{args.expert_tensor_parallel_size if args.expert_tensor_parallel_size is not None else '(TP)'}, "
                     f"--num-experts {args.num_experts} on WORLD_SIZE {args.world_size}")
            problems.append(f"--moe-fold: {sizes} is not a folded layout:\n" + "\n".join(f"    {v}" for v in e.violations))
    if problems:
        raise FoldArgumentError("--moe-fold cannot run with these Megatron-LM arguments:\n"
                                + "\n".join(f"  - {p}" for p in problems))


def _megatron_args():
    from megatron.training.global_vars import get_args

    try:
        args = get_args()
    except AssertionError:
        args = None
    if args is None or not hasattr(args, "moe_fold"):
        raise RuntimeError(
            f"--spec {' '.join(SPEC)} needs the --moe-fold flags in Megatron-LM's arguments: run "
            "`python -m megatron_fold.pretrain_gpt ... --moe-fold`, or a pretrain_gpt.py patched with "
            "patches/pretrain_gpt-core_v0.19.0.patch")
    if not args.moe_fold:
        raise RuntimeError(f"--spec {' '.join(SPEC)} is the --moe-fold layer spec; add --moe-fold")
    return args


def fold_layer_spec(config, vp_stage: int | None = None):
    """Megatron's default layer spec for `config` (a GPTModelConfig) with FoldMoELayer at every MoE position.

    Called by GPTModelBuilder.build_model once per virtual pipeline stage, on every rank, after
    Megatron built its process groups.
    """
    from megatron.training.models.gpt import default_layer_spec

    args = _megatron_args()
    specs.install(drop_scope=args.moe_fold_drop_scope, check_finite=args.moe_fold_check_finite,
                  metrics=args.moe_fold_metrics)
    layout = layout_from_args(args)
    _verify_once(layout)
    spec = default_layer_spec(config, vp_stage)
    if config.transformer.transformer_impl != "transformer_engine":
        # Megatron's local norm refuses sequence parallelism and its local attention refuses CP.
        spec = portable.adapt_spec(spec)
    if not any(getattr(h, "is_fold_pre_wrap_hook", False) for h in config.pre_wrap_hooks):
        # GPTModelBuilder composes the hooks over this very list and runs them after all stages are built.
        config.pre_wrap_hooks.append(_PreWrapHook(layout, args.moe_fold_drop_scope, args.moe_fold_check_finite,
                                                  args.moe_fold_metrics, args.moe_fold_log_interval))
    return spec


_VERIFIED: dict = {}


def _verify_once(layout: FoldedLayout) -> None:
    """Check Megatron's groups against the layout on the first call of a build: a collective over the world,
    so it must come before the first GPTModel of any rank (whose constructors run their own collectives,
    e.g. the embedding all-reduce, at different stages on different pipeline ranks). Re-checked after
    Megatron rebuilds its groups."""
    from megatron.core import parallel_state as mpu

    key = (layout, id(mpu.get_model_parallel_group()))
    if key not in _VERIFIED:
        parallel_state.verify_groups(layout)
        _VERIFIED.clear()
        _VERIFIED[key] = True


class _PreWrapHook:
    """Runs on the bare model chunks before Megatron's mixed-precision and DDP wrappers."""

    is_fold_pre_wrap_hook = True

    def __init__(self, layout: FoldedLayout, drop_scope: str, check_finite: bool, metrics: bool, log_interval: int):
        self.layout, self.drop_scope, self.check_finite = layout, DropScope.parse(drop_scope), check_finite
        self.metrics, self.log_interval = metrics, log_interval

    def __call__(self, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        from megatron_fold.moe.layer import FoldMoELayer

        for chunk in chunks:
            for name, module in chunk.named_modules():
                if isinstance(module, MoELayer) and not isinstance(module, FoldMoELayer):
                    raise RuntimeError(f"--moe-fold: {name} is Megatron's {type(module).__name__}, not FoldMoELayer: "
                                       "something built it without the plugin's spec builders")
                if isinstance(module, FoldMoELayer):
                    if module.drop_scope is not self.drop_scope:
                        raise RuntimeError(f"--moe-fold: {name} has drop scope {module.drop_scope.value}, "
                                           f"--moe-fold-drop-scope is {self.drop_scope.value}")
                    if self.log_interval:
                        module.register_forward_pre_hook(_MetricsLogger(name, self.log_interval))
            retagged = parallel_state.check_expert_params(chunk, self.layout, fix=True)
            if retagged and dist.get_rank() == 0:
                print(f"megatron-fold: tagged {len(retagged)} expert parameter(s) for the expert data-parallel "
                      f"group: {', '.join(retagged[:5])}{' ...' if len(retagged) > 5 else ''}", flush=True)
        return chunks


class _MetricsLogger:
    """Forward pre-hook: every `interval` forwards of a FoldMoELayer, its metrics of the previous forward
    (and backward). metrics() may all-reduce over TP x CP, whose ranks run the same layers in the same
    order, so every rank calls it; the first rank of the stage's TP x DP x CP group prints."""

    def __init__(self, name: str, interval: int):
        self.name, self.interval, self.calls = name, interval, 0

    def __call__(self, layer, inputs):
        self.calls += 1
        if self.calls == 1 or (self.calls - 1) % self.interval:
            return
        m = layer.metrics()
        if dist.get_rank(layer.router.tp_dp_cp_group) == 0:
            print(f"megatron-fold: {self.name} (forward {self.calls - 1}, rank {dist.get_rank()}): dropped "
                  f"{100 * m.dropped_fraction:.2f}%, max/mean load {m.max_over_mean_load:.2f}, tokens per expert "
                  f"{m.tokens_per_expert}", flush=True)
