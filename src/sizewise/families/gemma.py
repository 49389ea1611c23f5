"""Gemma: every model type starting with "gemma" (gemma, gemma2, gemma3, gemma3_text, gemma3n,
gemma4, ...); they share these module names and conventions. The tiny test model is Gemma 3's.

- Gemma's RMSNorm multiplies by 1 + weight: AWQ finds that by probing each norm (`awq.norm_offset`).
- From Gemma 2 on, post_attention_layernorm normalizes the attention *output* (a per-channel gain on
  what is added to the residual, with no linear after it to absorb a scale); the MLP reads
  pre_feedforward_layernorm. That gain is also why the residual stream cannot be rotated.
- Gemma expects BOS at the start of every sequence.
- The embedding scale (√hidden) and logit soft-capping live inside transformers' modules; nothing in
  sizewise needs them. GGUF export does not write llama.cpp's gemma architectures yet.
"""

from __future__ import annotations

from .base import Family, Fold, Prunable

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

FOLDS: tuple[Fold, ...] = (
    Fold("input_layernorm", _QKV),
    Fold("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    # Gemma 1 has no pre_feedforward_layernorm: its MLP reads post_attention_layernorm, as in Llama
    Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), unless="pre_feedforward_layernorm"),
    # down(act(gate) · up) is linear in up: dividing up's rows by s is exact for any activation on gate
    Fold("mlp.up_proj", ("mlp.down_proj",), "linear"),
    # Gemma 3n and 4 normalize v (v_norm), which a scale on v's rows would not pass through
    Fold("self_attn.v_proj", ("self_attn.o_proj",), "linear", heads=True, unless="self_attn.v_norm"),
)

GEMMA = Family(
    name="gemma", label="Gemma",
    model_types=("gemma3", "gemma3_text"),
    model_type_prefixes=("gemma",),
    folds=FOLDS,
    no_rotation="its post-attention/feedforward norms scale the residual update per channel "
                "(Gemma 2 on; Gemma 1's norms multiply by 1 + weight)",
    prunable=Prunable(),
    bos=True,
)
