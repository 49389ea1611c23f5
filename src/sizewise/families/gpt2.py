"""GPT-2: pre-LayerNorm (with bias) blocks of transposed Conv1D linears (`arch.LinearRef` hides the
layout); c_attn's rows are q, k, v. GGUF export does not write llama.cpp's `gpt2` architecture yet."""

from __future__ import annotations

from .base import Family, Fold

FOLDS: tuple[Fold, ...] = (
    Fold("ln_1", ("attn.c_attn",)),
    Fold("ln_2", ("mlp.c_fc",)),
    Fold("attn.c_attn", ("attn.c_proj",), "linear", heads=True),
    Fold(None, ("mlp.c_proj",), "none", why="GELU between c_fc and c_proj is not positively homogeneous"),
)

GPT2 = Family(name="gpt2", label="GPT-2", model_types=("gpt2",), folds=FOLDS,
              no_rotation="LayerNorm subtracts the mean")
