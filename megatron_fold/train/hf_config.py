"""`megatron-fold train --hf-config config.json`: what of a Hugging Face config becomes the Megatron model.

Every field is accounted for, and the command prints the account before any rank starts: taken (the
Megatron field it sets, with the value), replaced (by a flag of this command or by what the run needs,
with the reason) or ignored (not part of the model Megatron builds, or not modelled, with the reason).
Nothing changes silently: a field whose effect cannot be expressed and would change what the model
computes (a non-SiLU activation, an output-projection bias) is refused instead.

The shape (sizes, experts, heads) comes from the planner's reader (plan.models.from_hf_config), which
validates it; the numerics that matter for training but not for a cost model (rotary base, top-k
normalisation, norm epsilon, aux-loss coefficient, initialisation, jitter) are read here.
"""

from __future__ import annotations

import dataclasses
import json

__all__ = ["HFModel", "read_hf_config"]

# Fields that say nothing about the model Megatron builds (generation, tokens, bookkeeping).
_BOOKKEEPING = {"architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
                "output_router_logits", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}


@dataclasses.dataclass
class HFModel:
    """A Hugging Face config as the Megatron model: TransformerConfig fields, the GPTModel's rotary base,
    and the account of every field (lines for the report)."""

    path: str
    family: str                     # models.MODEL_FAMILIES key the config overrides
    family_name: str                # the config's model_type
    config: dict                    # TransformerConfig fields
    rotary_base: float
    vocab_size: int                 # the config's; the command decides what the embedding gets
    max_position_embeddings: int | None
    taken: dict[str, str] = dataclasses.field(default_factory=dict)     # HF field -> "value -> Megatron field"
    replaced: dict[str, str] = dataclasses.field(default_factory=dict)  # HF field -> "value -> new (why)"
    ignored: dict[str, str] = dataclasses.field(default_factory=dict)   # HF field -> "value (why)"
    sources: dict[str, str] = dataclasses.field(default_factory=dict)   # Megatron field -> HF field

    def replace(self, field: str, value, why: str) -> None:
        """Set a TransformerConfig field to `value` in place of what the config said (moved to `replaced`)."""
        source = self.sources.get(field)
        old = self.config.get(field)
        self.config[field] = value
        if source is not None and old != value:
            self.taken.pop(source, None)
            self.replaced[source] = f"{_show(old)} -> {field} {_show(value)} ({why})"

    def report(self) -> str:
        lines = [f"--hf-config {self.path} ({self.family_name}):"]
        for title, entries in (("taken", self.taken), ("replaced", self.replaced), ("ignored", self.ignored)):
            lines.append(f"  {title} ({len(entries)}):")
            lines += [f"    {key} {text}" for key, text in entries.items()]
        return "\n".join(lines)


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (bool, type(None), list, dict)) else str(value)


