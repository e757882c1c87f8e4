"""`megatron-fold train`: options, checks before any rank starts, ranks, and the final summary.

Ranks: by default this command forks `--ranks` ranks on this machine (gloo on CPU; nccl with one GPU
per rank when CUDA is there). Under torchrun or srun (RANK / WORLD_SIZE / MASTER_ADDR set) it is one
rank of that job instead and joins it. Either way a rank that fails stops every rank with its message,
and Ctrl-C leaves no process behind.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_fold.layout import FoldedLayout, LayoutError
from megatron_fold.moe.capacity import DropScope

__all__ = ["add_arguments", "run", "spec_from_args", "check_spec"]

_SIZE_FLAGS = {  # flag -> TransformerConfig field, to scale a preset down (or up)
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
    "num_experts": "num_moe_experts", "moe_ffn_hidden_size": "moe_ffn_hidden_size", "topk": "moe_router_topk",
    "shared_expert_intermediate_size": "moe_shared_expert_intermediate_size", "kv_channels": "kv_channels",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mixtral-like",
                   help="mixtral-like, qwen2-moe-like, or a planner preset (mixtral-8x7b, qwen2-57b-a14b, ...) "
                        "scaled by the size flags")
    g.add_argument("--hf-config", help="a Hugging Face config.json of the Mixtral / Qwen2-MoE / Qwen3-MoE family "
                                        "(prints which fields are taken, replaced and ignored)")
    for flag in _SIZE_FLAGS:
        g.add_argument("--" + flag.replace("_", "-"), type=int, default=None,
                       help="0: no shared expert" if flag == "shared_expert_intermediate_size" else None)
    g.add_argument("--vocab-size", type=int, default=None,
                   help="embedding rows before padding (default: the tokenizer's vocabulary, not --hf-config's)")
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--drop-scope", choices=[s.value for s in DropScope], default="sequence")
    g.add_argument("--capacity-factor", type=float, default=None, help="token dropping (default: dropless)")
    g.add_argument("--dropless", action="store_true", help="no token dropping (the default)")
    g.add_argument("--drop-policy", choices=["probs", "position"], default="probs",
                   help="which routed tokens an over-capacity expert keeps: the most probable, or the earliest")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 parameters and activations: Megatron's Float16Module and mixed-precision optimizer "
                        "(fp32 main weights); the router still gates to fp32 logits and decides drops in fp32")
    g.add_argument("--aux-loss-coeff", type=float, default=None,
                   help="load-balancing loss coefficient (default: --hf-config's router_aux_loss_coef, else 0.01)")
    g.add_argument("--z-loss-coeff", type=float, default=None)
    g = p.add_argument_group("layout and ranks")
    g.add_argument("--layout", default="ep8", help="e.g. tp2,ep4,etp1 or tp1,cp2,pp2,ep4 (+ vpp2, mbs1)")
    g.add_argument("--compare-layouts", nargs="+", metavar="LAYOUT",
                   help="train the same model on the same batches under each layout and compare the losses")
    g.add_argument("--ranks", type=int, default=8, help="ranks to start on this machine (ignored under torchrun)")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", help="prefix of a Megatron .bin/.idx dataset (default: the Python stdlib corpus)")
    g.add_argument("--mock-data", action="store_true", help="Megatron's mock dataset")
    g.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (default: bytes)")
    g.add_argument("--data-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "megatron-fold"))
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=100)
    g.add_argument("--global-batch", type=int, default=16)
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per micro-batch (default: the largest every layout of the run allows; "
                        "the aux loss is computed per micro-batch, so compared layouts share one size)")
    g.add_argument("--log-interval", type=int, default=5, help="MoE metrics every N steps")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--warmup-steps", type=int, default=10)
    g.add_argument("--lr-decay-steps", type=int, default=None,
                   help="cosine decay horizon (default: --steps; give the whole run's length when resuming)")
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--plain-optimizer", action="store_true",
                   help="Megatron's unsharded optimizer instead of the distributed one (a checkpoint resumes "
                        "only with the kind it was saved with)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--eval-interval", type=int, default=25)
    g.add_argument("--eval-batches", type=int, default=2)
    g.add_argument("--save", help="write a dist_checkpointing checkpoint here at the end")
    g.add_argument("--load", help="resume from this checkpoint (any layout)")
    g.add_argument("--out", default="megatron-fold-train", help="directory for metrics.jsonl, plots, summary")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--show-warnings", action="store_true", help="do not silence Megatron's and torch's warnings")


def _parse_layout(text: str) -> dict:
    from megatron_fold.plan.command import parse_layout

    spec = parse_layout(text)
    if spec.pop("recompute"):
        raise ValueError(f"--layout {text}: recompute is a planner option; train does not take it")
    return spec


def _model_config(args):
    """(model family, TransformerConfig overrides, rotary base, the HFModel of --hf-config or None)."""
    from megatron_fold import models

    overrides: dict = {}
    family, hf = args.model, None
    if args.hf_config:
        from megatron_fold.train.hf_config import read_hf_config

        hf = read_hf_config(args.hf_config)
        family, overrides = hf.family, hf.config
    elif family not in models.MODEL_FAMILIES:
        from megatron_fold.plan.models import get_model

        shape = get_model(family)
        family = "qwen2-moe-like" if shape.shared_expert_ffn else "mixtral-like"
        overrides.update(num_layers=shape.num_layers, hidden_size=shape.hidden, num_attention_heads=shape.num_heads,
                         num_query_groups=shape.num_query_groups, kv_channels=shape.head_dim,
                         ffn_hidden_size=shape.moe_ffn, num_moe_experts=shape.num_experts,
                         moe_router_topk=shape.topk, moe_ffn_hidden_size=shape.moe_ffn,
                         add_qkv_bias=shape.qkv_bias, qk_layernorm=shape.qk_layernorm,
                         moe_shared_expert_intermediate_size=shape.shared_expert_ffn or None,
                         moe_shared_expert_gate=shape.shared_expert_gate)

    def override(field, value, flag):
        if hf is not None:
            hf.replace(field, value, flag)
        else:
            overrides[field] = value

    for flag, field in _SIZE_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if field == "moe_shared_expert_intermediate_size":
            override(field, value or None, "--shared-expert-intermediate-size")
            overrides["moe_shared_expert_gate"] = bool(value) and overrides.get(
                "moe_shared_expert_gate", models.MODEL_FAMILIES[family].config.get("moe_shared_expert_gate", False))
        else:
            override(field, value, "--" + flag.replace("_", "-"))
    if args.hidden_size is not None and args.kv_channels is None and "kv_channels" in overrides:
        heads = overrides.get("num_attention_heads", models.MODEL_FAMILIES[family].config["num_attention_heads"])
        override("kv_channels", args.hidden_size // heads, "follows --hidden-size / heads; --kv-channels to choose")
    if args.capacity_factor is not None and args.dropless:
        raise ValueError("--capacity-factor and --dropless contradict each other; give one")
    if args.capacity_factor is not None:
        overrides["moe_expert_capacity_factor"] = args.capacity_factor
        overrides["moe_token_drop_policy"] = args.drop_policy
    if args.aux_loss_coeff is not None:
        override("moe_aux_loss_coeff", args.aux_loss_coeff, "--aux-loss-coeff")
    overrides.setdefault("moe_aux_loss_coeff", 1e-2)
    if args.bf16:
        import torch

        overrides.update(bf16=True, params_dtype=torch.bfloat16, moe_router_dtype="fp32")
    if args.z_loss_coeff is not None:
        overrides["moe_z_loss_coeff"] = args.z_loss_coeff
    return family, overrides, hf.rotary_base if hf else 10000.0, hf


def _vocab_rows(args, tokenizer) -> int:
    """Embedding rows before TP padding: the tokenizer's vocabulary, or --vocab-size (at least that)."""
    if args.vocab_size is None:
        return tokenizer.vocab_size
    if args.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"--vocab-size {args.vocab_size} is smaller than the tokenizer's vocabulary of "
                         f"{tokenizer.vocab_size}; token ids beyond it would index past the embedding")
    return args.vocab_size


