"""Hugging Face config reading: the published configs' fields give exactly the presets, and a config the
planner cannot trust is refused with the field named."""

import dataclasses
import json

import pytest

from megatron_fold.plan.models import PRESETS, from_hf_config

# Fields of the published config.json files the presets cite (architecture fields only).
HF_CONFIGS = {
    "mixtral-8x7b": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                     "tie_word_embeddings": False},
    "mixtral-8x22b": {"model_type": "mixtral", "hidden_size": 6144, "intermediate_size": 16384,
                      "num_attention_heads": 48, "num_hidden_layers": 56, "num_key_value_heads": 8,
                      "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32768,
                      "tie_word_embeddings": False},
    "qwen2-57b-a14b": {"model_type": "qwen2_moe", "hidden_size": 3584, "moe_intermediate_size": 2560,
                       "shared_expert_intermediate_size": 20480, "num_attention_heads": 28, "num_hidden_layers": 28,
                       "num_key_value_heads": 4, "num_experts": 64, "num_experts_per_tok": 8, "vocab_size": 151936,
                       "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "head_dim": 128, "moe_intermediate_size": 768,
                      "num_attention_heads": 32, "num_hidden_layers": 48, "num_key_value_heads": 4,
                      "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936, "decoder_sparse_step": 1,
                      "mlp_only_layers": [], "tie_word_embeddings": False},
    "qwen3-235b-a22b": {"model_type": "qwen3_moe", "hidden_size": 4096, "head_dim": 128, "moe_intermediate_size": 1536,
                        "num_attention_heads": 64, "num_hidden_layers": 94, "num_key_value_heads": 4,
                        "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936, "decoder_sparse_step": 1,
                        "mlp_only_layers": [], "tie_word_embeddings": False},
}


def _write(tmp_path, cfg):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_config_gives_the_preset(tmp_path, name):
    assert set(HF_CONFIGS) == set(PRESETS)
    spec = from_hf_config(_write(tmp_path, HF_CONFIGS[name]))
    assert dataclasses.replace(spec, name=name, source=PRESETS[name].source) == PRESETS[name]


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"num_key_value_heads": None}, "num_key_value_heads=None"),
    ({"hidden_size": "2048"}, "hidden_size='2048'"),
    ({"num_experts_per_tok": 200}, "num_experts_per_tok 200 exceeds the 128 experts"),
    ({"mlp_only_layers": [0]}, "layers without MoE"),
    ({"num_key_value_heads": 5}, "num_key_value_heads 5 must divide num_attention_heads 32"),
])
def test_untrustworthy_configs_are_refused(tmp_path, change, message):
    cfg = dict(HF_CONFIGS["qwen3-30b-a3b"]) | change
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        from_hf_config(_write(tmp_path, cfg))


@pytest.mark.parametrize("family,dropped", [("qwen3-30b-a3b", "head_dim"),
                                            ("qwen2-57b-a14b", "shared_expert_intermediate_size"),
                                            ("mixtral-8x7b", "num_key_value_heads")])
def test_fields_with_family_specific_defaults_are_required(tmp_path, family, dropped):
    cfg = {k: v for k, v in HF_CONFIGS[family].items() if k != dropped}
    with pytest.raises(ValueError, match=f"config is missing {dropped}"):
        from_hf_config(_write(tmp_path, cfg))


@pytest.mark.parametrize("shared,message", [(None, "shared_expert_intermediate_size=None"),
                                            (-5, "shared_expert_intermediate_size=-5")])
def test_bad_shared_expert_size_is_refused(tmp_path, shared, message):
    cfg = dict(HF_CONFIGS["qwen2-57b-a14b"]) | {"shared_expert_intermediate_size": shared}
    with pytest.raises(ValueError, match=message):
        from_hf_config(_write(tmp_path, cfg))


def test_qwen2_moe_without_shared_expert_has_none(tmp_path):
    cfg = dict(HF_CONFIGS["qwen2-57b-a14b"]) | {"shared_expert_intermediate_size": 0}
    spec = from_hf_config(_write(tmp_path, cfg))
    assert spec.shared_expert_ffn == 0 and not spec.shared_expert_gate
    assert spec.total_params == PRESETS["qwen2-57b-a14b"].total_params - 28 * (3 * 3584 * 20480 + 3584)


def test_config_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="is a JSON object, got list"):
        from_hf_config(str(path))
