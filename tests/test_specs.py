"""install() makes Megatron's stock GPT layer specs build FoldMoELayer; uninstall() restores them."""

import functools

import pytest
import torch
from megatron.core.models.gpt import gpt_layer_specs, moe_module_specs
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_fold import specs
from megatron_fold.moe.layer import FoldMoELayer
from megatron_fold.moe.router import FoldRouter


def _mlp_builder(layer_spec):
    return layer_spec.submodules.mlp


def test_install_routes_stock_specs_to_fold_layer():
    stock = _mlp_builder(gpt_layer_specs.get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False))
    assert stock.func is MoELayer
    specs.install(drop_scope="sequence", check_finite=False)
    try:
        assert specs.is_installed()
        for builder in (_mlp_builder(gpt_layer_specs.get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)),
                        moe_module_specs.get_moe_module_spec(use_te=False, num_experts=8)):
            assert builder.func is FoldMoELayer
            assert builder.keywords["drop_scope"].value == "sequence" and builder.keywords["check_finite"] is False
            sub = builder.keywords["submodules"]
            assert sub.router is FoldRouter
            assert sub.experts.func is SequentialMLP  # Megatron's own experts (TEGroupedMLP with TE)
        # Dense layers are untouched.
        assert _mlp_builder(gpt_layer_specs.get_gpt_layer_local_spec()).func is not FoldMoELayer
    finally:
        specs.uninstall()
    assert not specs.is_installed()
    assert _mlp_builder(gpt_layer_specs.get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)).func is MoELayer


def test_spec_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown drop scope 'global'"):
        specs.get_fold_moe_module_spec(use_te=False, num_experts=8, drop_scope="global")
    with pytest.raises(ValueError, match="needs num_experts"):
        specs.get_fold_moe_module_spec(use_te=False)
    assert isinstance(specs.get_fold_moe_module_spec(use_te=False, num_experts=4), functools.partial)


def test_submodules_equal_upstream_for_any_backend():
    """The shared expert gets the backend's activation module, the experts the backend's grouped MLP,
    exactly as Megatron's get_moe_module_spec_for_backend composes them (TE's backend included)."""
    from megatron.core.models.backends import LocalSpecProvider

    class ActivationBackend(LocalSpecProvider):  # stands in for TESpecProvider on a machine without TE
        def activation_func(self):
            return torch.nn.SiLU

    for backend in (LocalSpecProvider(), ActivationBackend()):
        ours = specs.get_fold_moe_module_spec_for_backend(backend, num_experts=8).keywords["submodules"]
        upstream = specs._ORIGINAL[moe_module_specs](backend, num_experts=8).keywords["submodules"]
        for mine, theirs in ((ours.experts, upstream.experts), (ours.shared_experts, upstream.shared_experts)):
            assert mine.func is theirs.func and mine.keywords == theirs.keywords

