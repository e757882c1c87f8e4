"""Whole stock Megatron GPT models train identically under every folded layout (8 gloo ranks, fp32).

Each model is a stock Megatron-Core GPTModel built from Megatron's own block spec with the plugin
installed (megatron_fold.models), wrapped in Megatron's DistributedDataParallel, stepped by Megatron's
optimizer (plain or distributed) through Megatron's pipeline schedules. The reference is the same
model on ONE rank with Megatron's own local modules: no portable norm or attention, no layout. Both
start from the same full weights (each rank cuts its shards by each parameter's own TP / EP metadata)
and see the same global batch (split by DP rank and by Megatron's own get_batch_on_this_cp_rank). The
loss of every step (step 0 and after 1, 2, 3 optimizer steps) and every gradient norm must agree
within 1e-5 relative. Both families use RMSNorm; a LayerNorm variant of mixtral-like (whose norms have a
bias) is checked under TP 2 + SP, where the bias's gradient must be summed over TP like the weight's.

bf16 (test_bf16_whole_model_is_layout_invariant): the loss within a bf16 bound against a single-rank bf16
run, with the subsequence-scope control above it.

Controls prove the comparison can fail: subsequence-scope dropping under TP x CP > 1, and a
sequence-parallel norm whose parameters lack Megatron's `sequence_parallel` tag. Checkpoints: two
steps under one layout, saved with dist_checkpointing, two more under another layout, equal to four
uninterrupted steps.
"""

import os

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_fold import FoldedLayout, checkpointing, models, parallel_state
from megatron_fold.moe.layer import FoldMoELayer
from megatron_fold.portable.attention import ContextParallelDotProductAttention
from megatron_fold.testing import whole_model as wm
from megatron_fold.testing.multirank import run_on_ranks, rank_device

W = 8
STEPS = 4
SEQUENCES = 8  # global batch: 8 sequences, micro-batches of 1, split over DP x micro-batches
RTOL = 1e-5

LAYOUTS = {
    "tp2-sp-ep4": dict(tp=2, ep=4, etp=1),
    "cp2-ep8": dict(cp=2, ep=8),
    "cp4-ep8": dict(cp=4, ep=8),
    "pp2-1f1b-ep4": dict(pp=2, ep=4),
    "pp2-vpp2-ep4": dict(pp=2, ep=4, vpp=2),
    "ep8": dict(ep=8),
    "tp2-ep2-etp2": dict(tp=2, ep=2, etp=2),
    "ep1-etp2": dict(ep=1, etp=2),  # the expert grid differs from the attention grid by ETP alone
    "5d-tp2-cp2-pp2-ep4": dict(tp=2, cp=2, pp=2, ep=4, etp=1),
    "5d-tp2-cp2-pp2-ep2-etp2": dict(tp=2, cp=2, pp=2, ep=2, etp=2),
}
FAMILIES = ["mixtral-like", "qwen2-moe-like"]
# Test-only variants of a family, trained under one layout: both stock families use RMSNorm (a weight
# only), so this one checks that LayerNorm's bias gets the same sequence-parallel gradient sum under SP.
VARIANTS = {"mixtral-like-layernorm": ("mixtral-like", dict(normalization="LayerNorm"))}
# mode -> TransformerConfig overrides; aux loss is on in both (models._COMMON).
MODES = {"dropless": {}, "sequence-dropping": dict(moe_expert_capacity_factor=1.0)}
# bf16 end to end, as `megatron-fold train --bf16` runs it: Float16Module, fp32 main weights and gradient
# reduction, fp32 router logits; its own single-rank reference (test_bf16_whole_model_is_layout_invariant).
BF16_MODE = {"sequence-dropping-bf16": dict(moe_expert_capacity_factor=0.5, bf16=True, params_dtype=torch.bfloat16,
                                            moe_router_dtype="fp32")}


def _runs_for(layout_index: int):
    """(family, mode, optimizer) trained under one layout: every family x mode, with the plain and the
    distributed optimizer alternating so that each layout runs both and each (family, mode) meets both
    across layouts."""
    runs = []
    for i, (family, mode) in enumerate((f, m) for f in FAMILIES for m in MODES):
        optimizer = "distributed" if (i + layout_index) % 2 else "plain"
        runs.append((family, mode, optimizer))
    return runs


def _setup(world_size, layout_kwargs):
    layout_kwargs = dict(layout_kwargs)
    vpp = layout_kwargs.pop("vpp", None)
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout, virtual_pipeline_model_parallel_size=vpp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    return layout, pgs, vpp


