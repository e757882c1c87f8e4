"""What the prototype's `mlp.py:354` failure is: Megatron's own bug, not a CPU effect.

Megatron-Core 0.19's MLP.forward adds an expert's bias in place (`output += output_bias * per_token_scale`,
mlp.py:354) on the output of its RowParallelLinear. With EP = ETP = 1 that linear is not an "explicit
expert comm" one (layers.py:1326) and all-reduces over its one-rank group through
_ReduceFromModelParallelRegion, whose forward returns its input as-is (mappings.py:28); autograd forbids
an in-place edit of an autograd.Function output that is its input, whatever the device (the check is in
PyTorch's autograd, which runs the same for CUDA tensors). With EP or ETP > 1 the output is the matmul's
own tensor and the in-place add is allowed. This runs Megatron's SequentialMLP alone (no plugin code) on
one rank, so it tells us when Megatron fixes it.
"""


import pytest
import torch

from megatron_fold.testing.multirank import run_on_ranks


def _experts_forward_backward(rank, world, bias):
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    try:
        model_parallel_cuda_manual_seed(1)
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16,
                                   num_moe_experts=2, moe_ffn_hidden_size=16, add_bias_linear=bias,
                                   use_cpu_initialization=True, gradient_accumulation_fusion=False,
                                   expert_model_parallel_size=world)
        experts = SequentialMLP(2 // world, config, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                  linear_fc2=RowParallelLinear),
                                pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        local = 2 // world
        tokens = torch.randn(3 * local, 8, requires_grad=True)  # [3 tokens per local expert, hidden]
        try:
            out, _ = experts(tokens, torch.tensor([3] * local), torch.rand(3 * local))
            out.sum().backward()
        except RuntimeError as e:
            return str(e)
        return "ok"
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize("world, bias, expected", [
    (1, False, "ok"),
    (1, True, "Output 0 of _ReduceFromModelParallelRegion is a view and is being modified inplace"),
    (2, True, "ok"),  # EP 2: the explicit-communication path, no reduce
])
def test_expert_bias_with_ep_etp_1_is_megatrons_inplace_bug(world, bias, expected):
    results = run_on_ranks(_experts_forward_backward, world, bias)
    assert all(expected in r for r in results), results
