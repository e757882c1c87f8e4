"""`plan` and `explain` print the drop-in command, and its Megatron-LM arguments pass Megatron-LM's own
parse_args + validate_args (the wheel's) with the plugin's checks, as far as validation runs without CUDA
(the fixture of tests/test_slurm.py: device queries answered as an H100 would)."""

import json

import pytest

from megatron_fold import cli, megatron_lm
from megatron_fold.plan.command import DROP_IN
from tests.test_slurm import megatron_validate  # noqa: F401  (fixture: H100 device answers, plugin flags)

# The user's part of a run, which the planner does not choose: data, tokenizer, optimizer schedule.
USER = ["--tokenizer-type=NullTokenizer", "--vocab-size=32000", "--lr=1e-4", "--train-iters=10", "--mock-data"]


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def megatron_parse_for(validate):
    return lambda argv, world: validate(argv, {"WORLD_SIZE": str(world), "CUDA_DEVICE_MAX_CONNECTIONS": "1"})


@pytest.mark.parametrize("model, gpus, extra", [
    ("mixtral-8x22b", 128, []),
    ("qwen2-57b-a14b", 64, ["--capacity-factor", "1.0", "--drop-scope", "sequence"]),
    ("mixtral-8x22b", 128, ["--layout", "tp2,pp8,ep8,etp1,vpp7"]),
])
def test_plan_command_passes_megatron_validation(capsys, megatron_validate, model, gpus, extra):  # noqa: F811
    megatron_parse = megatron_parse_for(megatron_validate)
    rc, out, _ = run(capsys, "plan", "--model", model, "--gpus", str(gpus), "--top", "1", "--json", *extra)
    assert rc == 0
    data = json.loads(out)
    best = data if "command" in data else data["results"][0]
    command = best["command"]
    assert command[:3] == DROP_IN and "--moe-fold" in command
    assert not any(a.startswith("--moe-token-dispatcher-type") for a in command)
    sequence = "--drop-scope" in extra
    assert ("--moe-fold-drop-scope=sequence" in command) == sequence
    args = megatron_parse(command[3:] + USER, gpus)
    layout = best["layout"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size,
            args.expert_tensor_parallel_size) == (layout["tp"], layout["pp"], layout["ep"], layout["etp"])
    assert args.moe_fold and args.moe_fold_drop_scope == ("sequence" if sequence else "subsequence")
    assert args.spec == megatron_lm.SPEC


def test_plan_text_prints_the_command(capsys):
    rc, out, _ = run(capsys, "plan", "--model", "mixtral-8x22b", "--gpus", "128", "--top", "1")
    line = next(l for l in out.splitlines() if l.startswith("Megatron-LM command:"))
    assert rc == 0 and line.startswith("Megatron-LM command: python -m megatron_fold.pretrain_gpt ")
    assert line.endswith(" --moe-fold") and "--moe-token-dispatcher-type" not in line


def test_plan_no_fold_keeps_megatron_dispatcher(capsys):
    rc, out, _ = run(capsys, "plan", "--model", "mixtral-8x22b", "--gpus", "128", "--top", "1", "--no-fold")
    line = next(l for l in out.splitlines() if l.startswith("Megatron-LM arguments:"))
    assert rc == 0 and "--moe-token-dispatcher-type=alltoall" in line and "--moe-fold" not in out
    rc, out, _ = run(capsys, "plan", "--model", "mixtral-8x22b", "--gpus", "128", "--top", "1", "--no-fold", "--json")
    assert json.loads(out)["results"][0]["command"] is None


def test_explain_prints_the_command(capsys, megatron_validate):  # noqa: F811
    megatron_parse = megatron_parse_for(megatron_validate)
    rc, out, _ = run(capsys, "explain", "--world", "16", "--tp", "2", "--ep", "4", "--etp", "1", "--num-experts", "8")
    assert rc == 0 and "Megatron-LM command: python -m megatron_fold.pretrain_gpt --tensor-model-parallel-size=2" in out
    rc, out, _ = run(capsys, "explain", "--world", "16", "--tp", "2", "--ep", "4", "--etp", "1", "--json")
    command = json.loads(out)["command"]
    assert command[:3] == DROP_IN and command[-1] == "--moe-fold"
    model = ["--num-layers=4", "--hidden-size=64", "--num-attention-heads=8", "--num-experts=8", "--seq-length=64",
             "--max-position-embeddings=64", "--micro-batch-size=1"]
    args = megatron_parse(command[3:] + model + USER, 16)
    assert (args.tensor_model_parallel_size, args.expert_model_parallel_size, args.sequence_parallel) == (2, 4, True)