def read_hf_config(path: str) -> HFModel:
    """Raises ValueError naming the field when the config cannot be trusted or expressed."""
    from megatron_fold.plan.models import from_hf_config

    shape = from_hf_config(path)  # sizes, validated (a missing or non-positive size is refused there)
    with open(path) as f:
        cfg = json.load(f)
    kind = cfg["model_type"]
    model = HFModel(path=path, family="qwen2-moe-like" if shape.shared_expert_ffn else "mixtral-like",
                    config={}, rotary_base=10000.0, vocab_size=cfg["vocab_size"],
                    max_position_embeddings=cfg.get("max_position_embeddings"), family_name=kind)
    model.taken["model_type"] = f'"{kind}" -> {model.family} (RMSNorm, RoPE, SwiGLU experts, untied embeddings)'

    def take(key: str, field: str, value, shown=None) -> None:
        model.config[field] = value
        model.sources[field] = key
        model.taken[key] = f"{_show(cfg[key]) if shown is None else shown} -> {field} {_show(value)}"

    experts_key = "num_local_experts" if kind == "mixtral" else "num_experts"
    ffn_key = "intermediate_size" if kind == "mixtral" else "moe_intermediate_size"
    take("num_hidden_layers", "num_layers", shape.num_layers)
    take("hidden_size", "hidden_size", shape.hidden)
    take("num_attention_heads", "num_attention_heads", shape.num_heads)
    take("num_key_value_heads", "num_query_groups", shape.num_query_groups)
    if "head_dim" in cfg and cfg["head_dim"]:
        take("head_dim", "kv_channels", shape.head_dim)
    else:
        model.config["kv_channels"] = shape.head_dim  # hidden / heads, Megatron's own default
    take(ffn_key, "moe_ffn_hidden_size", shape.moe_ffn)
    model.config["ffn_hidden_size"] = shape.moe_ffn  # dense layers' size: there are none (every layer is MoE)
    take(experts_key, "num_moe_experts", shape.num_experts)
    take("num_experts_per_tok", "moe_router_topk", shape.topk)
    if kind == "qwen2_moe":
        take("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size", shape.shared_expert_ffn or None)
        model.config["moe_shared_expert_gate"] = shape.shared_expert_gate  # Qwen2-MoE's sigmoid gate
    model.config["add_qkv_bias"] = shape.qkv_bias      # Qwen2-MoE: QKV bias, by its architecture
    model.config["qk_layernorm"] = shape.qk_layernorm  # Qwen3-MoE: q/k RMSNorm, by its architecture
    if "decoder_sparse_step" in cfg:
        model.taken["decoder_sparse_step"] = "1 -> every layer MoE"
    if "mlp_only_layers" in cfg:
        model.taken["mlp_only_layers"] = "[] -> every layer MoE"

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{path}: hidden_act {act!r}: Megatron's experts here are SwiGLU (silu); not modelled")
    if "hidden_act" in cfg:
        model.taken["hidden_act"] = '"silu" -> gated_linear_unit true, activation_func silu (SwiGLU)'
    if kind == "qwen3_moe" and cfg.get("attention_bias"):
        raise ValueError(f"{path}: attention_bias true puts a bias on q, k, v and the output projection; Megatron "
                         "has QKV-only bias (add_qkv_bias) or bias on every linear layer: not modelled")
    if "attention_bias" in cfg:
        take("attention_bias", "add_qkv_bias", False)
    if "rope_theta" in cfg:
        model.rotary_base = float(cfg["rope_theta"])
        model.taken["rope_theta"] = f"{_show(cfg['rope_theta'])} -> GPTModel rotary_base {model.rotary_base:g}"
    if "rms_norm_eps" in cfg:
        take("rms_norm_eps", "layernorm_epsilon", float(cfg["rms_norm_eps"]))
    # Top-k normalisation: Mixtral always renormalises the top-k probabilities, which is Megatron's softmax
    # over the top-k logits; Qwen's norm_topk_prob false is a softmax over all experts before the top-k,
    # unnormalised (moe_router_pre_softmax).
    if kind == "mixtral":
        model.config["moe_router_pre_softmax"] = False
    else:
        normalise = cfg.get("norm_topk_prob", False)  # Transformers' default for both Qwen families
        model.config["moe_router_pre_softmax"] = not normalise
        model.sources["moe_router_pre_softmax"] = "norm_topk_prob"
        model.taken["norm_topk_prob"] = (f"{_show(normalise)}{'' if 'norm_topk_prob' in cfg else ' (default)'} "
                                         f"-> moe_router_pre_softmax {_show(not normalise)}")
    if "router_aux_loss_coef" in cfg:
        take("router_aux_loss_coef", "moe_aux_loss_coeff", float(cfg["router_aux_loss_coef"]))
    if "initializer_range" in cfg:
        take("initializer_range", "init_method_std", float(cfg["initializer_range"]))
    if "attention_dropout" in cfg:
        take("attention_dropout", "attention_dropout", float(cfg["attention_dropout"]))
    if "router_jitter_noise" in cfg:
        take("router_jitter_noise", "moe_input_jitter_eps", float(cfg["router_jitter_noise"]) or None)

    if cfg.get("tie_word_embeddings"):
        model.replaced["tie_word_embeddings"] = "true -> untied output weights (megatron-fold train builds them untied)"
    elif "tie_word_embeddings" in cfg:
        model.taken["tie_word_embeddings"] = "false -> untied output weights"
    window_off = cfg.get("sliding_window") is None or cfg.get("use_sliding_window") is False
    window = ("off in the config: full causal attention, as Megatron's" if window_off else
              "sliding-window attention is not modelled: full causal attention instead")
    reasons = {
        "sliding_window": window, "use_sliding_window": window, "max_window_layers": window,
        "rope_scaling": ("plain RoPE, as Megatron's" if cfg.get("rope_scaling") is None else
                         "RoPE scaling is not modelled: plain RoPE instead"),
        "intermediate_size": "the dense MLP size of layers without MoE; every layer here is MoE",
    }
    handled = set(model.taken) | set(model.replaced) | {"vocab_size", "max_position_embeddings"}
    for key in sorted(set(cfg) - handled):
        why = reasons.get(key, "no effect on the model Megatron builds" if key in _BOOKKEEPING else "not modelled")
        model.ignored[key] = f"{_show(cfg[key])} ({why})"
    return model
