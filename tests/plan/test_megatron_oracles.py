"""The planner's memory and FLOPs against Megatron-LM's own formulas, which ship in the megatron-core
wheel: `megatron.training.theoretical_memory_usage` (weights + optimizer, activations) and
`megatron.training.training.num_floating_point_operations` (the FLOPs behind Megatron-LM's TFLOP/s log).
Megatron-LM's arguments are built by its own `parse_args` + `validate_args` from the arguments the
planner prints for the layout (Choice.megatron_args), so the oracle sees what a user would run.

Where Megatron's formula does not model something the layout uses, the test says how the oracle is
evaluated instead (each once, below); everything the formula omits is a named planner term
(stage_memory), shown separately and not compared."""

import os
import sys
import types

import pytest

from megatron_fold.layout import FoldedLayout
from megatron_fold.plan.cost import GB, Choice, model_flops_per_token, stage_memory
from megatron_fold.plan.models import PRESETS, get_model

SEQ, GLOBAL_BATCH = 4096, 256

# (model, GPUs, tp, cp, pp, vpp, ep, etp, micro-batch, recompute, distributed optimizer): both model
# families (Mixtral; Qwen2-MoE / Qwen3-MoE), with SP (TP > 1) and without (TP 1), CP, VPP, full
# recomputation, the plain and the distributed optimizer, ETP equal to and different from TP.
LAYOUTS = [
    ("mixtral-8x22b", 128, 2, 1, 8, 7, 8, 1, 1, False, True),   # the paper's / model zoo's
    ("mixtral-8x22b", 128, 4, 1, 8, 7, 2, 4, 1, False, True),   # Megatron README's coupled TP4 EP2
    ("mixtral-8x22b", 128, 1, 2, 8, 7, 8, 1, 1, False, True),
    ("mixtral-8x22b", 128, 2, 1, 8, 1, 8, 1, 1, True, True),
    ("mixtral-8x22b", 256, 8, 1, 4, 2, 8, 1, 1, False, True),
    ("mixtral-8x7b", 64, 1, 1, 4, 8, 8, 1, 1, False, True),     # Megatron README's 8x7B mapping
    ("mixtral-8x7b", 64, 2, 1, 4, 1, 4, 2, 1, False, True),
    ("mixtral-8x7b", 8, 1, 1, 1, 1, 8, 1, 1, False, True),
    ("mixtral-8x7b", 16, 2, 1, 1, 1, 8, 1, 1, False, False),
    ("mixtral-8x7b", 64, 2, 2, 2, 1, 8, 1, 2, False, True),
    ("mixtral-8x7b", 32, 4, 1, 2, 4, 8, 1, 1, False, False),
    ("qwen2-57b-a14b", 64, 2, 1, 4, 7, 8, 1, 1, False, True),
    ("qwen2-57b-a14b", 64, 2, 1, 4, 1, 4, 2, 1, False, True),
    ("qwen2-57b-a14b", 64, 1, 2, 4, 1, 8, 1, 1, False, True),
    ("qwen2-57b-a14b", 32, 4, 1, 2, 1, 8, 1, 1, True, True),
    ("qwen2-57b-a14b", 64, 4, 1, 2, 7, 16, 2, 2, False, True),
    ("qwen3-30b-a3b", 32, 1, 1, 1, 1, 8, 1, 1, False, True),
    ("qwen3-30b-a3b", 16, 2, 1, 1, 1, 8, 1, 1, False, False),
    ("qwen3-30b-a3b", 64, 2, 2, 2, 2, 16, 1, 1, False, True),
    ("qwen3-30b-a3b", 32, 4, 1, 4, 3, 8, 1, 2, False, True),
    ("qwen3-235b-a22b", 256, 4, 1, 2, 1, 32, 1, 1, True, True),
    ("qwen3-235b-a22b", 256, 2, 2, 2, 1, 16, 2, 1, False, True),
]


def _choice(case):
    name, world, tp, cp, pp, vpp, ep, etp, mbs, recompute, dist = case
    m = get_model(name)
    layout = FoldedLayout(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, num_experts=m.num_experts)
    return m, Choice(layout, vpp=vpp, micro_batch=mbs, recompute=recompute, distributed_optimizer=dist)


