"""What structured pruning removes, as data (a recipe's `structured` field), and the sizes it leaves.

Counts are uniform across layers: transformers' configs and llama.cpp's GGUF metadata hold one
intermediate size and one head count per model, so every remaining layer keeps the same number of
MLP channels and query heads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import SizewiseError


def parse_fraction(value) -> float:
    """"10%", "0.1" or 0.1 -> 0.1; a one-line error for anything else or outside [0, 1]."""
    try:
        text = str(value).strip()
        f = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise SizewiseError(f"expected a fraction such as 10% or 0.1, got {value!r}") from None
    if not 0 <= f <= 1:
        raise SizewiseError(f"a fraction must lie between 0% and 100%, got {value!r}")
    return f


@dataclass(frozen=True)
class Sizes:
    """A decoder's sizes before or after structured pruning."""

    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


def text_config(config):
    """The decoder's own config (a multimodal config holds it inside)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def sizes_of(config) -> Sizes:
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    return Sizes(cfg.num_hidden_layers, cfg.intermediate_size, heads,
                 getattr(cfg, "num_key_value_heads", None) or heads,
                 getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


@dataclass(frozen=True)
class StructuredConfig:
    """Remove `drop_layers` whole decoder layers, the fraction `prune_mlp` of every remaining layer's
    MLP channels (the kept count rounded to a multiple of `align`, so quantization groups and ggml
    blocks still tile the down projection's rows), and `prune_heads` query heads per layer (the same
    number from each key/value group). `damp`: ridge damping of the least-squares refits, a fraction
    of the Gram's mean diagonal."""

    drop_layers: int = 0
    prune_mlp: float = 0.0
    prune_heads: int = 0
    align: int = 64
    damp: float = 0.01

    @property
    def active(self) -> bool:
        return bool(self.drop_layers or self.prune_mlp or self.prune_heads)

    def check(self) -> "StructuredConfig":
        """What holds for any model: typed, non-negative counts, a fraction below 100%."""
        ints = (self.drop_layers, self.prune_heads, self.align)
        if any(not isinstance(v, int) or isinstance(v, bool) for v in ints) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.prune_mlp, self.damp)):
            raise SizewiseError("structured pruning: layer and head counts and the alignment are integers, "
                                "the MLP fraction and damping numbers")
        if min(self.drop_layers, self.prune_heads) < 0 or self.align < 1 or self.damp < 0:
            raise SizewiseError("layer and head counts must be >= 0, the alignment >= 1 and damping >= 0")
        if not 0 <= self.prune_mlp < 1:
            raise SizewiseError(f"--prune-mlp {self.prune_mlp:.0%} would remove every MLP channel; "
                                "choose less than 100%")
        return self

    def target(self, config) -> tuple[Sizes, Sizes]:
        """(sizes now, sizes after); a one-line error for a request the model cannot meet."""
        self.check()
        s = sizes_of(config)
        if self.drop_layers >= s.layers:
            raise SizewiseError(f"cannot drop {self.drop_layers} of the model's {s.layers} decoder layers: "
                                "at least one must remain")
        inter = s.intermediate
        if self.prune_mlp:
            inter = round(s.intermediate * (1 - self.prune_mlp) / self.align) * self.align
            if inter <= 0 or inter >= s.intermediate:
                raise SizewiseError(
                    f"--prune-mlp {self.prune_mlp:.1%} of {s.intermediate} MLP channels, kept in multiples of "
                    f"{self.align}, would keep {max(inter, 0)}: choose a fraction that removes at least "
                    f"{self.align} channels and keeps at least {self.align}")
        heads = s.heads - self.prune_heads
        group = s.heads // s.kv_heads
        if self.prune_heads and (self.prune_heads % s.kv_heads or heads < s.kv_heads):
            raise SizewiseError(
                f"--prune-heads {self.prune_heads}: the model's {s.heads} query heads share {s.kv_heads} "
                f"key/value groups of {group}; remove a multiple of {s.kv_heads} (the same number from every "
                f"group) below {s.heads}, leaving at least one per group")
        return s, Sizes(s.layers - self.drop_layers, inter, heads, s.kv_heads, s.head_dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StructuredConfig":
        if not isinstance(d, dict) or set(d) - {f.name for f in fields(cls)}:
            raise SizewiseError(f"not a structured-pruning config: {d!r}")
        return cls(**d)