def hf_config_report(args) -> str:
    """What --hf-config gave the model (taken, replaced, ignored), printed before any rank starts."""
    return hf_config_account(args).report() + "\n  (embedding rows are padded to a multiple of 128 x max(TP, 8), as Megatron-LM pads to 128 x TP)"


def hf_config_account(args):
    """The HFModel of --hf-config with this run's flags applied, and the vocabulary and sequence length this
    run uses in place of the config's."""
    from megatron_fold.train import data as data_mod

    hf = _model_config(args)[3]
    tokenizer = data_mod.load_tokenizer(args.tokenizer)
    rows = _vocab_rows(args, tokenizer)
    vocab = f"{hf.vocab_size} -> embedding rows {rows}"
    why = "--vocab-size" if args.vocab_size is not None else f"the tokenizer's vocabulary: {args.tokenizer or 'bytes'}"
    if rows == hf.vocab_size:
        hf.taken["vocab_size"] = f"{vocab} ({why})"
    else:
        hf.replaced["vocab_size"] = f"{vocab} ({why}{'' if args.vocab_size else '; --vocab-size sets the rows'})"
    if hf.max_position_embeddings is not None:
        hf.replaced["max_position_embeddings"] = (f"{hf.max_position_embeddings} -> {args.seq_length} (--seq-length, "
                                                  "the trained length; RoPE has no position table)")
    return hf


