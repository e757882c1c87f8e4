"""The plugin flags on Megatron-LM's own argument parser (the wheel's megatron.training) and the --spec target.

Builds through GPTModelBuilder on 8 ranks: tests/distributed/test_megatron_lm_builder.py.
"""

import sys

import pytest
from megatron.training import arguments
from megatron.training.argument_utils import gpt_config_from_args

from megatron_fold import megatron_lm
from tests.distributed.test_megatron_lm_builder import MODEL

BASE = [a for a in MODEL if a not in ("--moe-fold",)]


@pytest.fixture
def parse(monkeypatch):
    """Megatron-LM's parse_args + validate_args on 8 ranks (as rank 0) with the plugin flags installed."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    monkeypatch.setattr(arguments, "get_device_arch_version", lambda: 9)
    megatron_lm.install_arguments()

    def run(*argv, validate=True):
        monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
        args = arguments.parse_args()
        if validate:
            arguments.validate_args(args, {})
        return args

    yield run
    megatron_lm.uninstall_arguments()


def test_install_and_uninstall_restore_megatron_functions():
    add, validate = arguments.add_megatron_arguments, arguments.validate_args
    megatron_lm.install_arguments()
    megatron_lm.install_arguments()  # idempotent: not wrapped twice
    assert arguments.add_megatron_arguments is not add and arguments.validate_args is not validate
    megatron_lm.uninstall_arguments()
    assert arguments.add_megatron_arguments is add and arguments.validate_args is validate


def test_parse_args_takes_plugin_flags(parse):
    args = parse(*BASE, "--moe-fold", "--moe-fold-drop-scope", "sequence", "--moe-fold-check-finite",
                 "--moe-fold-log-interval", "10", "--expert-model-parallel-size", "8")
    assert (args.moe_fold, args.moe_fold_drop_scope, args.moe_fold_check_finite, args.moe_fold_metrics,
            args.moe_fold_log_interval) == (True, "sequence", True, True, 10)
    # The earlier spelling of the default still parses.
    assert parse(*BASE, "--moe-fold", "--moe-fold-no-check-finite").moe_fold_check_finite is False
    cfg = gpt_config_from_args(args)
    assert cfg.transformer_layer_spec is megatron_lm.fold_layer_spec
    assert cfg.transformer.expert_model_parallel_size == 8


def test_defaults_without_the_flag(parse):
    args = parse(*[a for a in BASE if a not in megatron_lm.SPEC and a != "--spec"])
    assert (args.moe_fold, args.moe_fold_drop_scope, args.moe_fold_check_finite, args.moe_fold_metrics) == (
        False, "subsequence", False, True)


def test_help_lists_plugin_flags(parse, capsys):
    with pytest.raises(SystemExit) as e:
        parse("--help", validate=False)
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--moe-fold ", "--moe-fold-drop-scope", "--moe-fold-no-check-finite", "--moe-fold-no-metrics",
                 "--moe-fold-log-interval", "megatron-fold"):
        assert flag in out, flag


@pytest.mark.parametrize("extra, names", [
    (["--moe-fold", "--moe-token-dispatcher-type", "flex", "--moe-flex-dispatcher-backend", "deepep"],
     ["--moe-token-dispatcher-type"]),
    (["--moe-fold", "--expert-model-parallel-size", "3"], ["--expert-model-parallel-size 3", "EP values that fit"]),
    (["--moe-fold", "--tensor-model-parallel-size", "3", "--sequence-parallel"],
     ["--tensor-model-parallel-size 3", "WORLD_SIZE 8"]),
    (["--moe-fold-drop-scope", "sequence"], ["--moe-fold-drop-scope only apply with --moe-fold"]),
    (["--moe-fold", "--moe-fold-no-metrics", "--moe-fold-log-interval", "5"], ["--moe-fold-log-interval"]),
])
def test_bad_combinations_fail_at_argument_time_naming_flags(parse, extra, names):
    with pytest.raises(megatron_lm.FoldArgumentError) as e:
        parse(*BASE, *extra)
    for name in names:
        assert name in str(e.value), str(e.value)


def test_shared_expert_overlap_is_accepted(parse):
    """megatron_fold.moe.flags runs it (the shared expert beside FlexFoldDispatcher's all-to-all)."""
    args = parse(*BASE, "--moe-fold", "--moe-shared-expert-intermediate-size", "16", "--moe-shared-expert-overlap",
                 "--moe-token-dispatcher-type", "alltoall", "--expert-model-parallel-size", "8")
    assert args.moe_shared_expert_overlap


def test_flag_needs_the_spec_and_experts(parse):
    no_spec = [a for a in BASE if a not in megatron_lm.SPEC and a != "--spec"]
    with pytest.raises(megatron_lm.FoldArgumentError, match="--spec megatron_fold.megatron_lm fold_layer_spec"):
        parse(*no_spec, "--moe-fold")
    no_experts = [a for a in BASE if not a.startswith(("--num-experts", "--moe-"))]
    with pytest.raises(megatron_lm.FoldArgumentError, match="set --num-experts"):
        parse(*no_experts, "--moe-fold")


def test_spec_without_the_flag_is_refused(parse):
    from megatron.training.global_vars import set_args

    args = parse(*BASE)  # --spec given, --moe-fold not: Megatron would build with our spec function
    set_args(args)
    try:
        cfg = gpt_config_from_args(args)
        with pytest.raises(RuntimeError, match="add --moe-fold"):
            cfg.transformer_layer_spec(cfg, vp_stage=None)
    finally:
        set_args(None)


def test_layout_from_args_follows_megatron_lm_order(parse):
    args = parse(*BASE, "--moe-fold", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                 "--expert-model-parallel-size", "2", "--use-tp-pp-dp-mapping")
    layout = megatron_lm.layout_from_args(args)
    assert (layout.tp, layout.ep, layout.etp, layout.order, layout.world_size) == (2, 2, 2, "tp-cp-ep-pp-dp", 8)
