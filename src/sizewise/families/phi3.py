"""Phi-3: Llama-like, with fused projections (qkv_proj: q, k, v rows; gate_up_proj: gate, up rows).
The v and up parts are the *last* rows, which is what AWQ's "linear" folds divide.

GGUF: llama.cpp's `phi3`, which keeps both fusions as they are (`attn_qkv`; `ffn_up` holding gate
then up, split at run time) and runs NEOX rope, as transformers does (no row permutation). LongRoPE
(Phi-3 128k, Phi-3.5) as the converter writes it: the rope_factors_long/short tensors and the
attention factor; llama.cpp takes the long factors when its context exceeds the original one, as
transformers does when the sequence does."""

from __future__ import annotations

import math

import gguf

from ..errors import SizewiseError
from . import gguf_keys
from .base import Family, Fold, GGUFArch
from .llama import ROTATION_WRITERS

FOLDS: tuple[Fold, ...] = (
    Fold("input_layernorm", ("self_attn.qkv_proj",)),
    Fold("post_attention_layernorm", ("mlp.gate_up_proj",)),
    Fold("mlp.gate_up_proj", ("mlp.down_proj",), "linear"),
    Fold("self_attn.qkv_proj", ("self_attn.o_proj",), "linear", heads=True),
)


def _check_config(config, layout: GGUFArch) -> None:
    gguf_keys.check_act(config, layout, ("silu",))
    gguf_keys.check_rope(config, layout, ("default", "longrope"))
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise SizewiseError(f"GGUF '{layout.arch}' export writes full-width rope; this model rotates "
                            f"{config.partial_rotary_factor:g} of each head")


def _original_ctx(config) -> int:
    return int(getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)


def _longrope_attn_factor(config, params: dict) -> float:
    """transformers' (and the converter's) LongRoPE cos/sin scale: sqrt(1 + ln(scale) / ln(original ctx))."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    scale = config.max_position_embeddings / _original_ctx(config)
    return math.sqrt(1 + math.log(scale) / math.log(_original_ctx(config))) if scale > 1.0 else 1.0


def _add_metadata(w, config) -> None:
    """`Phi3MiniModel.set_gguf_parameters` (its sliding window written as 0 where it has none), and
    LongRoPE's attention factor."""
    rope = gguf_keys.rope(config)
    w.add_context_length(config.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(_original_ctx(config))
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(gguf_keys.n_kv_heads(config))
    gguf_keys.add_eps(w, config)
    w.add_rope_dimension_count(gguf_keys.head_dim(config))
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
    if rope["rope_type"] == "longrope":
        w.add_rope_scaling_attn_factors(_longrope_attn_factor(config, rope))


_LONG, _SHORT = (gguf.TENSOR_NAMES[t] + ".weight" for t in (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG,
                                                            gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT))


def _extra_tensors(config) -> dict[str, list[float]]:
    rope = gguf_keys.rope(config)
    if rope["rope_type"] != "longrope":
        return {}
    long, short = rope["long_factor"], rope["short_factor"]
    if not len(long) == len(short) == gguf_keys.head_dim(config) // 2:
        raise SizewiseError(f"LongRoPE needs {gguf_keys.head_dim(config) // 2} long and short factors; "
                            f"this model has {len(long)} and {len(short)}")
    return {_LONG: [float(x) for x in long], _SHORT: [float(x) for x in short]}


def _config_from_gguf(meta: dict, tensor) -> dict:
    """The padding id (transformers' default, 32000, may lie past a small vocab), the original context,
    the sliding window (0: none) and LongRoPE from its factor tensors."""
    out = {"pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
           "sliding_window": int(meta.get("attention.sliding_window", 0)) or None}
    if "rope.scaling.original_context_length" in meta:
        out["original_max_position_embeddings"] = int(meta["rope.scaling.original_context_length"])
    long, short = tensor(_LONG), tensor(_SHORT)
    if long is not None and short is not None:
        head_dim = meta["embedding_length"] // meta["attention.head_count"]
        out["rope_parameters"] = {"rope_type": "longrope", "rope_theta": float(meta.get("rope.freq_base", 10000.0)),
                                  "long_factor": long, "short_factor": short,
                                  "original_max_position_embeddings": out.get("original_max_position_embeddings"),
                                  "partial_rotary_factor": meta.get("rope.dimension_count", head_dim) / head_dim}
        if "rope.scaling.attn_factor" in meta:
            out["rope_parameters"]["attention_factor"] = float(meta["rope.scaling.attn_factor"])
    return out


GGUF = GGUFArch(
    arch="phi3",
    model_arch=gguf.MODEL_ARCH.PHI3,
    layer_tensors=("input_layernorm.weight", "self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
                   "post_attention_layernorm.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"),
    check_config=_check_config,
    add_metadata=_add_metadata,
    extra_tensors=_extra_tensors,
    config_from_gguf=_config_from_gguf,
)

PHI3 = Family(name="phi3", label="Phi-3", model_types=("phi3",), folds=FOLDS,
              rotation_writers=ROTATION_WRITERS, gguf=GGUF)
