"""Find a causal LM's decoder layers and their linear sub-modules, for any architecture.

One generic walk instead of a table per model family: the decoder stack is the ModuleList of
`num_hidden_layers` identical blocks, and the layers to compress are the nn.Linear (or GPT-2's
transposed Conv1D) modules inside each block. Embeddings and the output head come from the
standard transformers accessors. What discovery cannot infer per family (AWQ folds, rotation,
GGUF names) is data in `sizewise.families`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import families
from .errors import SizewiseError


@dataclass
class LinearRef:
    """A linear layer by its full dotted name; hides Conv1D's [in, out] weight layout."""

    name: str
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])

    def weight(self) -> torch.Tensor:
        """The weight as [out, in] float32 (a copy)."""
        w = self.module.weight.detach()
        return (w.t() if self.transposed else w).float().clone()

    def set_weight(self, w: torch.Tensor) -> None:
        """Replace the weight from an [out, in] tensor, keeping the module's dtype and layout."""
        p = self.module.weight
        w = (w.t() if self.transposed else w).to(p.dtype).contiguous()
        with torch.no_grad():
            p.copy_(w)


@dataclass
class Architecture:
    model_type: str
    layers: nn.ModuleList
    layers_path: str                 # dotted path of the decoder stack, e.g. "model.layers"
    linears: list[list[LinearRef]]   # per decoder layer
    embedding: str | None            # name of the input embedding weight
    lm_head: str | None              # name of the output head weight (None if tied and shared)
    tied: bool
    # token tables: the embedding and an untied head, name -> (rows, row length). Row-wise like a
    # linear weight [out, in], so every quantized format applies to them unchanged.
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)

    def all_linears(self) -> list[LinearRef]:
        return [ref for layer in self.linears for ref in layer]

    @property
    def head_table(self) -> str | None:
        """The token table that computes the logits (the untied head, or the embedding tied to it):
        unlike an input embedding it multiplies activations, so calibrated quantizers apply to it."""
        name = self.embedding if self.tied else self.lm_head
        return name if name in self.tables else None


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Conv1D))


def _num_layers(config) -> int | None:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, key, None)
        if isinstance(n, int):
            return n
    return None


def _param_name(model: nn.Module, param: nn.Parameter | None) -> str | None:
    if param is None:
        return None
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is param:
            return name
    return None


def discover(model: nn.Module) -> Architecture:
    """Locate the decoder stack, its linears, the embedding and the head; one-line error if not found."""
    kind = type(model).__name__
    n = _num_layers(model.config)
    stacks = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1]
    if n is not None:
        stacks = [(name, m) for name, m in stacks if len(m) == n]
    if not stacks:
        raise SizewiseError(
            f"unsupported architecture {kind}: found no stack of {n or 'N'} identical decoder blocks "
            f"(a torch ModuleList); sizewise supports {families.supported_text()}")
    # The decoder is the largest such stack (vision towers etc. are smaller).
    path, layers = max(stacks, key=lambda s: sum(p.numel() for p in s[1].parameters()))
    linears = [[LinearRef(f"{path}.{i}.{sub}", m) for sub, m in block.named_modules() if _is_linear(m)]
               for i, block in enumerate(layers)]
    if not linears[0]:
        raise SizewiseError(f"unsupported architecture {kind}: decoder blocks at {path} hold no linear layers")
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    emb_w = emb.weight if emb is not None else None
    head_w = head.weight if head is not None else None
    tied = emb_w is not None and head_w is not None and emb_w is head_w
    tables = {_param_name(model, w): tuple(w.shape) for w in ((emb_w,) if tied else (emb_w, head_w))
              if w is not None and w.dim() == 2}
    return Architecture(
        model_type=getattr(model.config, "model_type", kind),
        layers=layers,
        layers_path=path,
        linears=linears,
        embedding=_param_name(model, emb_w),
        lm_head=None if tied else _param_name(model, head_w),
        tied=tied,
        tables=tables,
    )
