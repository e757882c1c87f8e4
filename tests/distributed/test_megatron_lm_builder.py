"""Megatron-LM's own path builds FoldMoELayer: parse_args -> validate_args -> gpt_config_from_args (--spec) ->
pretrain_cfg_container_from_args -> GPTModelBuilder.build_distributed_models, on 8 gloo ranks in CPU mode.

Every step is Megatron-LM's (the wheel's megatron.training), called as pretrain_gpt.py and training.py
call it; the process groups come from Megatron's initialize_model_parallel with initialize.py's
arguments. The plugin takes part only through the flags install_arguments() adds and the --spec
target. Checked on each rank: every MoE position (per --moe-layer-freq) is a FoldMoELayer with the
requested options and every dense one is not; the dispatcher's EP, ETP and ETP x EP groups are
FoldedLayout's; DDP put every expert parameter, and only those, in its expert buffers, reduced over
FoldedLayout's EDP group (when the expert grid differs from the attention grid). Expert parameters are
named by Megatron's module path (`.mlp.experts.`), not by the plugin's classification.

The plugin's pre-wrap hook repairs tags: a hook placed before it strips an expert weight's tag and tags
a dense weight as expert in every chunk; after Megatron's DDP wrap each sits in the right buffer, and
rank 0 printed what was retagged.
"""

import contextlib
import io
import os
import re
import sys

import pytest
import torch.distributed as dist

from megatron_fold import FoldedLayout
from megatron_fold.testing.multirank import run_on_ranks

W = 8
MODEL = ["--num-layers=4", "--hidden-size=16", "--num-attention-heads=4", "--ffn-hidden-size=32",
         "--num-experts=8", "--moe-router-topk=2", "--moe-ffn-hidden-size=8", "--seq-length=16",
         "--max-position-embeddings=16", "--micro-batch-size=1", "--global-batch-size=8",
         "--normalization=RMSNorm", "--swiglu", "--disable-bias-linear", "--position-embedding-type=rope",
         "--tokenizer-type=NullTokenizer", "--vocab-size=64", "--lr=1e-4", "--train-iters=2", "--mock-data",
         # CPU: Megatron's local modules without fused kernels
         "--transformer-impl=local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
         "--no-persist-layer-norm", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
         "--moe-fold", "--spec", "megatron_fold.megatron_lm", "fold_layer_spec"]

# name -> (layout sizes, extra Megatron-LM arguments, MoE pattern over the 4 layers)
LAYOUTS = {
    "tp2-sp-ep4-etp1": (dict(tp=2, ep=4, etp=1),
                        ["--tensor-model-parallel-size=2", "--sequence-parallel", "--expert-model-parallel-size=4",
                         "--expert-tensor-parallel-size=1", "--moe-fold-drop-scope=sequence",
                         "--moe-expert-capacity-factor=1.0"], [1, 1, 1, 1]),
    "pp2-vpp2-ep4-dense-first": (dict(pp=2, ep=4),
                                 ["--pipeline-model-parallel-size=2", "--num-layers-per-virtual-pipeline-stage=1",
                                  "--expert-model-parallel-size=4", "--moe-layer-freq=[0,1,1,1]",
                                  "--moe-fold-check-finite"], [0, 1, 1, 1]),
    "cp2-ep8": (dict(cp=2, ep=8),
                ["--context-parallel-size=2", "--expert-model-parallel-size=8", "--moe-fold-no-metrics",
                 "--moe-fold-drop-scope=sequence"], [1, 1, 1, 1]),
    "tp2-sp-ep2-etp2-tp-pp-dp": (dict(tp=2, ep=2, etp=2, order="tp-cp-ep-pp-dp"),
                                 ["--tensor-model-parallel-size=2", "--sequence-parallel",
                                  "--expert-model-parallel-size=2", "--expert-tensor-parallel-size=2",
                                  "--use-tp-pp-dp-mapping", "--moe-layer-freq=[1,0,1,0]"], [1, 0, 1, 0]),
}


def megatron_lm_args(argv, world_size, rank):
    """Megatron-LM's parse_args + validate_args with the plugin flags, as on a GPU machine before Hopper's
    successor (validate_args asks the device for its architecture, CUDA_DEVICE_MAX_CONNECTIONS=1)."""
    from megatron.training import arguments

    from megatron_fold import megatron_lm

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), CUDA_DEVICE_MAX_CONNECTIONS="1")
    arguments.get_device_arch_version = lambda: 9
    megatron_lm.install_arguments()
    saved = sys.argv
    sys.argv = ["pretrain_gpt.py", *argv]
    try:
        args = arguments.parse_args()
        arguments.validate_args(args, {})
    finally:
        sys.argv = saved
    return args


def _break_tags(chunks, broken):
    """A pre-wrap hook run before the plugin's: in each chunk, the first expert weight loses its tag (as a
    module built outside Megatron's linears would) and the first attention weight is tagged expert."""
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        names = []
        expert = next((n for n in params if ".mlp.experts." in n), None)
        if expert is not None:  # a dense-only chunk has none
            del params[expert].allreduce
            names.append(expert)
        dense = next(n for n in params if ".self_attention." in n)
        params[dense].allreduce = False
        names.append(dense)
        broken.append(sorted(names))
    return chunks