def _build(family, mode, layout, pgs, vpp, *, drop_scope="sequence", fold=True, portable_modules=True):
    family, variant = VARIANTS.get(family, (family, {}))
    shape = models.MODEL_FAMILIES[family]
    config = models.model_config(family, layout, virtual_pipeline_stages=vpp, calculate_per_token_loss=True,
                                 **(MODES | BF16_MODE)[mode], **variant)
    chunks = models.build_model(config, pgs, vocab_size=shape.vocab_size, seq_length=shape.seq_length,
                                drop_scope=drop_scope, fold=fold, portable_modules=portable_modules)
    chunks = [c.to(rank_device()) for c in chunks]  # the CPU, or this rank's GPU in the 8-GPU smoke test
    return config, chunks, wm.global_tokens(SEQUENCES, shape.seq_length, shape.vocab_size, seed=11)


def _reference(rank, world_size):
    """Single rank, Megatron's own MoELayer and local modules: full weights and results per config."""
    layout, pgs, _ = _setup(1, {})
    weights, results = {}, {}
    try:
        configs = [(f, m) for f in FAMILIES for m in MODES] + [(v, "sequence-dropping") for v in VARIANTS]
        for family, mode in configs:
            torch.manual_seed(5)  # the same initial weights for both modes of a family
            # Megatron's own everything: MoELayer, WrappedTorchNorm, DotProductAttention.
            config, chunks, tokens = _build(family, mode, layout, pgs, None, fold=False, portable_modules=False)
            modules = [m for c in chunks for m in c.modules()]
            assert not any(isinstance(m, FoldMoELayer) for m in modules)
            assert not any(isinstance(m, ContextParallelDotProductAttention) for m in modules)
            assert any(type(m) is DotProductAttention for m in modules)
            weights.setdefault(family, wm.full_weights(chunks))
            wm.load_full_weights(chunks, weights[family], pgs)
            results[family, mode] = wm.train(chunks, config, pgs, tokens, steps=STEPS)
    finally:
        parallel_state.destroy_model_parallel()
    return weights, results


@pytest.fixture(scope="module")
def reference():
    return run_on_ranks(_reference, 1, timeout=300)[0]


def _layout_runs(rank, world_size, layout_kwargs, runs, weights, drop_scope="sequence", untag_norms=False):
    layout, pgs, vpp = _setup(world_size, layout_kwargs)
    out = {}
    try:
        for family, mode, optimizer in runs:
            config, chunks, tokens = _build(family, mode, layout, pgs, vpp, drop_scope=drop_scope)
            moe_layers = [m for c in chunks for m in c.modules() if isinstance(m, MoELayer)]
            assert moe_layers and all(isinstance(m, FoldMoELayer) for m in moe_layers), "stock spec built another MoE layer"
            assert all(m.drop_scope.value == drop_scope for m in moe_layers)
            assert wm.load_full_weights(chunks, weights[family], pgs) == sum(1 for c in chunks for _ in c.parameters())
            if untag_norms:
                for c in chunks:
                    for name, p in c.named_parameters():
                        if "layernorm" in name:
                            p.sequence_parallel = False
            out[family, mode, optimizer] = wm.train(chunks, config, pgs, tokens, steps=STEPS,
                                                    distributed_optimizer=optimizer == "distributed")
    finally:
        parallel_state.destroy_model_parallel()
    return out


def _max_rel_diff(results, expected):
    return max(max(abs(a.loss - b.loss) / abs(b.loss), abs(a.grad_norm - b.grad_norm) / abs(b.grad_norm))
               for a, b in zip(results, expected, strict=True))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_whole_model_is_layout_invariant(name, reference):
    weights, expected = reference
    runs = _runs_for(list(LAYOUTS).index(name))
    per_rank = run_on_ranks(_layout_runs, W, LAYOUTS[name], runs, weights, timeout=600)
    for family, mode, optimizer in runs:
        worst = max(_max_rel_diff(per_rank[r][family, mode, optimizer], expected[family, mode]) for r in range(W))
        print(f"invariance {name} {family} {mode} {optimizer}: max relative difference {worst:.1e}")
        for rank in range(W):
            got = per_rank[rank][family, mode, optimizer]
            diff = _max_rel_diff(got, expected[family, mode])
            assert diff <= RTOL, (
                f"{name} {family} {mode} {optimizer} optimizer, rank {rank}: max relative difference {diff:.2e} "
                f"from the single-rank run\n got      {[(r.loss, r.grad_norm) for r in got]}\n"
                f" expected {[(r.loss, r.grad_norm) for r in expected[family, mode]]}")
    # Training really moved: the loss after three steps is below the first.
    assert all(expected[k][-1].loss < expected[k][0].loss for k in expected)


