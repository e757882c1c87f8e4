"""`megatron-fold plan` on the command line: outputs, one-layout breakdown, and clear errors (status 2)."""

import json
import subprocess
import sys

import pytest

from megatron_fold.cli import main


def run(capsys, *argv):
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_ranks_fitting_layouts(capsys):
    rc, out, _ = run(capsys, "--model", "mixtral-8x7b", "--gpus", "32", "--top", "4", "--json")
    data = json.loads(out)
    assert rc == 0 and len(data["results"]) == 4
    times = [r["step_time_s"] for r in data["results"]]
    assert times == sorted(times)
    best = data["results"][0]
    assert best["fits"] and best["memory_total_gb"] <= 80
    assert f"--expert-tensor-parallel-size={best['layout']['etp']}" in best["megatron_args"]


def test_one_layout_breakdown(capsys):
    rc, out, _ = run(capsys, "--model", "mixtral-8x22b", "--gpus", "128", "--layout", "tp2,pp8,ep8,etp1")
    assert rc == 0
    assert "time per step:" in out and "ep_comm" in out and "memory per GPU:" in out
    assert "--tensor-model-parallel-size=2" in out and "--expert-model-parallel-size=8" in out


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
    (["--model", "mixtral-8x22b", "--gpus", "2"], "none of the"),
    (["--model", "mixtral-8x7b", "--gpus", "7", "--gpus-per-node", "7"], "fits in 80 GB"),
    (["--model", "mixtral-8x7b", "--gpus", "64", "--layout", "tp3,ep8"], "TP values that fit"),
    (["--model", "mixtral-8x7b", "--gpus", "64", "--layout", "tp2,pq8"], "cannot read 'pq8'"),
    (["--gpus", "8"], "pass exactly one of --model or --hf-config"),
    (["--model", "mixtral-8x7b", "--gpus", "8", "--capacity-factor", "0"], "must be positive"),
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