def _megatron_args(m, choice):
    """Megatron-LM's args namespace for the planner's arguments, built by Megatron-LM itself."""
    import torch

    if not torch.cuda.is_available():  # validate_args asks the device for its architecture
        torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
        torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
            major=9, minor=0, name="H100 (stand-in)", total_memory=80 * 2**30)
    from megatron.training import arguments as mlm
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    argv = choice.megatron_args(m, SEQ, GLOBAL_BATCH, None) + [
        "--tokenizer-type=NullTokenizer", f"--vocab-size={m.vocab}", "--lr=1e-4", "--train-iters=10",
        "--no-rope-fusion"]
    saved = sys.argv, {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "CUDA_DEVICE_MAX_CONNECTIONS")}
    sys.argv = ["pretrain_gpt.py", *argv]
    os.environ.update(WORLD_SIZE=str(choice.layout.world_size), RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1")
    try:
        args = mlm.parse_args()
        mlm.validate_args(args, {})
    finally:
        sys.argv = saved[0]
        for k, v in saved[1].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # Megatron-LM pads the vocabulary when it builds the tokenizer (not in validate_args).
    args.padded_vocab_size = calculate_padded_vocab_size(m.vocab, args.make_vocab_size_divisible_by,
                                                         args.tensor_model_parallel_size, False)
    return args


@pytest.fixture(scope="module")
def megatron_built():
    """(case, model, choice, Megatron-LM args) for every layout; parse_args runs once per layout."""
    out = []
    for case in LAYOUTS:
        m, choice = _choice(case)
        out.append((case, m, choice, _megatron_args(m, choice)))
    return out


def _oracle_memory(args, choice):
    """(weights + gradients + optimizer, activations) in GB per Megatron-LM's theoretical_memory_usage.

    Evaluated as Megatron-LM would for the layout, with two documented exceptions:
    - context parallelism: Megatron's formula predates CP. Megatron-Core's distributed optimizer shards
      dense state over the DP x CP group (DistributedDataParallel's intra_dp_cp group) and CP splits every
      activation along the sequence, so the oracle runs with data_parallel_size = DP x CP and
      seq_length = s / CP;
    - activations: compute_activation_memory (Korthikanti et al.'s Table 2 row for sequence parallelism
      with selective recomputation, which flash attention matches) for every TP: at TP 1 sequence
      parallelism is a no-op, and report_theoretical_memory's other formula (_without_sp) ignores the FFN
      width. Full recomputation is not in Megatron's formula: those layouts compare weights only here
      and activations with Korthikanti's full-recomputation row (test below)."""
    from megatron.training.theoretical_memory_usage import (compute_activation_memory,
                                                            compute_weight_and_optimizer_memory)
    import copy

    a = copy.copy(args)
    cp = choice.layout.cp
    a.data_parallel_size = args.data_parallel_size * cp
    a.seq_length = args.seq_length // cp
    M = GLOBAL_BATCH // (choice.layout.dp * choice.micro_batch)
    return compute_weight_and_optimizer_memory(a) / GB, compute_activation_memory(a, M) / GB


@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=[f"{c[0]}-tp{c[2]}cp{c[3]}pp{c[4]}v{c[5]}ep{c[6]}etp{c[7]}"
                                                             f"{'-rc' if c[9] else ''}{'' if c[10] else '-plain'}"
                                                             for c in LAYOUTS])
def test_memory_agrees_with_megatron_theoretical_memory_usage(megatron_built, index):
    """Per-GPU memory of the first pipeline stage (the one Megatron's formula sizes) within 5% of
    Megatron-LM's own estimate: weights + optimizer, activations, and their sum."""
    case, m, choice, args = megatron_built[index]
    assert args.sequence_parallel == (choice.layout.tp > 1)  # the planner's arguments turn SP on with TP
    assert args.use_distributed_optimizer == choice.distributed_optimizer
    assert (args.virtual_pipeline_model_parallel_size or 1) == choice.vpp
    weights_oracle, acts_oracle = _oracle_memory(args, choice)
    mem = stage_memory(m, choice, SEQ, GLOBAL_BATCH, None, rank=0)
    weights = mem["weights"] + mem["gradients"] + mem["optimizer"]
    assert weights == pytest.approx(weights_oracle, rel=0.05), case
    if choice.recompute:
        return
    # Megatron's formula counts the output layer's inputs and fp32 logits only at PP 1 (first = last).
    acts = mem["activations"] + (mem["logits"] if choice.layout.pp == 1 else 0.0)
    assert acts == pytest.approx(acts_oracle, rel=0.05), case
    assert weights + acts == pytest.approx(weights_oracle + acts_oracle, rel=0.05), case


