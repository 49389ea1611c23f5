"""What a model family is, as data: the things generic discovery (`arch.discover`) cannot infer.

A `Family` names the transformers `model_type`s it covers and, for each feature that needs
per-family knowledge, either that knowledge or the one-line reason sizewise refuses:

- AWQ: `folds`, the places a per-channel scale folds into (by module names relative to a decoder layer);
- rotation: `rotation_writers`, the linears whose outputs are added to the residual stream
  (empty: not supported, `no_rotation` says why);
- GGUF: `gguf`, llama.cpp's architecture, tensor names and metadata (None: not supported yet);
- structured pruning: `prunable`, the modules whose MLP channels and attention heads can be removed
  (None: not supported);
- quirks the rest of the code asks about (`bos`).

This module depends on nothing above `errors`, so that `quant/` and `export/` can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Fold:
    """One place a per-channel scale can be folded, by module names relative to a decoder layer.

    `group` must list *every* linear that reads `prev`'s output (all must exist for the rule to apply).
    kind "norm": `prev` is a norm; its gain (weight, or 1 + weight for Gemma) and bias are divided by s.
    kind "linear": `prev` is a linear whose *last* output rows feed the group (all rows for v_proj and
    up_proj; the v part of a fused qkv, the up part of a fused gate_up); those rows and biases are divided.
    kind "none": the group has no foldable predecessor; `why` is reported.
    `heads`: the group is an attention output projection, whose inputs repeat v's heads under GQA;
    the scales are tied across each repeat so they fold into v's rows.
    """

    prev: str | None
    group: tuple[str, ...]
    kind: str = "norm"
    heads: bool = False
    unless: str | None = None      # rule does not apply when the layer has this submodule
    requires: str | None = None    # rule applies only if this layer attribute is not False
    why: str = ""


@dataclass(frozen=True)
class GGUFArch:
    """How a family's transformers checkpoint becomes a llama.cpp GGUF file.

    `arch`/`model_arch`: llama.cpp's architecture (the file's `general.architecture`, gguf's tensor-name
    tables). `top_tensors`, `layers` + `layer_tensors`, `output`: the transformers names a complete model
    has (the output head only when untied). `check_config(config, layout)` raises a one-line
    SizewiseError for a config llama.cpp's arch cannot run; `add_metadata(writer, config)` writes the
    architecture keys; `rope_heads(config)` maps the projections (module name relative to a decoder
    layer) whose rows llama.cpp's converter permutes for rope to their head counts.
    """

    arch: str
    model_arch: Any                                   # gguf.MODEL_ARCH member
    layer_tensors: tuple[str, ...]
    check_config: Callable[[Any, "GGUFArch"], None]
    add_metadata: Callable[[Any, Any], None]
    top_tensors: tuple[str, ...] = ("model.embed_tokens.weight", "model.norm.weight")
    layers: str = "model.layers"
    output: str = "lm_head.weight"
    rope_heads: Callable[[Any], dict[str, int]] = lambda config: {}
    norm_shift: float = 0.0
    extra_tensors: Callable[[Any], dict[str, list[float]]] = lambda config: {}
    tokenizer_pre: Callable[[dict], str | None] = lambda tokenizer_json: None
    config_from_gguf: Callable[[dict, Callable[[str], Any]], dict] = lambda meta, tensor: {}


@dataclass(frozen=True)
class Prunable:
    """Where structured pruning removes whole units, by module names relative to a decoder layer.

    MLP channels are rows of every `mlp_in` linear and columns of `mlp_out`; attention heads are rows
    of `q` and columns of `o` (key/value heads are kept, so the same number of query heads leaves each
    key/value group). The config keys `intermediate_size`, `num_attention_heads`, `head_dim` and
    `num_hidden_layers` (and `layer_types` when present) are rewritten to the new sizes.
    """

    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str = "mlp.down_proj"
    attention: str = "self_attn"
    q: str = "self_attn.q_proj"
    o: str = "self_attn.o_proj"


@dataclass(frozen=True)
class Family:
    """One model family: what sizewise knows about it beyond generic discovery."""

    name: str                                  # registry key and module name, e.g. "llama"
    label: str                                 # how user-facing text names it, e.g. "Llama"
    model_types: tuple[str, ...]               # transformers config.model_type values it covers
    model_type_prefixes: tuple[str, ...] = ()  # and those starting with one of these (exact names win)
    folds: tuple[Fold, ...] = ()               # AWQ fold rules; the first rule covering a linear wins
    no_awq: str = ""                           # why AWQ refuses, when `folds` is empty
    rotation_writers: tuple[str, ...] = ()     # residual-stream writers; empty: rotation unsupported
    no_rotation: str = ""                      # why rotation refuses (may be empty: no reason known)
    gguf: GGUFArch | None = None             # None: GGUF export does not support it yet
    prunable: Prunable | None = None           # structured pruning's modules; None: not supported
    bos: bool = False                          # evaluation prepends BOS even if the tokenizer adds none
    known: bool = True                         # False only for the generic family of unknown model types

    @property
    def rotates(self) -> bool:
        return bool(self.rotation_writers)

    @property
    def covers(self) -> tuple[str, ...]:
        """Its model types, and its prefixes written "gemma*", for user-facing lists."""
        return self.model_types + tuple(f"{p}*" for p in self.model_type_prefixes)
