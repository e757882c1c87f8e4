"""SequenceParallelNorm on one process: the numbers are the closed-form norm, and every parameter (LayerNorm's
bias as well as its weight) carries the sequence_parallel tag Megatron's finalize_model_grads sums over TP.

The 8-rank check that the tag is what makes TP + SP training equal a single rank:
tests/distributed/test_whole_model.py (RMSNorm families, and test_layernorm_model_is_layout_invariant).
"""

import pytest
import torch

from megatron_fold.portable.norm import SequenceParallelNorm
from megatron_fold.testing import moe_reference as ref

H, EPS = 16, 1e-5
# The parameters each norm has, named here rather than read from the module under test.
PARAMETERS = {"LayerNorm": {"weight", "bias"}, "RMSNorm": {"weight"}}


def _closed_form(normalization, x, weight, bias):
    if normalization == "LayerNorm":
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt((centred**2).mean(-1, keepdim=True) + EPS) * weight + bias
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + EPS) * weight


@pytest.mark.parametrize("sequence_parallel", [True, False])
@pytest.mark.parametrize("normalization", list(PARAMETERS))
def test_every_parameter_is_tagged_and_the_numbers_are_the_norm(normalization, sequence_parallel):
    config = ref.make_moe_config(hidden_size=H, normalization=normalization)
    config.sequence_parallel = sequence_parallel  # TP > 1 needs a process group; the tag reads only this
    norm = SequenceParallelNorm(config, H, eps=EPS)
    params = dict(norm.named_parameters())
    assert set(params) == PARAMETERS[normalization]
    for name, param in params.items():
        assert getattr(param, "sequence_parallel", None) is sequence_parallel, (normalization, name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in params.values():  # not the identity initialisation: the weight and bias must act
            param.copy_(torch.randn(param.shape, generator=g))
    x = torch.randn(4, 2, H, generator=g) * 3 + 1
    torch.testing.assert_close(norm(x), _closed_form(normalization, x, params["weight"], params.get("bias", 0.0)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option,message", [
    (dict(normalization="ScaleNorm"), "supports normalization 'LayerNorm' and 'RMSNorm', got 'ScaleNorm'"),
    (dict(persist_layer_norm=True), "does not implement persist_layer_norm=True"),
    (dict(layernorm_zero_centered_gamma=True), "does not implement layernorm_zero_centered_gamma=True"),
])
def test_options_it_cannot_honour_are_refused(option, message):
    config = ref.make_moe_config(hidden_size=H)
    for name, value in option.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=message):
        SequenceParallelNorm(config, H)
