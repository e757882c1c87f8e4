"""`megatron-fold train --hf-config`: every field of a published config is taken (its value reaches the
Megatron field that expresses it), replaced (by a flag, with the reason) or ignored (with the reason),
and the command prints that account once before any rank starts. The references are the configs'
own values, written out below."""

import argparse
import json
import math

import pytest

from megatron_fold.cli import main
from megatron_fold.train import command
from megatron_fold.train.hf_config import read_hf_config
from megatron_fold.train.metrics import read_metrics

# The published config.json files (huggingface.co/Qwen/Qwen2-57B-A14B, mistralai/Mixtral-8x7B-v0.1,
# Qwen/Qwen3-30B-A3B), every field.
QWEN2_57B = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
    "model_type": "qwen2_moe", "moe_intermediate_size": 2560, "norm_topk_prob": False, "num_attention_heads": 28,
    "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 20480, "sliding_window": 65536, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True,
    "vocab_size": 32000}
QWEN3_30B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}


def _write(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def _args(*argv):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


def _expected(cfg) -> dict:
    """The Megatron field of every field Megatron can express, with the config's value (written out)."""
    mixtral = cfg["model_type"] == "mixtral"
    out = {"num_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
           "num_attention_heads": cfg["num_attention_heads"], "num_query_groups": cfg["num_key_value_heads"],
           "kv_channels": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
           "moe_ffn_hidden_size": cfg["intermediate_size"] if mixtral else cfg["moe_intermediate_size"],
           "num_moe_experts": cfg["num_local_experts"] if mixtral else cfg["num_experts"],
           "moe_router_topk": cfg["num_experts_per_tok"], "layernorm_epsilon": cfg["rms_norm_eps"],
           # Megatron's default router is a softmax over the top-k logits, i.e. normalised top-k
           # probabilities (Mixtral always; Qwen with norm_topk_prob true); pre-softmax is the unnormalised one.
           "moe_router_pre_softmax": False if mixtral else not cfg["norm_topk_prob"],
           "moe_aux_loss_coeff": cfg["router_aux_loss_coef"], "init_method_std": cfg["initializer_range"],
           "attention_dropout": cfg["attention_dropout"]}
    if "shared_expert_intermediate_size" in cfg:
        out["moe_shared_expert_intermediate_size"] = cfg["shared_expert_intermediate_size"]
    return out


@pytest.mark.parametrize("cfg", [QWEN2_57B, MIXTRAL_8X7B, QWEN3_30B], ids=["qwen2", "mixtral", "qwen3"])
def test_every_expressible_field_reaches_the_megatron_config(tmp_path, cfg):
    args = _args("--hf-config", _write(tmp_path, cfg))
    family, overrides, rotary_base, _ = command._model_config(args)
    for field, value in _expected(cfg).items():
        assert overrides[field] == value, field
    assert rotary_base == cfg["rope_theta"]
    # Every field of the config is accounted for exactly once in the printed report.
    hf, report = command.hf_config_account(args), command.hf_config_report(args)
    sections = (hf.taken, hf.replaced, hf.ignored)
    for key in cfg:
        assert sum(key in s for s in sections) == 1, key
        assert f"    {key} " in report, key
    assert hf.replaced["vocab_size"].startswith(f"{cfg['vocab_size']} -> embedding rows 257 (the tokenizer's")
    assert "max_position_embeddings" in hf.replaced and "use_cache" in hf.ignored


def test_size_overrides_are_replacements(tmp_path):
    path = _write(tmp_path, QWEN2_57B)
    args = _args("--hf-config", path, "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
                 "--shared-expert-intermediate-size", "48", "--moe-ffn-hidden-size", "16", "--num-experts", "8",
                 "--aux-loss-coeff", "0.05")
    _, overrides, _, hf = command._model_config(args)
    assert (overrides["hidden_size"], overrides["kv_channels"], overrides["moe_shared_expert_intermediate_size"],
            overrides["moe_shared_expert_gate"], overrides["moe_aux_loss_coeff"]) == (64, 16, 48, True, 0.05)
    assert hf.replaced["shared_expert_intermediate_size"] == (
        "20480 -> moe_shared_expert_intermediate_size 48 (--shared-expert-intermediate-size)")
    assert hf.replaced["router_aux_loss_coef"] == "0.001 -> moe_aux_loss_coeff 0.05 (--aux-loss-coeff)"
    # A planner preset scales the same way (no report: nothing was read from a config).
    _, overrides, rotary_base, hf = command._model_config(_args(
        "--model", "qwen2-57b-a14b", "--hidden-size", "64", "--num-attention-heads", "4",
        "--shared-expert-intermediate-size", "32"))
    assert hf is None and rotary_base == 10000.0
    assert (overrides["kv_channels"], overrides["moe_shared_expert_intermediate_size"],
            overrides["moe_shared_expert_gate"]) == (16, 32, True)
    # 0 removes the shared expert and its gate.
    _, overrides, _, _ = command._model_config(_args("--hf-config", path, "--shared-expert-intermediate-size", "0"))
    assert overrides["moe_shared_expert_intermediate_size"] is None and overrides["moe_shared_expert_gate"] is False


def test_vocab_size_is_explicit(tmp_path):
    path = _write(tmp_path, MIXTRAL_8X7B)
    spec = command.spec_from_args(_args("--hf-config", path, "--vocab-size", "32000", "--layout", "tp2,ep2"),
                                  "tp2,ep2", str(tmp_path))
    assert spec.vocab_size == math.ceil(32000 / 1024) * 1024  # padded to 128 x max(TP, 8)
    report = command.hf_config_report(_args("--hf-config", path, "--vocab-size", "32000"))
    assert "vocab_size 32000 -> embedding rows 32000 (--vocab-size)" in report.split("replaced")[0]  # taken
    with pytest.raises(ValueError, match="--vocab-size 100 is smaller than the tokenizer's vocabulary of 257"):
        command.spec_from_args(_args("--hf-config", path, "--vocab-size", "100"), "ep8", str(tmp_path))


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias true"),
])
def test_what_megatron_cannot_express_is_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        read_hf_config(_write(tmp_path, QWEN3_30B | change))


def test_train_prints_the_account_and_rope_theta_reaches_the_model(tmp_path, capsys):
    """One training step of the same small model (same seed, same batches) with two rope_theta values:
    the loss differs only if the rotary base reached the model, and a repeat is bit-identical."""
    small = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
             "num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
             "num_experts_per_tok": 2}
    losses = {}
    for name, theta in (("a", 10000.0), ("b", 10000.0), ("c", 1000000.0)):
        path = _write(tmp_path, QWEN2_57B | small | {"rope_theta": theta}, f"{name}.json")
        out = tmp_path / name
        assert main(["train", "--no-progress", "--ranks", "1", "--layout", "ep1", "--steps", "1", "--global-batch", "2",
                     "--eval-interval", "0", "--eval-batches", "1", "--seq-length", "32", "--mock-data",
                     "--hf-config", path, "--out", str(out)]) == 0
        losses[name] = read_metrics(str(out / "metrics.jsonl"))[0]["loss"]
        stdout = capsys.readouterr().out
        assert stdout.count(f"--hf-config {path} (qwen2_moe):") == 1
        assert f"rope_theta {theta} -> GPTModel rotary_base {theta:g}" in stdout
        assert "norm_topk_prob false -> moe_router_pre_softmax true" in stdout
    assert losses["a"] == losses["b"] and losses["a"] != losses["c"], losses
