"""`megatron-fold plan` on the command line: outputs, one-layout breakdown, and clear errors (status 2)."""

import json
import subprocess
import sys

import pytest

from megatron_fold.cli import main
from megatron_fold.layout import FoldedLayout
from megatron_fold.plan.cost import Choice, estimate
from megatron_fold.plan.hardware import get_gpu
from megatron_fold.plan.models import get_model
from megatron_fold.plan.search import plan
from megatron_fold.plan.command import parse_layout


def run(capsys, *argv):
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_ranks_fitting_layouts(capsys):
    rc, out, _ = run(capsys, "--model", "mixtral-8x7b", "--gpus", "32", "--top", "4", "--json")
    data = json.loads(out)
    assert rc == 0 and len(data["results"]) == 4 and data["fitting"] >= 4
    times = [r["step_time_s"] for r in data["results"]]
    assert times == sorted(times)
    best = data["results"][0]
    assert best["fits"] and best["memory_total_gb"] <= 80
    assert best["memory_total_gb"] == pytest.approx(sum(best["memory_gb"].values()))
    layout = best["layout"]
    for flag, key in [("tensor-model-parallel-size", "tp"), ("expert-tensor-parallel-size", "etp"),
                      ("expert-model-parallel-size", "ep"), ("pipeline-model-parallel-size", "pp"),
                      ("context-parallel-size", "cp"), ("micro-batch-size", "micro_batch")]:
        assert f"--{flag}={layout[key]}" in best["megatron_args"]
    coupled = data["best_coupled"]
    assert coupled["coupled"] and coupled["step_time_s"] >= best["step_time_s"]


def test_one_layout_breakdown_matches_the_cost_model(capsys):
    rc, out, _ = run(capsys, "--model", "mixtral-8x22b", "--gpus", "128", "--layout", "tp2,pp8,ep8,etp1,vpp7")
    assert rc == 0
    est = estimate(get_model("mixtral-8x22b"), get_gpu("h100"),
                   Choice(FoldedLayout(128, tp=2, pp=8, ep=8, etp=1, num_experts=8), vpp=7), 4096, 256, None)
    for part, seconds in est.time_s.items():
        assert f"{part:<20} {seconds:8.3f} s" in out
    for part, gb in est.memory_gb.items():
        assert f"{part:<20} {gb:8.2f} GB" in out
    assert "links: TP NVLink, EP NVLink, PP network" in out
    assert ("--tensor-model-parallel-size=2 --context-parallel-size=1 --pipeline-model-parallel-size=8 "
            "--expert-model-parallel-size=8 --expert-tensor-parallel-size=1") in out
    assert "--num-layers-per-virtual-pipeline-stage=1" in out and "--sequence-parallel" in out


def test_text_plan_compares_with_the_best_coupled_layout(capsys):
    rc, out, _ = run(capsys, "--model", "qwen2-57b-a14b", "--gpus", "64", "--top", "3")
    rc_coupled, out_coupled, _ = run(capsys, "--model", "qwen2-57b-a14b", "--gpus", "64", "--top", "1", "--no-fold")
    assert rc == rc_coupled == 0
    best_coupled = plan(get_model("qwen2-57b-a14b"), get_gpu("h100"), 64, 8, 4096, 256, None, no_fold=True)[0][0]
    assert f"best coupled layout (no folding): {best_coupled.choice.label()}, {100 * best_coupled.mfu:.1f}% MFU" in out
    assert "coupled layouts only" in out_coupled and best_coupled.choice.label() in out_coupled


def test_capacity_factor_reaches_megatron_args(capsys):
    rc, out, _ = run(capsys, "--model", "mixtral-8x7b", "--gpus", "64", "--top", "1", "--json",
                     "--capacity-factor", "1.25")
    assert rc == 0 and "--moe-expert-capacity-factor=1.25" in json.loads(out)["results"][0]["megatron_args"]


