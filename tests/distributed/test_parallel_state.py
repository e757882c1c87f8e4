"""Megatron-Core builds the folded groups; every one must equal FoldedLayout's prediction."""

import pytest
import torch.distributed as dist

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.layout import GROUP_NAMES
from tests.multirank import MultiRankFailure, run_on_ranks

# (world, kwargs): the paper's 5-D fold plus folds that exercise each way the grids can differ.
LAYOUTS = [
    (16, dict(tp=2, cp=2, pp=2, ep=4, etp=1)),                       # the DESIGN example
    (8, dict(tp=2, ep=2, etp=2)),                                     # ETP > 1
    (8, dict(tp=2, ep=8, etp=1)),                                     # EP 8 larger than DP 4
    (8, dict(cp=2, ep=4, etp=1)),                                     # CP and EP folded together
    (8, dict(tp=2, pp=2, ep=4, etp=1)),                               # PP > 1, EDP 1
    (16, dict(tp=4, cp=2, ep=8, etp=1)),                              # EP spans TP x CP x DP
    (16, dict(tp=2, pp=2, ep=2, etp=1, order="tp-cp-ep-pp-dp")),      # --use-tp-pp-dp-mapping
    (16, dict(tp=1, cp=2, pp=4, ep=2, etp=2)),                        # ETP > TP, PP 4
]


def _build_and_report(rank, world_size, layout_kwargs):
    layout = FoldedLayout(world_size, **layout_kwargs)
    pgs = parallel_state.initialize_model_parallel(layout)
    try:
        built = {n: sorted(dist.get_process_group_ranks(parallel_state.megatron_group(n))) for n in GROUP_NAMES}
        collection = {f: sorted(dist.get_process_group_ranks(getattr(pgs, f)))
                      for f in ("tp", "cp", "tp_cp", "pp", "dp", "dp_cp", "ep", "expt_tp", "tp_ep", "expt_dp")}
        return built, collection
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("world,kwargs", LAYOUTS, ids=[f"w{w}-" + "-".join(f"{k}{v}" for k, v in kw.items()) for w, kw in LAYOUTS])
def test_megatron_groups_equal_layout(world, kwargs):
    layout = FoldedLayout(world, **kwargs)
    out = run_on_ranks(_build_and_report, world, kwargs, timeout=240)
    collection_name = {"expt_tp": "etp", "expt_dp": "edp"}
    for rank, (built, collection) in enumerate(out):
        for name in GROUP_NAMES:
            assert built[name] == layout.group_of(name, rank), (rank, name)
        for field, ranks in collection.items():
            assert ranks == layout.group_of(collection_name.get(field, field), rank), (rank, field)


def _verify_against_other_layout(rank, world_size):
    built = FoldedLayout(world_size, tp=2, ep=4, etp=1)
    claimed = FoldedLayout(world_size, tp=2, ep=4, etp=1, order="tp-cp-ep-pp-dp", pp=1)
    parallel_state.initialize_model_parallel(built)
    try:
        other = FoldedLayout(world_size, tp=1, ep=2, etp=2)
        parallel_state.verify_groups(claimed)  # same groups: order only matters with PP > 1 here
        parallel_state.verify_groups(other)
    finally:
        parallel_state.destroy_model_parallel()


def test_verify_groups_names_the_differing_groups():
    with pytest.raises(MultiRankFailure) as e:
        run_on_ranks(_verify_against_other_layout, 8, timeout=120)
    msg = str(e.value)
    assert "Megatron-Core's groups differ" in msg
    assert "tp: Megatron built [0, 1], layout predicts [0]" in msg


def _world_mismatch(rank, world_size):
    parallel_state.initialize_model_parallel(FoldedLayout(8, tp=2))


def test_world_size_mismatch_is_an_error():
    with pytest.raises(MultiRankFailure, match="layout is for world_size 8 but torch.distributed has 4 ranks"):
        run_on_ranks(_world_mismatch, 4, timeout=60)
