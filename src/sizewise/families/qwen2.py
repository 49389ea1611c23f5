"""Qwen2 (Qwen2, Qwen2.5): Llama's layers with biases on q/k/v, which AWQ's folds and the rotation
handle as they are. GGUF export does not write llama.cpp's `qwen2` architecture yet."""

from __future__ import annotations

from .base import Family, Prunable
from .llama import FOLDS, ROTATION_WRITERS

QWEN2 = Family(name="qwen2", label="Qwen2", model_types=("qwen2",), folds=FOLDS,
               rotation_writers=ROTATION_WRITERS, prunable=Prunable())
