"""MoE model shapes for the planner: presets with their sources, and Hugging Face config reading.

Every preset's numbers are the fields of the model's published Hugging Face `config.json` (named in
`source`). All presets are MoE in every layer, use SwiGLU experts, RMSNorm and rotary embeddings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["ModelSpec", "PRESETS", "get_model", "from_hf_config", "VOCAB_DIVISIBLE_BY"]

# Megatron-LM's default --make-vocab-size-divisible-by.
VOCAB_DIVISIBLE_BY = 128


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_query_groups: int  # key/value heads (GQA)
    head_dim: int
    moe_ffn: int  # per routed expert
    num_experts: int
    topk: int
    vocab: int
    shared_expert_ffn: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE gates its shared expert with a sigmoid of a [1, H] projection
    qkv_bias: bool = False
    qk_layernorm: bool = False
    untied_embeddings: bool = True
    source: str = ""

    def megatron_args(self, seq_len: int) -> list[str]:
        """Megatron-LM (core_v0.19) arguments for this model's shape, the part the planner models: all
        presets and HF families are RMSNorm, rotary, SwiGLU, bias-free except Qwen2's QKV bias. Not
        among them: the vocabulary (Megatron-LM takes it from the tokenizer) and numerics the cost does
        not depend on (rotary base, norm epsilon, router score normalisation): take those from the
        model's config."""
        args = [f"--num-layers={self.num_layers}", f"--hidden-size={self.hidden}",
                f"--num-attention-heads={self.num_heads}", f"--kv-channels={self.head_dim}"]
        if self.num_query_groups != self.num_heads:
            args += ["--group-query-attention", f"--num-query-groups={self.num_query_groups}"]
        args += [f"--ffn-hidden-size={self.moe_ffn}", f"--moe-ffn-hidden-size={self.moe_ffn}",
                 f"--num-experts={self.num_experts}", f"--moe-router-topk={self.topk}"]
        if self.shared_expert_ffn:
            args.append(f"--moe-shared-expert-intermediate-size={self.shared_expert_ffn}")
        if self.shared_expert_gate:
            args.append("--moe-shared-expert-gate")
        args += ["--swiglu", "--normalization=RMSNorm", "--position-embedding-type=rope",
                 "--disable-bias-linear", f"--seq-length={seq_len}", f"--max-position-embeddings={seq_len}"]
        if self.qkv_bias:
            args.append("--add-qkv-bias")
        if self.qk_layernorm:
            args.append("--qk-layernorm")
        if self.untied_embeddings:
            args.append("--untie-embeddings-and-output-weights")
        return args

    # ---- parameter counts (exact, as Megatron-Core's GPTModel builds the model) ---------------------
    @property
    def attention_params_per_layer(self) -> int:
        q = self.num_heads * self.head_dim
        kv = 2 * self.num_query_groups * self.head_dim
        qkv = self.hidden * (q + kv) + ((q + kv) if self.qkv_bias else 0)
        proj = q * self.hidden
        norms = self.hidden + (2 * self.head_dim if self.qk_layernorm else 0)  # input norm (+ q/k norms)
        return qkv + proj + norms

    @property
    def dense_moe_params_per_layer(self) -> int:
        """Parameters of the MoE block that are not routed experts: norm, router, shared expert."""
        shared = 3 * self.hidden * self.shared_expert_ffn if self.shared_expert_ffn else 0
        gate = self.hidden if self.shared_expert_gate else 0
        return self.hidden + self.num_experts * self.hidden + shared + gate

    @property
    def tp_replicated_params_per_layer(self) -> int:
        """Per-layer dense parameters every TP rank holds whole (Megatron splits only the linear layers):
        the two norms, the q/k norms, the router and the shared-expert gate."""
        return (2 * self.hidden + (2 * self.head_dim if self.qk_layernorm else 0) + self.num_experts * self.hidden
                + (self.hidden if self.shared_expert_gate else 0))

    @property
    def expert_params_per_layer(self) -> int:
        return self.num_experts * 3 * self.hidden * self.moe_ffn  # SwiGLU: fc1 [2F, H] + fc2 [H, F]

    def padded_vocab(self, tp: int) -> int:
        """The vocabulary as Megatron-LM builds it: padded to a multiple of 128 x TP
        (--make-vocab-size-divisible-by 128, megatron/training/vocab_utils.py), so the embedding, the
        output layer and their FLOPs are those of the padded size."""
        multiple = VOCAB_DIVISIBLE_BY * tp
        return -(-self.vocab // multiple) * multiple

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def output_params(self) -> int:
        return self.vocab * self.hidden if self.untied_embeddings else 0

    @property
    def total_params(self) -> int:
        per_layer = self.attention_params_per_layer + self.dense_moe_params_per_layer + self.expert_params_per_layer
        return self.num_layers * per_layer + self.embedding_params + self.output_params + self.hidden  # final norm

    @property
    def active_params(self) -> int:
        experts = self.num_layers * self.topk * 3 * self.hidden * self.moe_ffn
        return self.total_params - self.num_layers * self.expert_params_per_layer + experts


PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("mixtral-8x7b", num_layers=32, hidden=4096, num_heads=32, num_query_groups=8, head_dim=128,
                  moe_ffn=14336, num_experts=8, topk=2, vocab=32000,
                  source="huggingface.co/mistralai/Mixtral-8x7B-v0.1 config.json"),
        ModelSpec("mixtral-8x22b", num_layers=56, hidden=6144, num_heads=48, num_query_groups=8, head_dim=128,
                  moe_ffn=16384, num_experts=8, topk=2, vocab=32768,
                  source="huggingface.co/mistralai/Mixtral-8x22B-v0.1 config.json"),
        ModelSpec("qwen2-57b-a14b", num_layers=28, hidden=3584, num_heads=28, num_query_groups=4, head_dim=128,
                  moe_ffn=2560, num_experts=64, topk=8, vocab=151936, shared_expert_ffn=20480,
                  shared_expert_gate=True, qkv_bias=True,
                  source="huggingface.co/Qwen/Qwen2-57B-A14B config.json"),
        ModelSpec("qwen3-30b-a3b", num_layers=48, hidden=2048, num_heads=32, num_query_groups=4, head_dim=128,
                  moe_ffn=768, num_experts=128, topk=8, vocab=151936, qk_layernorm=True,
                  source="huggingface.co/Qwen/Qwen3-30B-A3B config.json"),
        ModelSpec("qwen3-235b-a22b", num_layers=94, hidden=4096, num_heads=64, num_query_groups=4, head_dim=128,
                  moe_ffn=1536, num_experts=128, topk=8, vocab=151936, qk_layernorm=True,
                  source="huggingface.co/Qwen/Qwen3-235B-A22B config.json"),
    ]
}