def test_layernorm_model_is_layout_invariant(reference):
    """TP 2 with sequence parallelism: each TP rank's LayerNorm weight AND bias see different tokens, and
    only the sequence_parallel tag on both makes Megatron sum their gradients over TP."""
    weights, expected = reference
    family = "mixtral-like-layernorm"
    assert any(n.endswith("layernorm.bias") for n in weights[family]), "the variant has no LayerNorm bias"
    run = (family, "sequence-dropping", "plain")
    per_rank = run_on_ranks(_layout_runs, W, LAYOUTS["tp2-sp-ep4"], [run], weights, timeout=600)
    for rank in range(W):
        diff = _max_rel_diff(per_rank[rank][run], expected[run[:2]])
        assert diff <= RTOL, f"LayerNorm model under tp2-sp-ep4, rank {rank}: max relative difference {diff:.2e}"


@pytest.mark.parametrize("name,control", [
    ("tp2-sp-ep4", "subsequence"), ("cp2-ep8", "subsequence"), ("tp2-sp-ep4", "untagged-norm"),
])
def test_controls_fail_the_comparison(name, control, reference):
    """The same comparison must fail when the model really computes something else."""
    weights, expected = reference
    runs = [("mixtral-like", "sequence-dropping", "plain")]
    kwargs = dict(drop_scope="subsequence") if control == "subsequence" else dict(untag_norms=True)
    got = run_on_ranks(_layout_runs, W, LAYOUTS[name], runs, weights, timeout=600, **kwargs)[0][runs[0]]
    diff = _max_rel_diff(got, expected["mixtral-like", "sequence-dropping"])
    print(f"control {control} under {name}: max relative difference {diff:.1e}")
    assert diff > 10 * RTOL, f"{control} under {name} should differ from the single-rank run, differs by {diff:.2e}"


# The bf16 bound, on the loss: layouts round bf16 activations in different places (TP's split GEMMs and
# their reduction, CP's attention chunks), so the loss moves by a little; gradient norms in bf16 move by
# up to 1.1e-3 even with sequence scope (not compared here). Measured on this model, 4 steps at capacity
# factor 0.5 (deterministic on CPU): sequence scope at most 5.7e-5 (tp2-sp-ep4) and 3.5e-5 (cp2-ep8)
# against the single-rank bf16 run; the subsequence-scope control 2.9e-4 and 1.3e-4.
BF16_RTOL = 1e-4


def _bf16_reference(rank, world_size):
    layout, pgs, _ = _setup(1, {})
    try:
        torch.manual_seed(5)
        config, chunks, tokens = _build("mixtral-like", "sequence-dropping-bf16", layout, pgs, None, fold=False,
                                        portable_modules=False)
        weights = {"mixtral-like": wm.full_weights(chunks)}
        return weights, wm.train(chunks, config, pgs, tokens, steps=STEPS)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("name", ["tp2-sp-ep4", "cp2-ep8"])
def test_bf16_whole_model_is_layout_invariant(name):
    """bf16 training's loss stays layout-invariant within a bf16 bound, which the subsequence-scope
    control (drops decided per rank's shard) exceeds under the same layout."""
    weights, expected = run_on_ranks(_bf16_reference, 1, timeout=300)[0]
    runs = [("mixtral-like", "sequence-dropping-bf16", "distributed")]
    diffs = {}
    for scope in ("sequence", "subsequence"):
        per_rank = run_on_ranks(_layout_runs, W, LAYOUTS[name], runs, weights, timeout=600, drop_scope=scope)
        diffs[scope] = max(abs(a.loss - b.loss) / abs(b.loss)
                           for r in range(W) for a, b in zip(per_rank[r][runs[0]], expected, strict=True))
    print(f"bf16 invariance {name}: sequence scope {diffs['sequence']:.1e}, subsequence control "
          f"{diffs['subsequence']:.1e} (bound {BF16_RTOL:.0e})")
    assert diffs["sequence"] <= BF16_RTOL, diffs
    assert diffs["subsequence"] > BF16_RTOL, diffs
    assert expected[-1].loss < expected[0].loss  # training moved


