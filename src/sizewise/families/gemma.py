"""Gemma: every model type starting with "gemma" (gemma, gemma2, gemma3, gemma3_text, gemma3n,
gemma4, ...); they share these module names and conventions. Gemma 2 and Gemma 3 (text) are
families of their own because GGUF export writes them (llama.cpp's `gemma2` and `gemma3`).

- Gemma's RMSNorm multiplies by 1 + weight: AWQ finds that by probing each norm (`awq.norm_offset`);
  llama.cpp's converter stores 1 + weight (`GGUFArch.norm_shift`).
- From Gemma 2 on, post_attention_layernorm normalizes the attention *output* (a per-channel gain on
  what is added to the residual, with no linear after it to absorb a scale); the MLP reads
  pre_feedforward_layernorm. That gain is also why the residual stream cannot be rotated.
- Gemma expects BOS at the start of every sequence.
- The embedding scale (√hidden), logit soft-capping and sliding windows live inside transformers'
  modules, and llama.cpp applies its own; what llama.cpp fixes per architecture (which layers slide,
  the sliding layers' rope base, the attention scale, Gemma 2's soft-caps) is checked, and a config
  that differs is refused.
"""

from __future__ import annotations

import gguf

from ..errors import SizewiseError
from . import gguf_keys
from .base import Family, Fold, GGUFArch, Prunable

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

NO_ROTATION = ("its post-attention/feedforward norms scale the residual update per channel "
               "(Gemma 2 on; Gemma 1's norms multiply by 1 + weight)")


# --- GGUF: llama.cpp's `gemma2` and `gemma3` ------------------------------------------------------

_LAYER_TENSORS = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
_GELU = ("gelu_pytorch_tanh",)   # llama.cpp's Gemma MLP is GELU (tanh approximation)


def _check_common(config, layout: GGUFArch) -> None:
    gguf_keys.check_act(config, layout, _GELU)
    gguf_keys.check_attention_scale(config, layout)
    if not getattr(config, "tie_word_embeddings", True):
        raise SizewiseError(f"llama.cpp's '{layout.arch}' reads its output head from the embeddings; "
                            "this model's head is untied")


def _check_gemma2(config, layout: GGUFArch) -> None:
    _check_common(config, layout)
    gguf_keys.check_rope(config, layout, ("default",))
    gguf_keys.check_layer_types(config, layout, lambda i: i % 2 == 0)   # llama.cpp: every other layer slides
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) is None:
            raise SizewiseError(f"llama.cpp's '{layout.arch}' always soft-caps; this model has no {key}")


def _add_gemma2(w, config) -> None:
    """`Gemma2Model.set_gguf_parameters`, plus the rope base (llama.cpp's default otherwise)."""
    gguf_keys.add_common(w, config)
    gguf_keys.add_eps(w, config)
    gguf_keys.add_head_lengths(w, config)
    w.add_rope_freq_base(float(gguf_keys.rope(config)["rope_theta"]))
    w.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    w.add_final_logit_softcapping(float(config.final_logit_softcapping))
    w.add_sliding_window(int(config.sliding_window))


_SWA_THETA = 10000.0   # llama.cpp's gemma3 runs its sliding layers with this rope base, whatever the file says


def _check_gemma3(config, layout: GGUFArch) -> None:
    _check_common(config, layout)
    gguf_keys.check_rope(config, layout, ("default", "linear"))
    local = gguf_keys.check_rope(config, layout, ("default",), layer_type="sliding_attention")
    if float(local["rope_theta"]) != _SWA_THETA:
        raise SizewiseError(f"llama.cpp's '{layout.arch}' runs sliding layers with rope base {_SWA_THETA:g}; "
                            f"this model's is {local['rope_theta']:g}")
    gguf_keys.check_layer_types(config, layout, lambda i: i % 6 < 5)   # llama.cpp: 5 sliding, then 1 global
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise SizewiseError(f"llama.cpp's '{layout.arch}' has no attention soft-cap")


def _add_gemma3(w, config) -> None:
    """`Gemma3Model.set_gguf_parameters`: common keys, key/value lengths, the global layers' rope base
    and linear scaling, the final soft-cap where set, the sliding window."""
    gguf_keys.add_common(w, config)
    gguf_keys.add_eps(w, config)
    gguf_keys.add_head_lengths(w, config)
    gguf_keys.add_rope(w, gguf_keys.rope(config))
    if getattr(config, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        w.add_sliding_window(int(config.sliding_window))


def _gemma2_from_gguf(meta: dict, tensor) -> dict:
    """Soft-caps and the attention scale llama.cpp runs (head_dim^-0.5): transformers' loader keeps its defaults."""
    return {"attn_logit_softcapping": float(meta["attn_logit_softcapping"]),
            "final_logit_softcapping": float(meta["final_logit_softcapping"]),
            "query_pre_attn_scalar": int(meta["attention.key_length"])}


def _gemma3_from_gguf(meta: dict, tensor) -> dict:
    """The final soft-cap (none unless written), the attention scale, the global layers' linear rope
    scaling, the sliding layers' fixed base: what llama.cpp runs and transformers' loader leaves out."""
    full = gguf_keys.rope_from_gguf(meta, lambda name: None, int(meta["attention.key_length"]))
    return {"final_logit_softcapping": float(meta["final_logit_softcapping"]) if "final_logit_softcapping" in meta else None,
            "query_pre_attn_scalar": int(meta["attention.key_length"]),
            "rope_parameters": {"full_attention": full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": _SWA_THETA}}}


GEMMA2_GGUF = GGUFArch(
    arch="gemma2",
    model_arch=gguf.MODEL_ARCH.GEMMA2,
    layer_tensors=_LAYER_TENSORS,
    check_config=_check_gemma2,
    add_metadata=_add_gemma2,
    norm_shift=1.0,
    config_from_gguf=_gemma2_from_gguf,
)

GEMMA3_GGUF = GGUFArch(
    arch="gemma3",
    model_arch=gguf.MODEL_ARCH.GEMMA3,
    layer_tensors=_LAYER_TENSORS + ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
    check_config=_check_gemma3,
    add_metadata=_add_gemma3,
    norm_shift=1.0,
    config_from_gguf=_gemma3_from_gguf,
)

GEMMA2 = Family(name="gemma2", label="Gemma 2", model_types=("gemma2",), folds=FOLDS, no_rotation=NO_ROTATION,
                gguf=GEMMA2_GGUF, prunable=Prunable(), bos=True)
# "gemma3" is the multimodal model's config; its text model is "gemma3_text" (what GGUF export writes)
GEMMA3 = Family(name="gemma3", label="Gemma 3", model_types=("gemma3_text",), folds=FOLDS,
                no_rotation=NO_ROTATION, gguf=GEMMA3_GGUF, prunable=Prunable(), bos=True)
GEMMA = Family(name="gemma", label="Gemma", model_types=("gemma",), model_type_prefixes=("gemma",),
               folds=FOLDS, no_rotation=NO_ROTATION, prunable=Prunable(), bos=True)
