"""Phi-3: Llama-like, with fused projections (qkv_proj: q, k, v rows; gate_up_proj: gate, up rows).
The v and up parts are the *last* rows, which is what AWQ's "linear" folds divide. GGUF export does
not write llama.cpp's `phi3` architecture yet."""

from __future__ import annotations

from .base import Family, Fold
from .llama import ROTATION_WRITERS

FOLDS: tuple[Fold, ...] = (
    Fold("input_layernorm", ("self_attn.qkv_proj",)),
    Fold("post_attention_layernorm", ("mlp.gate_up_proj",)),
    Fold("mlp.gate_up_proj", ("mlp.down_proj",), "linear"),
    Fold("self_attn.qkv_proj", ("self_attn.o_proj",), "linear", heads=True),
)

PHI3 = Family(name="phi3", label="Phi-3", model_types=("phi3",), folds=FOLDS,
              rotation_writers=ROTATION_WRITERS)