def _train_and_save(rank, world_size, layout_kwargs, weights, optimizer, steps, save_dir=None, load_dir=None):
    layout, pgs, vpp = _setup(world_size, layout_kwargs)
    try:
        family, mode = "mixtral-like", "sequence-dropping"
        config, chunks, tokens = _build(family, mode, layout, pgs, vpp)
        if weights is not None:
            wm.load_full_weights(chunks, weights, pgs)
        trainer = wm.Trainer(chunks, config, pgs, distributed_optimizer=optimizer == "distributed")
        shape = models.MODEL_FAMILIES[family]
        extra = None
        if load_dir:
            extra = checkpointing.load(load_dir, trainer.model, trainer.optimizer, pgs, config=config,
                                       vocab_size=shape.vocab_size)
        results = [trainer.step(tokens) for _ in range(steps)]
        if save_dir:
            checkpointing.save(save_dir, trainer.model, trainer.optimizer, pgs, config=config,
                               vocab_size=shape.vocab_size, extra={"iteration": steps, "layout": str(layout)})
        return results, extra
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("a,b,optimizer", [
    ("tp2-sp-ep4", "5d-tp2-cp2-pp2-ep2-etp2", "plain"),
    ("pp2-vpp2-ep4", "tp2-ep2-etp2", "distributed"),
])
def test_checkpoint_resumes_under_another_layout(a, b, optimizer, reference, tmp_path):
    weights, _ = reference
    ckpt = str(tmp_path / "ckpt")
    uninterrupted, _ = run_on_ranks(_train_and_save, W, LAYOUTS[a], weights["mixtral-like"], optimizer, 4,
                                    timeout=600)[0]
    first, _ = run_on_ranks(_train_and_save, W, LAYOUTS[a], weights["mixtral-like"], optimizer, 2,
                            save_dir=ckpt, timeout=600)[0]
    assert os.path.isdir(ckpt) and not os.path.exists(ckpt + ".tmp")
    second, extra = run_on_ranks(_train_and_save, W, LAYOUTS[b], None, optimizer, 2, load_dir=ckpt, timeout=600)[0]
    assert extra["iteration"] == 2 and "tp=" in extra["layout"]
    diff = _max_rel_diff(first + second, uninterrupted)
    print(f"checkpoint {a} -> {b} ({optimizer} optimizer): max relative difference {diff:.1e}")
    assert diff <= RTOL, f"resumed under {b}: {[r.loss for r in first + second]} vs {[r.loss for r in uninterrupted]}"


def _mismatched_load(rank, world_size, ckpt):
    layout, pgs, _ = _setup(world_size, {})
    try:
        config, chunks, _ = _build("qwen2-moe-like", "dropless", layout, pgs, None)
        trainer = wm.Trainer(chunks, config, pgs)
        errors = {}
        try:
            checkpointing.load(ckpt, trainer.model, trainer.optimizer, pgs, config=config,
                               vocab_size=models.MODEL_FAMILIES["qwen2-moe-like"].vocab_size)
        except checkpointing.CheckpointMismatch as e:
            errors["other-model"] = str(e)
        try:
            checkpointing.save(ckpt, trainer.model, trainer.optimizer, pgs, config=config, vocab_size=1)
        except FileExistsError as e:
            errors["exists"] = str(e)
        return errors
    finally:
        parallel_state.destroy_model_parallel()


def test_checkpoint_of_another_model_is_refused_before_loading(reference, tmp_path):
    weights, _ = reference
    ckpt = str(tmp_path / "mixtral")
    run_on_ranks(_train_and_save, 2, dict(ep=2), weights["mixtral-like"], "plain", 1, save_dir=ckpt, timeout=300)
    errors = run_on_ranks(_mismatched_load, 2, ckpt, timeout=300)
    for e in errors:
        assert "holds another model" in e["other-model"] and "num_moe_experts: checkpoint 8, model 16" in e["other-model"]
        assert "already exists" in e["exists"]


def _nan_step(rank, world_size):
    layout, pgs, vpp = _setup(world_size, dict(ep=2))
    try:
        config, chunks, tokens = _build("mixtral-like", "dropless", layout, pgs, vpp)
        trainer = wm.Trainer(chunks, config, pgs)
        if rank == 1:  # one data-parallel replica diverged
            with torch.no_grad():
                next(p for n, p in chunks[0].named_parameters() if "word_embeddings" in n).fill_(float("nan"))
        before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
        try:
            trainer.step(tokens)
            error = None
        except FloatingPointError as e:
            error = str(e)
        unchanged = all(torch.equal(p, before[n]) or (p.isnan().all() and before[n].isnan().all())
                        for n, p in chunks[0].named_parameters())
        return error, unchanged
    finally:
        parallel_state.destroy_model_parallel()


def test_non_finite_loss_stops_every_rank_before_the_optimizer_step():
    """With the router's NaN check off by default, the step's loss is the check: one replica's NaN stops
    every rank (the loss is reduced over DP x CP and PP first), and no weight moves."""
    for rank, (error, unchanged) in enumerate(run_on_ranks(_nan_step, 2, timeout=300)):
        assert error is not None and error.startswith("training loss is nan at learning rate"), (rank, error)
        assert unchanged, rank
