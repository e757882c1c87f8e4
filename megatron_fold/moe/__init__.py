"""The device-agnostic MoE block: router -> dispatcher -> Megatron's experts -> combine.

router.py       FoldRouter: Megatron's TopKRouter without CUDA calls, with sequence-scope dropping
dispatcher.py   FlexFoldDispatcher: tokens over the ETP x EP grid (all-to-all-v, all-gather-v)
layer.py        FoldMoELayer: Megatron's MoELayer with the two above, metrics
capacity.py     expert capacity and padded sizes for both drop scopes
comm.py         counted, differentiable uneven collectives that run on gloo and nccl
token_order.py  which positions of a sequence a rank holds under CP and sequence parallelism
flags.py        validate_fold_moe_config: which Megatron MoE options run, and why others are refused
fused.py        the GPU boundary: Transformer Engine's fused router / permute kernels, side streams
"""
