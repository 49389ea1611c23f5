"""Qwen2 (Qwen2, Qwen2.5): Llama's layers with biases on q/k/v, which AWQ's folds and the rotation
handle as they are. GGUF: llama.cpp's `qwen2` architecture, whose rope is NEOX-style as
transformers' is (no row permutation), biases stored beside the weights."""

from __future__ import annotations

import gguf

from ..errors import SizewiseError
from . import gguf_keys
from .base import Family, GGUFArch, Prunable
from .llama import FOLDS, LAYER_TENSORS, ROTATION_WRITERS

# The Split regex of the Qwen2/2.5/3 tokenizer (Llama 3's, digits one at a time): llama.cpp's "qwen2".
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def check_config(config, layout: GGUFArch) -> None:
    gguf_keys.check_act(config, layout, ("silu",))
    gguf_keys.check_rope(config, layout)
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise SizewiseError(f"llama.cpp's '{layout.arch}' has no sliding-window attention")


def add_metadata(w, config) -> None:
    """`Qwen2Model`/`Qwen3Model.set_gguf_parameters` (`TextModel`'s): common keys, rope, eps, and
    key/value lengths where the config names a head_dim."""
    gguf_keys.add_common(w, config)
    gguf_keys.add_rope(w, gguf_keys.rope(config))
    gguf_keys.add_eps(w, config)
    if getattr(config, "head_dim", None) is not None:
        gguf_keys.add_head_lengths(w, config)


def tokenizer_pre(tokenizer_json: dict) -> str | None:
    return "qwen2" if gguf_keys.split_regexes(tokenizer_json) == [QWEN2_SPLIT] else None


GGUF = GGUFArch(
    arch="qwen2",
    model_arch=gguf.MODEL_ARCH.QWEN2,
    layer_tensors=LAYER_TENSORS + ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    check_config=check_config,
    add_metadata=add_metadata,
    tokenizer_pre=tokenizer_pre,
)

QWEN2 = Family(name="qwen2", label="Qwen2", model_types=("qwen2",), folds=FOLDS,
               rotation_writers=ROTATION_WRITERS, gguf=GGUF, prunable=Prunable())