def spec_from_args(args, layout_text: str, out_dir: str):
    """A JobSpec for one layout (not yet checked against the world size: see check_spec)."""
    from megatron_fold.train import data as data_mod
    from megatron_fold.train.job import JobSpec
    from megatron_fold.train.loop import Schedule

    layout = _parse_layout(layout_text)
    if "mbs" not in layout:
        layout["mbs"] = args.micro_batch_size or _common_micro_batch(args)
    elif args.micro_batch_size and args.micro_batch_size != layout["mbs"]:
        raise ValueError(f"--layout {layout_text} says mbs{layout['mbs']} but --micro-batch-size is "
                         f"{args.micro_batch_size}; give one")
    family, overrides, rotary_base, _ = _model_config(args)
    tokenizer = data_mod.load_tokenizer(args.tokenizer)
    if args.mock_data and args.data_path:
        raise ValueError("--mock-data and --data-path contradict each other; give one")
    return JobSpec(
        family=family, config_overrides=overrides, layout=layout, drop_scope=args.drop_scope,
        vocab_size=data_mod.padded_vocab_size(_vocab_rows(args, tokenizer), layout.get("tp", 1)),
        rotary_base=rotary_base,
        seq_length=args.seq_length, global_batch=args.global_batch, steps=args.steps,
        schedule=Schedule(lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                          decay_steps=args.lr_decay_steps or args.steps, clip_grad=args.clip_grad),
        out_dir=out_dir, data_prefix=args.data_path, tokenizer=args.tokenizer,
        cache_dir=os.path.join(args.data_cache, "index"), seed=args.seed, eval_interval=args.eval_interval,
        eval_batches=args.eval_batches, log_interval=args.log_interval, save=args.save, load=args.load,
        distributed_optimizer=not args.plain_optimizer,
        progress=not args.no_progress, quiet=not args.show_warnings, title=layout_text)


def _world_size(args) -> int:
    return int(os.environ["WORLD_SIZE"]) if _under_torchrun() else args.ranks