def _build(rank, world_size, argv, break_tags=False):
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.global_vars import set_args

    from megatron_fold.moe.layer import FoldMoELayer

    args = megatron_lm_args(argv, world_size, rank)
    set_args(args)
    # initialize.py's call (the arguments that shape groups)
    mpu.initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size, expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        order="tp-cp-ep-dp-pp" if not args.use_tp_pp_dp_mapping else "tp-cp-ep-pp-dp",
        create_gloo_process_groups=False)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    model_cfg = gpt_config_from_args(args)
    cfg = pretrain_cfg_container_from_args(args, model_cfg)
    broken = []
    if break_tags:  # the builder runs the hooks in list order; fold_layer_spec appends the plugin's
        cfg.model.pre_wrap_hooks.insert(0, lambda chunks: _break_tags(chunks, broken))
    # training.py's setup_model_and_optimizer
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        chunks = cfg.model.get_builder_cls()(cfg.model).build_distributed_models(
            pg_collection=ProcessGroupCollection.use_mpu_process_groups(), ddp_config=cfg.ddp,
            overlap_param_gather_with_optimizer_step=cfg.optimizer.overlap_param_gather_with_optimizer_step,
            use_megatron_fsdp=cfg.dist.use_megatron_fsdp, use_torch_fsdp2=cfg.dist.use_torch_fsdp2,
            wrap_with_ddp=True, data_parallel_random_init=cfg.rng.data_parallel_random_init)

    out = {"layers": {}, "groups": [], "expert_buffers": [], "dense_buffers": [], "misplaced": [],
           "broken": broken, "printed": [line for line in printed.getvalue().splitlines() if "tagged" in line]}
    for ddp in chunks:
        model = ddp.module
        expert_names = {name for name, _ in model.named_parameters() if ".mlp.experts." in name}
        for module in model.modules():
            if isinstance(module, TransformerLayer):
                mlp = module.mlp
                entry = {"fold": isinstance(mlp, FoldMoELayer), "class": type(mlp).__name__}
                if isinstance(mlp, FoldMoELayer):
                    entry.update(drop_scope=mlp.drop_scope.value, check_finite=mlp.router.check_finite,
                                 metrics=mlp.router.record_token_counts)
                    d = mlp.token_dispatcher
                    out["groups"].append({name: dist.get_process_group_ranks(g) for name, g in
                                          (("ep", d.ep_group), ("etp", d.tp_group), ("tp_ep", d.tp_ep_group))})
                out["layers"][module.layer_number] = entry
        in_expert = {id(p) for b in ddp.expert_parallel_buffers for p in b.params}
        for name, param in model.named_parameters():
            if (id(param) in in_expert) != (name in expert_names):
                out["misplaced"].append(name)
        out["expert_buffers"] += [dist.get_process_group_ranks(b.data_parallel_group) for b in ddp.expert_parallel_buffers]
        out["dense_buffers"] += [dist.get_process_group_ranks(b.data_parallel_group) for b in ddp.buffers]
        out["n_expert_params"] = len(expert_names)
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_megatron_lm_builder_builds_fold_layers(name):
    sizes, extra, pattern = LAYOUTS[name]
    argv = MODEL + extra
    layout = FoldedLayout(W, **sizes)
    results = run_on_ranks(_build, W, argv, timeout=240)
    drop_scope = "sequence" if "--moe-fold-drop-scope=sequence" in extra else "subsequence"
    layers_seen = set()
    for rank, out in enumerate(results):
        assert not out["misplaced"], f"rank {rank}: expert/dense parameters in the wrong DDP buffers: {out['misplaced']}"
        for number, entry in out["layers"].items():
            layers_seen.add(number)
            if pattern[number - 1]:
                assert entry["fold"], f"rank {rank} layer {number}: {entry['class']}, not FoldMoELayer"
                assert entry["drop_scope"] == drop_scope
                assert entry["check_finite"] == ("--moe-fold-check-finite" in extra)
                assert entry["metrics"] == ("--moe-fold-no-metrics" not in extra)
            else:
                assert entry["class"] == "MLP", f"rank {rank} layer {number} should be dense, is {entry['class']}"
        for groups in out["groups"]:
            assert groups == {"ep": layout.group_of("ep", rank), "etp": layout.group_of("etp", rank),
                              "tp_ep": layout.group_of("tp_ep", rank)}, f"rank {rank}"
        assert out["n_expert_params"] > 0
        assert out["expert_buffers"], f"rank {rank}: DDP has no expert buffer"
        for ranks in out["expert_buffers"]:
            assert sorted(ranks) == layout.group_of("edp", rank), f"rank {rank}: expert grads reduce over {ranks}"
        for ranks in out["dense_buffers"]:
            assert sorted(ranks) == layout.group_of("dp_cp", rank), f"rank {rank}: dense grads reduce over {ranks}"
    assert layers_seen == {1, 2, 3, 4}


def test_pre_wrap_hook_repairs_expert_tags():
    """Megatron tags its own experts right, so the builds above never need the repair; this one does."""
    name = "pp2-vpp2-ep4-dense-first"  # two chunks per rank, the first of pipeline stage 0 dense-only
    sizes, extra, _ = LAYOUTS[name]
    layout = FoldedLayout(W, **sizes)
    results = run_on_ranks(_build, W, MODEL + extra, True, timeout=240)
    for rank, out in enumerate(results):
        assert len(out["broken"]) == 2 and all(out["broken"]), out["broken"]
        assert not out["misplaced"], f"rank {rank}: parameters in the wrong DDP buffers: {out['misplaced']}"
        for ranks in out["expert_buffers"]:
            assert sorted(ranks) == layout.group_of("edp", rank)
    # Rank 0 prints, per chunk, how many parameters it retagged and their names; no other rank prints.
    printed = [re.fullmatch(r"megatron-fold: tagged (\d+) expert parameter\(s\) for the expert data-parallel "
                            r"group: (.*)", line) for line in results[0]["printed"]]
    assert all(printed), results[0]["printed"]
    assert sorted((int(m[1]), sorted(m[2].split(", "))) for m in printed) == sorted(
        (len(names), names) for names in results[0]["broken"]), results[0]["printed"]
    assert all(out["printed"] == [] for out in results[1:])
