"""Megatron-Core builds the folded groups; every one must equal FoldedLayout's prediction."""

import pytest
import torch.distributed as dist

from megatron_fold import FoldedLayout, parallel_state
from megatron_fold.layout import GROUP_NAMES
from megatron_fold.testing.multirank import MultiRankFailure, run_on_ranks

# (world, kwargs): the paper's 5-D fold plus folds that exercise each way the grids can differ.
LAYOUTS = [
    (16, dict(tp=2, cp=2, pp=2, ep=4, etp=1)),                       # the DESIGN example
    (8, dict(tp=2, cp=2, pp=2, ep=4, etp=1)),                        # the same 5-D fold on 8 ranks (DP = EDP = 1)
    (8, dict(tp=2, ep=2, etp=2)),                                     # ETP > 1
    (8, dict(tp=2, ep=8, etp=1)),                                     # EP 8 larger than DP 4
    (8, dict(cp=2, ep=4, etp=1)),                                     # CP and EP folded together
    (8, dict(tp=2, pp=2, ep=4, etp=1)),                               # PP > 1, EDP 1
    (16, dict(tp=4, cp=2, ep=8, etp=1)),                              # EP spans TP x CP x DP
    (16, dict(tp=2, pp=2, ep=2, etp=1, order="tp-cp-ep-pp-dp")),      # --use-tp-pp-dp-mapping
    (16, dict(tp=1, cp=2, pp=4, ep=2, etp=2)),                        # ETP > TP, PP 4
    (8, dict(tp=2, pp=2, ep=4, etp=1, order="tp-ep-dp-pp")),           # an order without cp (CP = 1)
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
    from megatron.core import parallel_state as mpu

    built = FoldedLayout(world_size, tp=2, ep=4, etp=1)
    claimed = FoldedLayout(world_size, tp=2, ep=4, etp=1, order="tp-cp-ep-pp-dp", pp=1)
    parallel_state.initialize_model_parallel(built)
    try:
        parallel_state.verify_groups(claimed)  # same groups: order only matters with PP > 1 here
        # Only ranks 6 and 7 disagree with these TP groups; every rank must raise all the same.
        assert built.groups("tp")[3] == [6, 7]
        try:
            _verify_with_tp_groups(built, built.groups("tp")[:3] + [[6], [7]])
            error = None
        except RuntimeError as e:
            error = str(e)
    finally:
        parallel_state.destroy_model_parallel()
    # A mismatch found inside initialize_model_parallel leaves Megatron uninitialised on every rank.
    try:
        _initialize_claiming(FoldedLayout(world_size, tp=1, ep=2, etp=2))
        init_error = None
    except RuntimeError as e:
        init_error = str(e)
    return error, init_error, mpu.model_parallel_is_initialized()


class _LayoutWithTpGroups:
    """A FoldedLayout whose TP groups are replaced: what a Megatron that built different groups looks like."""

    def __init__(self, layout, tp_groups):
        self._layout, self._tp = layout, tp_groups

    def group_of(self, name, rank):
        if name == "tp":
            return next(g for g in self._tp if rank in g)
        return self._layout.group_of(name, rank)

    def __repr__(self):
        return f"{self._layout} with TP groups {self._tp}"


def _verify_with_tp_groups(layout, tp_groups):
    parallel_state.verify_groups(_LayoutWithTpGroups(layout, tp_groups))


def _initialize_claiming(claimed):
    """initialize_model_parallel(claimed), with Megatron building the groups of TP2 EP4 ETP1 instead."""
    from megatron.core import parallel_state as mpu

    real = mpu.initialize_model_parallel

    def build_other(**kwargs):
        real(tensor_model_parallel_size=2, expert_model_parallel_size=4, expert_tensor_parallel_size=1,
             create_gloo_process_groups=False)

    mpu.initialize_model_parallel = build_other
    try:
        parallel_state.initialize_model_parallel(claimed)
    finally:
        mpu.initialize_model_parallel = real


def test_verify_groups_raises_on_every_rank_and_names_the_differing_groups():
    out = run_on_ranks(_verify_against_other_layout, 8, timeout=120)
    for rank, (error, init_error, still_initialized) in enumerate(out):
        assert "differ from FoldedLayout" in error and "on 2 of 8 ranks" in error and f"this is rank {rank}" in error
        assert "rank 6: tp: Megatron built [6, 7], layout predicts [6]" in error
        assert "rank 7: tp: Megatron built [6, 7], layout predicts [7]" in error
        assert "on 8 of 8 ranks" in init_error and "tp: Megatron built [0, 1], layout predicts [0]" in init_error
        assert not still_initialized


def _world_mismatch(rank, world_size):
    parallel_state.initialize_model_parallel(FoldedLayout(8, tp=2))


def test_world_size_mismatch_is_an_error():
    with pytest.raises(MultiRankFailure, match="layout is for world_size 8 but torch.distributed has 4 ranks"):
        run_on_ranks(_world_mismatch, 4, timeout=60)
