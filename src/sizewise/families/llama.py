"""Llama and Mistral (and everything that ships as model_type "llama": SmolLM, TinyLlama, ...).

Pre-RMSNorm decoder: input_layernorm -> q/k/v -> o_proj, post_attention_layernorm -> gate/up ->
SiLU-gated down_proj. The one family GGUF export writes today, as llama.cpp's `llama` architecture;
Mistral runs as `llama` in llama.cpp when it has no sliding window.
"""

from __future__ import annotations

import gguf

from ..errors import SizewiseError
from .base import Family, Fold, GGUFArch, Prunable

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

FOLDS: tuple[Fold, ...] = (
    Fold("input_layernorm", _QKV),
    Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    # down(act(gate) · up) is linear in up: dividing up's rows by s is exact for any activation on gate
    Fold("mlp.up_proj", ("mlp.down_proj",), "linear"),
    Fold("self_attn.v_proj", ("self_attn.o_proj",), "linear", heads=True),
)
# Linears whose outputs are added to the residual stream, relative to a decoder layer.
ROTATION_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


# --- GGUF: llama.cpp's `llama` architecture -----------------------------------------------------

def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise SizewiseError(f"GGUF export writes default RoPE only; this model uses rope_type {rope_type!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(10000.0 if theta is None else theta)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _n_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _check_config(config, layout: GGUFArch) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise SizewiseError(f"GGUF '{layout.arch}' models use a SiLU-gated MLP; this one uses {act!r}")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise SizewiseError(f"llama.cpp's '{layout.arch}' has no sliding-window attention (window {window})")


def _add_metadata(w, config) -> None:
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(_n_kv_heads(config))
    w.add_rope_freq_base(_rope_theta(config))
    w.add_rope_dimension_count(_head_dim(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    if _head_dim(config) != config.hidden_size // config.num_attention_heads:
        w.add_key_length(_head_dim(config))
        w.add_value_length(_head_dim(config))


def _rope_heads(config) -> dict[str, int]:
    """llama.cpp applies rope to interleaved pairs where transformers uses halves: its converter
    permutes the rows of q_proj and k_proj (weights and biases) per head."""
    return {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": _n_kv_heads(config)}


GGUF = GGUFArch(
    arch="llama",
    model_arch=gguf.MODEL_ARCH.LLAMA,
    top_tensors=("model.embed_tokens.weight", "model.norm.weight"),
    layers="model.layers",
    layer_tensors=(
        "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "mlp.down_proj.weight",
    ),
    output="lm_head.weight",
    check_config=_check_config,
    add_metadata=_add_metadata,
    rope_heads=_rope_heads,
)

LLAMA = Family(name="llama", label="Llama", model_types=("llama",), folds=FOLDS,
               rotation_writers=ROTATION_WRITERS, gguf=GGUF, prunable=Prunable())
# Same layers; its sliding window (when shorter than the context) is refused by GGUF's `_check_config`.
MISTRAL = Family(name="mistral", label="Mistral", model_types=("mistral",), folds=FOLDS,
                 rotation_writers=ROTATION_WRITERS, gguf=GGUF, prunable=Prunable())
