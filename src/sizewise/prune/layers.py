"""Whole decoder layers: how much a block of them changes the residual stream, and removing them.

Importance follows "The Unreasonable Ineffectiveness of the Deeper Layers" (Gromov et al., 2024):
the angular distance d(x_l, x_{l+n}) = arccos(cos(x_l, x_{l+n})) / π between the residual stream
entering layer l and leaving layer l+n-1, averaged over calibration tokens; the block of n layers
with the smallest distance changes the representation least and is the one dropped.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..arch import Architecture
from .config import text_config


def angular_distances(model, arch: Architecture, samples: torch.Tensor, span: int, *, batch: int = 8,
                      compute_dtype: torch.dtype = torch.float32) -> list[float]:
    """d(x_l, x_{l+span}) for every start l = 0 .. L-span, from one forward pass over `samples`
    (under autocast for a half-precision `compute_dtype`). The model is unchanged."""
    n = len(arch.layers)
    device = next(model.parameters()).device
    sums = torch.zeros(n - span + 1, dtype=torch.float64)
    count = 0
    states: list[torch.Tensor] = []

    def before(module, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).detach().float())

    def after(module, args, out):
        states.append((out[0] if isinstance(out, tuple) else out).detach().float())

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in arch.layers]
    handles.append(arch.layers[-1].register_forward_hook(after))
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    try:
        with torch.no_grad(), autocast:
            for s in range(0, samples.shape[0], batch):
                states.clear()
                model(input_ids=samples[s:s + batch].to(device), use_cache=False)
                for start in range(n - span + 1):
                    cos = nn.functional.cosine_similarity(states[start], states[start + span], dim=-1)
                    sums[start] += (torch.arccos(cos.clamp(-1, 1)) / math.pi).double().sum()
                count += states[0].shape[0] * states[0].shape[1]
    finally:
        for h in handles:
            h.remove()
        states.clear()
    return (sums / max(count, 1)).tolist()


def drop_layers(model, arch: Architecture, drop: list[int]) -> None:
    """Remove the decoder layers `drop` from the model and its config, renumbering the rest (their
    key/value cache slots) and keeping `layer_types` (sliding/full attention per layer) aligned."""
    parent_path, _, attr = arch.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    kept = [i for i in range(len(arch.layers)) if i not in set(drop)]
    layers = [arch.layers[i] for i in kept]
    for new, layer in enumerate(layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new
    setattr(parent, attr, nn.ModuleList(layers))
    cfg = text_config(model.config)
    types = getattr(cfg, "layer_types", None)
    cfg.num_hidden_layers = len(kept)
    if types is not None:
        cfg.layer_types = [types[i] for i in kept]
