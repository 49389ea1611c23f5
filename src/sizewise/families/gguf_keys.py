"""What every family's GGUF metadata shares: reading a transformers config the way llama.cpp's
converter (`convert_hf_to_gguf.py`, `TextModel.set_gguf_parameters`) does, and the checks that
keep a config llama.cpp would run differently from being written at all.

Keys are written with gguf's own `GGUFWriter.add_*` methods, which prefix them with the writer's
architecture (`qwen2.rope.freq_base`, ...).
"""

from __future__ import annotations

import math

import gguf

from ..errors import SizewiseError


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def n_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def rope(config, layer_type: str = "full_attention") -> dict:
    """RoPE parameters of one attention kind: transformers 5's `rope_parameters` (per layer type where
    the model has several, as Gemma 3 does), else the older `rope_theta` / `rope_scaling` attributes."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if not params:
        params = {**(getattr(config, "rope_scaling", None) or {}),
                  "rope_theta": getattr(config, "rope_theta", 10000.0)}
    params = dict(params)
    params.setdefault("rope_type", params.get("type") or "default")
    params.setdefault("rope_theta", 10000.0)
    return params


def check_act(config, layout, allowed: tuple[str, ...]) -> None:
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in allowed:
        raise SizewiseError(f"llama.cpp's '{layout.arch}' runs a {'/'.join(allowed)}-gated MLP; this model uses {act!r}")


def check_rope(config, layout, allowed: tuple[str, ...] = ("default", "linear"), layer_type="full_attention") -> dict:
    params = rope(config, layer_type)
    if params["rope_type"] not in allowed:
        raise SizewiseError(f"GGUF '{layout.arch}' export writes RoPE of type {', '.join(allowed)}; "
                            f"this model uses rope_type {params['rope_type']!r}")
    return params


def check_layer_types(config, layout, sliding) -> None:
    """llama.cpp fixes which layers slide for some archs (`sliding(i)`): refuse a config that differs."""
    types = getattr(config, "layer_types", None)
    if types is None:
        return
    want = ["sliding_attention" if sliding(i) else "full_attention" for i in range(config.num_hidden_layers)]
    if list(types) != want:
        raise SizewiseError(f"llama.cpp's '{layout.arch}' fixes which layers use sliding-window attention "
                            f"({want[:6]}...); this model's layer_types differ")


def check_attention_scale(config, layout) -> None:
    """Gemma scales queries by query_pre_attn_scalar^-0.5; llama.cpp by head_dim^-0.5 (except its 27B)."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != head_dim(config):
        raise SizewiseError(f"llama.cpp's '{layout.arch}' scales attention by head_dim ({head_dim(config)}); "
                            f"this model's query_pre_attn_scalar is {scalar}")


def add_common(w, config) -> None:
    """The keys `TextModel.set_gguf_parameters` writes for every decoder (the norm's eps is `add_eps`)."""
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(n_kv_heads(config))


def add_eps(w, config) -> None:
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def add_head_lengths(w, config) -> None:
    w.add_key_length(head_dim(config))
    w.add_value_length(head_dim(config))


def add_rope(w, params: dict) -> None:
    """Frequency base, and linear scaling as llama.cpp stores it (llama3's is a tensor: `llama3_rope_factors`)."""
    w.add_rope_freq_base(float(params["rope_theta"]))
    if params["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))


def llama3_rope_factors(dim: int, params: dict) -> list[float]:
    """The `rope_freqs` tensor llama.cpp's converter writes for rope_type "llama3" (head size `dim`):
    per rotary pair, the factor llama.cpp divides its frequency by (transformers' `_compute_llama3_parameters`)."""
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * params["rope_theta"] ** (i / dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(float(factor))
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return factors


# --- the way back: config values transformers' GGUF loader leaves out ----------------------------

def rope_from_gguf(meta: dict, tensor, dim: int) -> dict:
    """rope_parameters of a file: base, linear scaling, and llama3 scaling recovered from its
    `rope_freqs` (Llama 3's usual low/high factors 1 and 4, the original context a power of two;
    checked against the file's factors, refused if none reproduces them)."""
    params = {"rope_type": "default", "rope_theta": float(meta.get("rope.freq_base", 10000.0))}
    if meta.get("rope.scaling.type") == "linear":
        params |= {"rope_type": "linear", "factor": float(meta["rope.scaling.factor"])}
    freqs = tensor("rope_freqs.weight")
    if freqs is None or all(abs(f - 1.0) < 1e-7 for f in freqs):
        return params
    for k in range(6, 21):
        guess = {**params, "rope_type": "llama3", "factor": float(max(freqs)), "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 2 ** k}
        want = llama3_rope_factors(dim, guess)
        if len(want) == len(freqs) and all(abs(a - b) <= 1e-5 * b for a, b in zip(want, freqs)):
            return guess
    raise SizewiseError("this GGUF's rope_freqs are not Llama 3's scaling with any original context; "
                        "transformers cannot run them")


def split_regexes(tokenizer_json: dict) -> list[str]:
    """The regexes of a tokenizer.json's Split pre-tokenizers, in order: what tells llama.cpp's
    pre-tokenizers apart (its converter hashes their output instead)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Split" and isinstance(node.get("pattern"), dict):
                found.append(node["pattern"].get("Regex") or node["pattern"].get("String"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tokenizer_json.get("pre_tokenizer"))
    return found
