"""Expert parameters reduce over EDP, not DP x CP, when EP = 1 but ETP != TP (and whenever EP > 1).

Checked on the tags (check_expert_params) and on the numbers: Megatron-Core's own DistributedDataParallel,
in CPU mode on gloo, reduces a closed-form gradient (2**rank per element) over exactly the group the tag
names, and check_expert_params(fix=True) before wrapping repairs a mis-tagged expert parameter.
"""

import pytest
import torch.distributed as dist

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.testing.multirank import MultiRankFailure, run_on_ranks


def _build_gpt(layout, pgs):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    # sequence_parallel stays off: without Apex or TE, Megatron's torch LayerNorm refuses it. The
    # classification under test does not depend on it.
    cfg = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=4, ffn_hidden_size=32, moe_ffn_hidden_size=32,
        num_moe_experts=4, moe_router_topk=2, moe_shared_expert_intermediate_size=32,
        tensor_model_parallel_size=layout.tp, expert_tensor_parallel_size=layout.etp,
        expert_model_parallel_size=layout.ep, use_cpu_initialization=True, add_bias_linear=False,
    )
    spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=16, pg_collection=pgs)


def _classify(rank, world_size, layout_kwargs):
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        model = _build_gpt(layout, pgs)
        wrong_before = parallel_state.check_expert_params(model, layout)
        tags = {n: getattr(p, "allreduce", True) for n, p in model.named_parameters()}
        # Where DDP reduces each kind of gradient (it picks expt_dp for allreduce=False, dp_cp otherwise).
        groups = {"expert": sorted(dist.get_process_group_ranks(pgs.expt_dp)),
                  "dense": sorted(dist.get_process_group_ranks(pgs.dp_cp))}
        # A module built outside Megatron's linear layers carries no tag: the helper must catch and fix it.
        expert_param = model.decoder.layers[0].mlp.experts.local_experts[0].linear_fc1.weight
        del expert_param.allreduce
        model.decoder.layers[0].mlp.router.weight.allreduce = False
        try:
            parallel_state.check_expert_params(model, layout)
            raised = None
        except parallel_state.ExpertParamMismatch as e:
            raised = str(e)
        fixed = parallel_state.check_expert_params(model, layout, fix=True)
        after_fix = parallel_state.check_expert_params(model, layout)
        return wrong_before, tags, groups, raised, fixed, after_fix, getattr(expert_param, "allreduce", True)
    finally:
        parallel_state.destroy_model_parallel()


def test_ep1_etp_differs_from_tp_uses_edp():
    layout = FoldedLayout(4, tp=2, ep=1, etp=1)
    assert parallel_state.expert_params_use_edp(layout)
    out = run_on_ranks(_classify, 4, dict(tp=2, ep=1, etp=1), timeout=180)
    for rank, (wrong_before, tags, groups, raised, fixed, after_fix, retagged) in enumerate(out):
        assert wrong_before == []  # megatron-core 0.19 tags these right by itself
        experts = {n for n in tags if ".mlp.experts." in n}
        assert experts and all(tags[n] is False for n in experts)
        assert all(tags[n] is True for n in tags if n not in experts)  # router, shared experts, attention
        # EDP spans all 4 ranks (ETP 1), DP x CP only 2 (TP 2): the tags decide real gradient values.
        assert groups["expert"] == layout.group_of("edp", rank) == [0, 1, 2, 3]
        assert groups["dense"] == layout.group_of("dp_cp", rank) != groups["expert"]
        assert "2 parameter(s) would be reduced over the wrong data-parallel group" in raised
        assert "local_experts.0.linear_fc1.weight" in raised and "mlp.router.weight" in raised
        assert sorted(fixed) == ["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight",
                                 "decoder.layers.0.mlp.router.weight"]
        assert after_fix == [] and retagged is False


def _ddp_reduction(rank, world_size, layout_kwargs, untag_expert):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        model = _build_gpt(layout, pgs)
        expert_weight = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"
        if untag_expert:  # an expert module built outside Megatron's linears: no tag
            del dict(model.named_parameters())[expert_weight].allreduce
            repaired = parallel_state.check_expert_params(model, layout, fix=True)
        else:
            repaired = parallel_state.check_expert_params(model, layout)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model, pg_collection=pgs)
        try:
            parallel_state.check_expert_params(ddp, layout, fix=True)
            late_fix = None
        except ValueError as e:
            late_fix = str(e)
        # d loss / d p = 2**rank everywhere: the reduced value names the ranks that were summed.
        sum((p * 2.0 ** rank).sum() for p in model.parameters()).backward()
        ddp.finish_grad_sync()
        grads = {n: p.main_grad.unique().tolist() for n, p in model.named_parameters()}
        return repaired, late_fix, grads
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("layout_kwargs", [dict(tp=2, ep=1, etp=1), dict(tp=1, ep=1, etp=2), dict(tp=2, ep=4, etp=1)],
                         ids=["ep1-etp1-tp2", "ep1-etp2-tp1", "ep4-etp1-tp2"])
@pytest.mark.parametrize("untag_expert", [False, True], ids=["tagged", "repaired"])
def test_megatron_ddp_reduces_expert_grads_over_edp(layout_kwargs, untag_expert):
    layout = FoldedLayout(4, **layout_kwargs)
    assert parallel_state.expert_params_use_edp(layout)
    out = run_on_ranks(_ddp_reduction, 4, layout_kwargs, untag_expert, timeout=180)
    for rank, (repaired, late_fix, grads) in enumerate(out):
        assert repaired == (["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"] if untag_expert else [])
        assert "already wrapped in DistributedDataParallel" in late_fix
        dp_cp = layout.group_of("dp_cp", rank)
        # Megatron scales every gradient by 1 / |DP x CP| (experts included) and sums over the tag's group.
        dense = sum(2.0 ** r for r in dp_cp) / len(dp_cp)
        expert = sum(2.0 ** r for r in layout.group_of("edp", rank)) / len(dp_cp)
        assert dense != expert
        for name, values in grads.items():
            want = expert if ".mlp.experts." in name else dense
            assert values == [want], (rank, name, values, want)


def test_coupled_layout_accepts_either_tag():
    # EP 1 and ETP = TP: EDP and DP x CP are the same ranks, so no tag can be wrong for experts.
    layout = FoldedLayout(4, tp=2, ep=1)
    assert not parallel_state.expert_params_use_edp(layout)
    out = run_on_ranks(_classify, 4, dict(tp=2, ep=1), timeout=180)
    for rank, (wrong_before, _, groups, raised, fixed, _, _) in enumerate(out):
        assert wrong_before == []
        assert groups["expert"] == groups["dense"]
        assert fixed == ["decoder.layers.0.mlp.router.weight"]  # a dense parameter tagged expert is still wrong
