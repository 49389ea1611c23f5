"""OPT: LayerNorm (with bias) blocks, a ReLU MLP (fc1, fc2). Most sizes normalize before each block
(do_layer_norm_before); OPT-350m normalizes after, so its norms feed nothing AWQ can fold into, and
its embeddings are narrower than the residual stream (projected up). GGUF export does not support
OPT."""

from __future__ import annotations

from .base import Family, Fold

FOLDS: tuple[Fold, ...] = (
    Fold("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         requires="do_layer_norm_before"),
    Fold("final_layer_norm", ("fc1",), requires="do_layer_norm_before"),
    Fold("fc1", ("fc2",), "linear"),   # ReLU(x / s) = ReLU(x) / s for s > 0
    Fold("self_attn.v_proj", ("self_attn.out_proj",), "linear", heads=True),
)

OPT = Family(name="opt", label="OPT", model_types=("opt",), folds=FOLDS,
             no_rotation="LayerNorm subtracts the mean")