def get_model(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)} "
                         "(or pass --hf-config config.json)") from None


_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def from_hf_config(path: str) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json of the Mixtral, Qwen2-MoE or Qwen3-MoE family."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read Hugging Face config {path!r}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a Hugging Face config is a JSON object, got {type(cfg).__name__}")
    family = cfg.get("model_type")
    if family not in _FAMILIES:
        raise ValueError(f"{path}: model_type {family!r} is not supported; supported: {', '.join(_FAMILIES)}")
    # Fields whose Transformers default differs between families (or from what we would guess) are
    # required rather than defaulted: a wrong head or expert count silently changes the whole plan.
    need = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "num_experts_per_tok"]
    need += {"mixtral": ["intermediate_size", "num_local_experts"],
             "qwen2_moe": ["moe_intermediate_size", "num_experts", "shared_expert_intermediate_size"],
             "qwen3_moe": ["moe_intermediate_size", "num_experts", "head_dim"]}[family]
    missing = [k for k in need if k not in cfg]
    if missing:
        raise ValueError(f"{path}: {family} config is missing {', '.join(missing)}")
    # A shared expert may be absent (0); every other size must be positive.
    minimum = {"shared_expert_intermediate_size": 0}
    bad = [f"{k}={cfg[k]!r}" for k in need
           if not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] < minimum.get(k, 1)]
    if bad:
        raise ValueError(f"{path}: these fields must be positive integers "
                         f"(shared_expert_intermediate_size may be 0): {', '.join(bad)}")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError(f"{path}: num_key_value_heads {cfg['num_key_value_heads']} must divide "
                         f"num_attention_heads {cfg['num_attention_heads']} (grouped-query attention)")
    experts = cfg["num_local_experts"] if family == "mixtral" else cfg["num_experts"]
    if cfg["num_experts_per_tok"] > experts:
        raise ValueError(f"{path}: num_experts_per_tok {cfg['num_experts_per_tok']} exceeds the {experts} experts")
    if not cfg.get("head_dim") and cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"{path}: no head_dim, and hidden_size {cfg['hidden_size']} is not divisible by "
                         f"num_attention_heads {cfg['num_attention_heads']}")
    if family != "mixtral" and (cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers")):
        raise ValueError(f"{path}: layers without MoE (decoder_sparse_step / mlp_only_layers) are not modelled")
    heads = cfg["num_attention_heads"]
    return ModelSpec(
        name=cfg.get("_name_or_path") or path,
        num_layers=cfg["num_hidden_layers"],
        hidden=cfg["hidden_size"],
        num_heads=heads,
        num_query_groups=cfg["num_key_value_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        moe_ffn=cfg["intermediate_size"] if family == "mixtral" else cfg["moe_intermediate_size"],
        num_experts=experts,
        topk=cfg["num_experts_per_tok"],
        vocab=cfg["vocab_size"],
        shared_expert_ffn=cfg["shared_expert_intermediate_size"] if family == "qwen2_moe" else 0,
        shared_expert_gate=family == "qwen2_moe" and cfg["shared_expert_intermediate_size"] > 0,
        qkv_bias=family == "qwen2_moe",
        qk_layernorm=family == "qwen3_moe",
        untied_embeddings=not cfg.get("tie_word_embeddings", False),
        source=path,
    )