def test_largest_memory_difference_is_reported(megatron_built, capsys):
    """Prints the largest relative difference and where (for the closing note); fails if any exceeds 5%."""
    worst = (0.0, None, None)
    for case, m, choice, args in megatron_built:
        weights_oracle, acts_oracle = _oracle_memory(args, choice)
        mem = stage_memory(m, choice, SEQ, GLOBAL_BATCH, None, rank=0)
        parts = {"weights+optimizer": (mem["weights"] + mem["gradients"] + mem["optimizer"], weights_oracle)}
        if not choice.recompute:
            parts["activations"] = (mem["activations"] + (mem["logits"] if choice.layout.pp == 1 else 0.0),
                                    acts_oracle)
        for part, (ours, theirs) in parts.items():
            rel = abs(ours - theirs) / theirs
            if rel > worst[0]:
                worst = (rel, case, part)
    with capsys.disabled():
        print(f"\nlargest relative difference from Megatron's theoretical memory: {worst[0]:.4%} "
              f"({worst[2]} of {worst[1]})")
    assert worst[0] < 0.05


@pytest.mark.parametrize("index", [i for i, c in enumerate(LAYOUTS) if c[9]])
def test_full_recomputation_activations_are_korthikantis_row(megatron_built, index):
    """Full recomputation (not in Megatron's formula): Korthikanti et al. 2022, Table 2, keeps 2sbh/t per
    layer per micro-batch in flight, plus one layer's activations while it is recomputed. Written out
    with Megatron's in-flight count (its formula's VPP penalty or min(PP, M)) and its per-layer size
    sbh(18 + 4F/h)/t for the recomputed layer."""
    case, m, choice, args = megatron_built[index]
    l = choice.layout
    s, b, h, t, c, p = SEQ, choice.micro_batch, m.hidden, l.tp, l.cp, l.pp
    M = GLOBAL_BATCH // (l.dp * b)
    layers_in_flight = m.num_layers * (1 + (p - 1) / (p * choice.vpp) if choice.vpp > 1 else min(1, M / p))
    sbh = s * b * h / (t * c)
    embedding = (8 * s * b + s * b * h) * (p if choice.vpp > 1 else min(p, M)) / (t * c)
    if choice.vpp > 1:
        embedding *= 1 + (p - 1) / (p * choice.vpp)
    want = 2 * sbh * layers_in_flight + sbh * (18 + 4 * m.moe_ffn / h) + embedding
    mem = stage_memory(m, choice, s, GLOBAL_BATCH, None, rank=0)
    assert mem["activations"] * GB == pytest.approx(want, rel=1e-9)


def test_memory_omitted_by_megatron_is_named_and_separate():
    """What Megatron's formula leaves out appears as its own terms, never folded into the compared ones:
    routed-expert activations, dispatch buffers, fp32 logits on the last stage, allocator slack and the
    CUDA / NCCL context; a MoE layer keeps more than Megatron's dense-FFN count (top-k > 1)."""
    m, choice = _choice(LAYOUTS[0])
    first = stage_memory(m, choice, SEQ, GLOBAL_BATCH, None, rank=0)
    last = stage_memory(m, choice, SEQ, GLOBAL_BATCH, None, rank=choice.layout.pp - 1)
    for term in ("moe_activations", "moe_dispatch_buffers", "fragmentation", "cuda_nccl_context"):
        assert first[term] > 0 and last[term] > 0, term
    assert "logits" in last and "logits" not in first
    assert first["moe_activations"] > 0.5 * first["activations"]  # top-2 of 8 with SwiGLU: more than half again


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_model_flops_equal_megatron_num_floating_point_operations(name, tp):
    """The FLOPs behind the printed MFU are Megatron-LM's own count for the same arguments (so the MFU is
    the TFLOP/s Megatron-LM logs over the peak), including the vocabulary padded for TP."""
    from megatron.training.training import num_floating_point_operations

    m = PRESETS[name]
    if m.num_heads % tp or m.num_query_groups % tp or (m.shared_expert_ffn and m.shared_expert_ffn % tp):
        pytest.skip("TP does not divide the heads")
    layout = FoldedLayout(8 * tp, tp=tp, ep=8, etp=1, num_experts=m.num_experts)
    args = _megatron_args(m, Choice(layout))
    want = num_floating_point_operations(args, GLOBAL_BATCH)
    assert 3 * model_flops_per_token(m, SEQ, tp) * GLOBAL_BATCH * SEQ == pytest.approx(want, rel=1e-12)