def _common_micro_batch(args) -> int:
    """The largest micro-batch every layout of this run can use with at least PP micro-batches per
    replica (1 without pipelining), or 1. One size for all compared layouts matters: Megatron computes
    the aux loss per micro-batch, so micro-batches of other sizes give other gradients; with one size
    and contiguous DP shares, every layout groups the same sequences into micro-batches."""
    from megatron_fold.train.job import folded_layout

    shapes = []
    for text in args.compare_layouts or [args.layout]:
        layout = _parse_layout(text)
        try:
            dp = folded_layout(_world_size(args), layout).dp
        except LayoutError:
            return 1  # check_spec reports the layout itself
        if args.global_batch % dp:
            return 1
        shapes.append((args.global_batch // dp, layout.get("pp", 1)))
    mbs = min(per_replica // pp for per_replica, pp in shapes)
    if mbs < 1 or any(per_replica % mbs or per_replica // mbs < pp for per_replica, pp in shapes):
        return 1
    return mbs


def check_spec(spec, world_size: int) -> FoldedLayout:
    """Every check that needs no rank: the layout, what it must divide, the batch. Raises ValueError
    (LayoutError) naming the values; nothing has started yet."""
    from megatron_fold import models

    layout = spec.folded_layout(world_size)  # LayoutError on an impossible layout
    cfg = dict(models.MODEL_FAMILIES[spec.family].config) | spec.config_overrides
    vpp = spec.vpp or 1
    problems = []
    heads, groups = cfg["num_attention_heads"], cfg.get("num_query_groups") or cfg["num_attention_heads"]
    if heads % layout.tp or groups % layout.tp:
        problems.append(f"attention heads {heads} and query groups {groups} must divide by TP {layout.tp}")
    if cfg["num_moe_experts"] % layout.ep:
        problems.append(f"experts {cfg['num_moe_experts']} must divide by EP {layout.ep}")
    if cfg["num_layers"] % (layout.pp * vpp):
        problems.append(f"layers {cfg['num_layers']} must divide by PP x VPP = {layout.pp} x {vpp}")
    if vpp > 1 and layout.pp == 1:
        problems.append("virtual pipeline stages (vpp) need PP > 1")
    seq_div = layout.tp * layout.cp * (2 if layout.cp > 1 else 1)
    if spec.seq_length % seq_div:
        problems.append(f"sequence length {spec.seq_length} must divide by TP x CP{' x 2' if layout.cp > 1 else ''}"
                        f" = {seq_div}")
    for ffn_field in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        size = cfg.get(ffn_field)
        tp = layout.etp if ffn_field == "moe_ffn_hidden_size" else layout.tp
        if size and size % tp:
            problems.append(f"{ffn_field} {size} must divide by {'ETP' if tp == layout.etp else 'TP'} {tp}")
    if spec.global_batch % (layout.dp * spec.mbs):
        problems.append(f"global batch {spec.global_batch} must divide by DP x micro-batch = {layout.dp} x {spec.mbs}")
    if vpp > 1 and (spec.global_batch // (layout.dp * spec.mbs)) % layout.pp:
        problems.append(f"interleaved pipelining needs micro-batches per step "
                        f"({spec.global_batch // (layout.dp * spec.mbs)}) divisible by PP {layout.pp}")
    if spec.steps < 1:
        problems.append(f"--steps {spec.steps} must be at least 1")
    if problems:
        raise LayoutError([f"{p} (layout {layout.tp=} {layout.cp=} {layout.pp=} {layout.ep=} {layout.etp=}, "
                           f"vpp={vpp}, dp={layout.dp})".replace("layout.", "") for p in problems])
    return layout


def _check_checkpoint(spec, world_size: int, lr_decay_given: bool) -> None:
    """A checkpoint of another model shape fails here, before any rank starts. A resumed run keeps the
    learning-rate schedule the checkpoint was trained with (unless --lr-decay-steps says otherwise):
    its horizon is the whole run's, not this invocation's --steps."""
    import dataclasses

    from megatron_fold import checkpointing, models

    if spec.save and os.path.exists(spec.save):
        raise ValueError(f"--save {spec.save} already exists; choose a new directory (a checkpoint is never "
                         "overwritten)")
    if not spec.load:
        return
    config = models.model_config(spec.family, spec.folded_layout(world_size), virtual_pipeline_stages=spec.vpp,
                                 **spec.config_overrides)
    extra = checkpointing.check_model_shape(spec.load, config, spec.vocab_size).get("fold", {})
    saved_kind = extra.get("distributed_optimizer")
    if saved_kind is not None and saved_kind != spec.distributed_optimizer:
        kind = {True: "the distributed optimizer", False: "the plain optimizer (--plain-optimizer)"}
        raise ValueError(f"--load {spec.load} holds the state of {kind[saved_kind]}, but this run uses "
                         f"{kind[spec.distributed_optimizer]}: Megatron cannot load one into the other; "
                         f"{'drop' if spec.distributed_optimizer is False else 'add'} --plain-optimizer")
    if not lr_decay_given and extra.get("lr_decay_steps"):
        spec.schedule = dataclasses.replace(spec.schedule, decay_steps=extra["lr_decay_steps"],
                                            warmup_steps=extra.get("warmup_steps", spec.schedule.warmup_steps))


def _prepare_data(args, specs) -> None:
    """Tokenise the default corpus once, in this process, before any rank starts; check a given prefix."""
    from megatron_fold.train import data as data_mod

    tokenizer = data_mod.load_tokenizer(args.tokenizer)
    if args.mock_data:
        prefix = None
    elif args.data_path:
        data_mod.check_indexed_dataset(args.data_path, tokenizer.vocab_size)
        prefix = args.data_path
    else:
        name = "stdlib-" + ("bytes" if args.tokenizer is None else os.path.basename(os.path.dirname(
            os.path.abspath(args.tokenizer))) or "tok")
        prefix = data_mod.build_indexed_dataset(os.path.join(args.data_cache, f"py{sys.version_info[0]}"
                                                             f"{sys.version_info[1]}-{name}"),
                                                data_mod.default_corpus_files(), tokenizer)
    for spec in specs:
        spec.data_prefix = prefix


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _launch(spec, world_size: int):
    """Run the job on every rank; the rank-0 summary."""
    import torch

    from megatron_fold.train.job import run_job

    if _under_torchrun():
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        try:
            return run_job(dist.get_rank(), dist.get_world_size(), spec)
        finally:
            dist.destroy_process_group()
    from megatron_fold.testing.multirank import run_on_ranks

    backend = "gloo"
    if torch.cuda.is_available():
        if torch.cuda.device_count() < world_size:
            raise ValueError(f"--ranks {world_size} needs {world_size} GPUs; this machine has {torch.cuda.device_count()}")
        backend = "nccl"
    return run_on_ranks(run_job, world_size, spec, timeout=None, backend=backend)[0]


def run(args) -> int:
    if not args.show_warnings:
        from megatron_fold.train import silence_library_noise

        silence_library_noise()
    layouts = args.compare_layouts or [args.layout]
    if args.compare_layouts and args.load:
        raise ValueError("--compare-layouts starts every layout from the same initial weights; drop --load")
    world = _world_size(args)
    names = [text.replace(",", "-") for text in layouts]
    if len(set(names)) != len(names):
        raise ValueError(f"--compare-layouts: a layout is repeated ({' '.join(layouts)})")
    out_dirs = [os.path.join(args.out, n) if len(layouts) > 1 else args.out for n in names]
    specs = [spec_from_args(args, text, out_dir) for text, out_dir in zip(layouts, out_dirs)]
    if args.save and len(specs) > 1:  # one checkpoint per compared layout
        for spec, name in zip(specs, names):
            spec.save = os.path.join(args.save, name)
    for spec in specs:
        check_spec(spec, world)
        _check_checkpoint(spec, world, lr_decay_given=args.lr_decay_steps is not None)
    is_rank0 = not _under_torchrun() or int(os.environ["RANK"]) == 0
    if is_rank0 and args.hf_config:
        print(hf_config_report(args), flush=True)
    if is_rank0:
        for d in out_dirs:
            os.makedirs(d, exist_ok=True)
    _prepare_data(args, specs)
    if len(specs) > 1:  # every layout starts from the first one's initial weights
        init = os.path.join(args.out, "initial-weights")
        if is_rank0 and os.path.exists(init):
            import shutil

            shutil.rmtree(init)
        specs[0].save_initial = init
        for spec in specs[1:]:
            spec.init_checkpoint = init
    from megatron_fold.testing.multirank import MultiRankFailure

    summaries = {}
    for name, spec in zip(layouts, specs):
        try:
            summaries[name] = _launch(spec, world)
        except MultiRankFailure as e:  # every rank was stopped; say which failed first, and why
            print(f"megatron-fold: training under {name} failed: {e}", file=sys.stderr)
            return 1
    if not is_rank0:
        return 0
    return _report(args, layouts, specs, summaries)


def _agreement(runs: dict[str, list[dict]], drop_scope: str, rtol: float = 1e-5) -> list[str]:
    """How long the layouts' losses agree within `rtol`, and how far they part afterwards.

    Layouts sum in different orders, so their fp32 results differ by rounding (~1e-7). Training
    amplifies such differences sooner or later: a discrete choice within rounding of a tie (a token's
    top-k experts, or, with dropping, which token an expert keeps) goes the other way under one layout,
    or Adam's normalised step turns a rounding-sized gradient into a full-size update. From there the
    two runs drift apart as any two fp32 runs with different summation orders do. A layout-dependent
    computation (subsequence-scope dropping under TP or CP) differs from the first step instead.
    """
    from megatron_fold.train.metrics import loss_agreement

    relative, parted = loss_agreement(runs, rtol)
    agree = relative[:parted]
    lines = []
    if agree:
        lines.append(f"losses agree within {rtol:g} relative for steps 0-{len(agree) - 1} of {len(relative)} "
                     f"(largest difference there {max(agree):.1e}), drop scope {drop_scope}")
    if parted < len(relative):
        why = ("training amplified fp32 rounding differences (a routing or dropping choice within rounding "
               "of a tie, or Adam's step on a near-zero gradient)" if parted > 0 else
               "different from the first step, as subsequence-scope dropping under TP or CP is (its drops "
               "depend on the layout)")
        lines.append(f"from step {parted} on they differ (largest difference {max(relative):.1e} relative): {why}")
    return lines


def _report(args, layouts, specs, summaries) -> int:
    from megatron_fold.train import plots

    lines, files = [], []
    for name, spec in zip(layouts, specs):
        s = summaries[name]
        files += plots.plot_all(s["records"], spec.out_dir, f"{spec.family}, layout {name}")
        files.append(os.path.join(spec.out_dir, "metrics.jsonl"))
        valid = f", validation {s['final_valid_loss']:.4f}" if s["final_valid_loss"] is not None else ""
        lines.append(f"{name:<24} {s['layout']}: loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}{valid}, "
                     f"{s['tokens_per_s']:.0f} tokens/s on {s['world_size']} ranks"
                     f"{' (distributed optimizer)' if s['distributed_optimizer'] else ''}")
    if len(layouts) > 1:
        runs = {name: summaries[name]["records"] for name in layouts}
        files.append(plots.plot_compare(runs, os.path.join(args.out, "compare_loss.png")))
        lines += _agreement(runs, args.drop_scope)
    summary = "\n".join(lines)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    files.append(os.path.join(args.out, "summary.txt"))
    print(summary)
    print("files:\n" + "\n".join(f"  {p}" for p in files))
    return 0
