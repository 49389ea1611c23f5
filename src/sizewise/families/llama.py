"""Llama and Mistral (and everything that ships as model_type "llama": SmolLM, TinyLlama, ...).

Pre-RMSNorm decoder: input_layernorm -> q/k/v -> o_proj, post_attention_layernorm -> gate/up ->
SiLU-gated down_proj. GGUF: llama.cpp's `llama` architecture (RoPE default, linear or llama3, the
latter as the `rope_freqs` tensor). Mistral runs as `llama` in llama.cpp when it has no sliding
window: llama.cpp's `llama` has none, so a window shorter than the context is refused.
"""

from __future__ import annotations

import gguf

from ..errors import SizewiseError
from . import gguf_keys
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

_ROPE = ("default", "linear", "llama3")
LAYER_TENSORS = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.down_proj.weight",
)


def _check_config(config, layout: GGUFArch) -> None:
    gguf_keys.check_act(config, layout, ("silu",))
    gguf_keys.check_rope(config, layout, _ROPE)
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise SizewiseError(f"llama.cpp's '{layout.arch}' has no sliding-window attention (window {window})")


def _add_metadata(w, config) -> None:
    """`LlamaModel.set_gguf_parameters`: the common keys, vocab size, rope dimensions and base (and
    linear scaling; llama3's is the `rope_freqs` tensor), key/value lengths where head_dim is not
    hidden/heads."""
    gguf_keys.add_common(w, config)
    gguf_keys.add_rope(w, gguf_keys.rope(config))
    w.add_rope_dimension_count(gguf_keys.head_dim(config))
    gguf_keys.add_eps(w, config)
    w.add_vocab_size(config.vocab_size)
    if gguf_keys.head_dim(config) != config.hidden_size // config.num_attention_heads:
        gguf_keys.add_head_lengths(w, config)


def _rope_heads(config) -> dict[str, int]:
    """llama.cpp applies rope to interleaved pairs where transformers uses halves: its converter
    permutes the rows of q_proj and k_proj (weights and biases) per head."""
    return {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": gguf_keys.n_kv_heads(config)}


def _extra_tensors(config) -> dict[str, list[float]]:
    params = gguf_keys.rope(config)
    if params["rope_type"] != "llama3":
        return {}
    return {_ROPE_FREQS: gguf_keys.llama3_rope_factors(gguf_keys.head_dim(config), params)}


_ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


def _config_from_gguf(meta: dict, tensor) -> dict:
    """Rope scaling (linear; llama3 from rope_freqs): transformers' loader reads neither."""
    dim = meta.get("attention.key_length") or meta.get("rope.dimension_count") or \
        meta["embedding_length"] // meta["attention.head_count"]
    rope = gguf_keys.rope_from_gguf(meta, tensor, int(dim))
    return {"rope_parameters": rope} if rope["rope_type"] != "default" else {}


# The Split regex of Llama 3's tokenizer.json: llama.cpp's pre-tokenizer "llama-bpe".
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _tokenizer_pre(tokenizer_json: dict) -> str | None:
    return "llama-bpe" if gguf_keys.split_regexes(tokenizer_json) == [_LLAMA3_SPLIT] else None


GGUF = GGUFArch(
    arch="llama",
    model_arch=gguf.MODEL_ARCH.LLAMA,
    layer_tensors=LAYER_TENSORS,
    check_config=_check_config,
    add_metadata=_add_metadata,
    rope_heads=_rope_heads,
    extra_tensors=_extra_tensors,
    tokenizer_pre=_tokenizer_pre,
    config_from_gguf=_config_from_gguf,
)

LLAMA = Family(name="llama", label="Llama", model_types=("llama",), folds=FOLDS,
               rotation_writers=ROTATION_WRITERS, gguf=GGUF, prunable=Prunable())
# Same layers; its sliding window (when shorter than the context) is refused by GGUF's `_check_config`.
MISTRAL = Family(name="mistral", label="Mistral", model_types=("mistral",), folds=FOLDS,
                 rotation_writers=ROTATION_WRITERS, gguf=GGUF, prunable=Prunable())
