"""Qwen3 (dense): Qwen2's layers without q/k/v biases, with an RMSNorm over each head of q and k
(q_norm, k_norm) after the projections, and a head_dim of its own (128 where hidden/heads is not).

AWQ's folds and the rotation are Llama's: the per-head norms act after q_proj/k_proj, so a scale on
those linears' inputs or a rotation of the residual stream leaves them unchanged. GGUF: llama.cpp's
`qwen3` architecture (NEOX rope, attn_q_norm/attn_k_norm, key/value lengths)."""

from __future__ import annotations

import gguf

from . import qwen2
from .base import Family, GGUFArch
from .llama import FOLDS, LAYER_TENSORS, ROTATION_WRITERS

def _config_from_gguf(meta: dict, tensor) -> dict:
    """head_dim: transformers' loader leaves Qwen3's at its default (128) whatever the file holds."""
    return {"head_dim": int(meta["attention.key_length"])} if "attention.key_length" in meta else {}


GGUF = GGUFArch(
    arch="qwen3",
    model_arch=gguf.MODEL_ARCH.QWEN3,
    layer_tensors=LAYER_TENSORS + ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
    check_config=qwen2.check_config,
    add_metadata=qwen2.add_metadata,
    tokenizer_pre=qwen2.tokenizer_pre,
    config_from_gguf=_config_from_gguf,
)

QWEN3 = Family(name="qwen3", label="Qwen3", model_types=("qwen3",), folds=FOLDS,
               rotation_writers=ROTATION_WRITERS, gguf=GGUF)