def test_hf_config(tmp_path, capsys):
    cfg = {"model_type": "qwen2_moe", "hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
           "num_key_value_heads": 4, "vocab_size": 32000, "num_experts_per_tok": 4, "moe_intermediate_size": 512,
           "num_experts": 16, "shared_expert_intermediate_size": 2048, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    rc, out, _ = run(capsys, "--hf-config", str(path), "--gpus", "16", "--top", "1", "--json")
    assert rc == 0 and json.loads(out)["results"][0]["fits"]


@pytest.mark.parametrize("argv,message", [
    (["--model", "gpt-5", "--gpus", "8"], "unknown model 'gpt-5'; presets: mixtral-8x7b"),
    (["--model", "mixtral-8x7b", "--gpus", "8", "--gpu", "tpu"], "unknown GPU 'tpu'"),
    (["--model", "mixtral-8x22b", "--gpus", "8"], "none of the 5856 choices (152 layouts x VPP x micro-batch x recompute) of mixtral-8x22b on 8 h100 GPUs fits"),
    (["--model", "mixtral-8x7b", "--gpus", "7", "--gpus-per-node", "7"],
     "global batch 256 is not divisible by the data-parallel size DP = GPUs / (TP*CP*PP) of any layout "
     "mixtral-8x7b admits on 7 GPUs (DP sizes: 7)"),
    (["--model", "mixtral-8x7b", "--gpus", "64", "--layout", "tp3,ep8"], "changing one size at a time: TP 1, 2, 4, 8"),
    (["--model", "mixtral-8x7b", "--gpus", "64", "--layout", "tp16,ep4"],
     "TP 16 must divide the 32 attention heads and 8 query groups"),
    (["--model", "mixtral-8x7b", "--gpus", "64", "--global-batch", "24", "--layout", "tp2,pp4,vpp2,ep8"],
     "micro-batches per step (3) to be a multiple of PP 4"),
    (["--model", "mixtral-8x7b", "--gpus", "64", "--layout", "tp2,pq8"], "cannot read 'pq8'"),
    (["--gpus", "8"], "pass exactly one of --model or --hf-config"),
    (["--model", "mixtral-8x7b", "--gpus", "8", "--capacity-factor", "0"], "must be positive"),
    (["--model", "mixtral-8x7b", "--gpus", "0"], "--gpus must be positive, got 0"),
    (["--model", "mixtral-8x7b", "--gpus", "8", "--network-gbs", "-1"], "--network-gbs must be positive"),
])
def test_bad_input_exits_2(capsys, argv, message):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and message in err


def test_hf_config_missing_fields(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mixtral", "hidden_size": 4096}))
    rc, _, err = run(capsys, "--hf-config", str(path), "--gpus", "8")
    assert rc == 2 and "mixtral config is missing num_hidden_layers, num_attention_heads" in err


def test_command_line_exit_status_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "megatron_fold.cli", "plan", "--model", "nope", "--gpus", "8"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown model 'nope'" in proc.stderr


def test_plan_imports_neither_torch_nor_megatron():
    code = ("import sys; from megatron_fold.cli import main; main(['plan', '--model', 'mixtral-8x7b', '--gpus', "
            "'16', '--top', '1']); print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("[]")


# Megatron-LM core_v0.19 arguments written by hand in megatron/training/arguments.py (every other one is
# generated from a config dataclass field: --field-name, --no-/--disable- for fields that default to True).
_HAND_WRITTEN_MEGATRON_LM_ARGS = {
    "--group-query-attention", "--num-experts", "--swiglu", "--position-embedding-type", "--max-position-embeddings",
    "--untie-embeddings-and-output-weights", "--seq-length", "--micro-batch-size", "--global-batch-size",
    "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
    "--num-layers-per-virtual-pipeline-stage", "--recompute-granularity", "--recompute-method", "--recompute-num-layers",
    "--use-tp-pp-dp-mapping",
}


@pytest.mark.parametrize("extra", [[], ["--capacity-factor", "1.0"], ["--layout", "tp2,pp4,ep8,etp1,recompute,vpp7"]])
def test_megatron_args_name_real_options(capsys, extra):
    """Every flag the planner prints is a TransformerConfig field under Megatron-LM's generated-argument
    convention, or one of its hand-written arguments; values parse as the field's type. (Checked against
    a Megatron-LM core_v0.19.0 checkout's parse_args/validate_args by scripts/check_megatron_lm_args.py.)"""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    flags = {}  # Megatron-LM's generated flag -> (field, whether the flag is a bare switch)
    for f in dataclasses.fields(TransformerConfig):
        meta = f.metadata.get("argparse_meta", {})
        is_switch = f.type in (bool, "bool")
        if "arg_names" in meta:
            names = meta["arg_names"]
        elif is_switch and f.default is True:
            names = [f"--no-{f.name}".replace("_", "-"), f"--disable-{f.name}".replace("_", "-")]
        else:
            names = [f"--{f.name}".replace("_", "-")]
        flags.update({n: (f, is_switch) for n in names})
    rc, out, _ = run(capsys, "--model", "qwen2-57b-a14b", "--gpus", "64", "--top", "1", "--json", *extra)
    assert rc == 0
    data = json.loads(out)
    args = (data if "megatron_args" in data else data["results"][0])["megatron_args"]
    assert len(args) == len({a.split("=")[0] for a in args})  # no flag twice
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag in _HAND_WRITTEN_MEGATRON_LM_ARGS:
            continue
        assert flag in flags, f"{flag} is neither a TransformerConfig argument nor a hand-written Megatron-LM one"
        field, is_switch = flags[flag]
        assert is_switch == (not value), f"{arg}: field {field.name} of type {field.type}"


def test_one_layout_warns_only_what_its_arguments_leave_open(capsys):
    argv = ["--model", "qwen2-57b-a14b", "--gpus", "64", "--layout", "tp2,pp2,ep16,etp2,vpp7"]
    rc, out, _ = run(capsys, *argv)
    assert rc == 0
    assert "ETP x EP group (2 x 16 = 32 ranks) crosses nodes" in out
    assert "TP 2 > 1 with sequence parallelism" in out and "--add-bias-linear" not in out.split("warnings:")[1]
    rc, out, _ = run(capsys, *argv, "--json")
    assert rc == 0 and json.loads(out)["warnings"] == FoldedLayout(64, tp=2, pp=2, ep=16, etp=2, num_experts=64).warnings(
        sequence_parallel=True, add_bias_linear=False)


def test_repeated_layout_key_is_refused(capsys):
    rc, _, err = run(capsys, "--model", "mixtral-8x22b", "--gpus", "128", "--layout", "tp2,pp8,ep8,etp1,pp4")
    assert rc == 2 and "pp is given twice (pp8 and pp4)" in err
    rc, _, err = run(capsys, "--model", "mixtral-8x22b", "--gpus", "128", "--layout", "tp2,recompute,pp8,recompute")
    assert rc == 2 and "recompute is given twice" in err


@pytest.mark.parametrize("layout_arg", ["tp3,pp8,ep8", "tp16,pp8,ep8", "tp2,pp8,ep8,etp3", "tp2,pp5,ep8,vpp7",
                                        "tp2,pp8,ep8,vpp3", "tp8,cp4,pp8,ep8,etp1"])
def test_layout_suggestions_all_pass_every_check(capsys, layout_arg):
    """Every value the error suggests, put into the layout, is accepted by `plan --layout` itself (the
    suggestion used to take only the grid's divisibility into account: TP 16 for 48 heads)."""
    base = ["--model", "mixtral-8x22b", "--gpus", "128"]
    rc, _, err = run(capsys, *base, "--layout", layout_arg)
    assert rc == 2
    line = next(l for l in err.splitlines() if "changing one size at a time" in l)
    given = parse_layout(layout_arg)
    suggested = [(part.split()[0].lower(), int(v)) for part in line.split(": ", 1)[1].split("; ")
                 for v in part.split(" ", 1)[1].split(", ")]
    assert suggested
    for key, value in suggested:
        spec = {k: v for k, v in given.items() if k != "recompute"} | {key: value}
        rc, _, err = run(capsys, *base, "--layout", ",".join(f"{k}{v}" for k, v in spec.items()))
        assert rc == 0, (key, value, err)
    assert ("tp", 16) not in suggested and ("tp", 3) not in suggested


def test_huge_world_fails_on_the_batch_before_searching(capsys):
    """A million GPUs: no DP the model admits divides the global batch. Refused by integer arithmetic,
    before any layout of a million ranks is built (which took a minute)."""
    import megatron_fold.plan.search as search

    built = []
    original = search.FoldedLayout
    search.FoldedLayout = lambda *a, **k: built.append(a) or original(*a, **k)
    try:
        rc, _, err = run(capsys, "--model", "mixtral-8x7b", "--gpus", "1000000")
    finally:
        search.FoldedLayout = original
    assert rc == 2 and "global batch 256 is not divisible by the data-parallel size" in err
    assert "DP sizes: 15625, 31250" in err and built == []


def test_capacity_factor_padding_is_said_in_text(capsys):
    for extra in ([], ["--layout", "tp2,pp8,ep8,etp1,vpp7"]):
        rc, out, _ = run(capsys, "--model", "mixtral-8x22b", "--gpus", "128", "--top", "1", "--capacity-factor", "1",
                         *extra)
        args_line = next(l for l in out.splitlines() if l.startswith("Megatron-LM command:"))
        assert rc == 0 and "--moe-pad-expert-input-to-capacity" in args_line
        assert "the arguments also set --moe-pad-expert-input-to-capacity" in out.split("Megatron-LM command:")[0]
    rc, out, _ = run(capsys, "--model", "mixtral-8x22b", "--gpus", "128", "--top", "1")
    assert rc == 0 and "moe-pad-expert-input-to-capacity" not in out


def test_sequence_parallel_printed_once_with_tp(capsys):
    rc, out, _ = run(capsys, "--model", "mixtral-8x22b", "--gpus", "128", "--layout", "tp2,pp8,ep8,etp1,vpp7", "--json")
    args = json.loads(out)["megatron_args"]
    assert rc == 0 and args.count("--sequence-parallel") == 1
