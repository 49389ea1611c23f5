"""What is stored for a compressed weight, exactly: the formats and the tensors that hold them.

Bits per weight is always computed from these declarations (never estimated), and the artifact
stores exactly the tensors a `QuantizedTensor` holds, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import SizewiseError

DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantFormat:
    """Uniform integer grid with one scale (and zero) per group of consecutive input columns.

    - `group_size=None` means one group per output row (per-channel).
    - symmetric: code q in [0, 2^b), weight = scale * (q - 2^(b-1)); no zero is stored.
    - asymmetric, `zero="int"`: weight = scale * (q - z), z a b-bit integer per group (GPTQ style).
    - asymmetric, `zero="float16"`: weight = scale * q + m, m a float16 per group (ggml Q4_1 style).
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = False
    scale_dtype: str = "float16"
    zero: str = "int"

    def __post_init__(self):
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise SizewiseError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise SizewiseError(f"group size must be positive, got {self.group_size}")
        if self.scale_dtype not in DTYPE_BITS:
            raise SizewiseError(f"scale dtype must be one of {sorted(DTYPE_BITS)}, got {self.scale_dtype!r}")
        if self.zero not in ("int", "float16"):
            raise SizewiseError(f"zero must be 'int' or 'float16', got {self.zero!r}")

    kind = "quant"

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def check(self, in_features: int, name: str = "layer") -> None:
        """Raise a one-line error if the group size does not tile this layer's input dimension."""
        g = self.group_len(in_features)
        if in_features % g:
            ok = [d for d in range(8, in_features, 8) if in_features % d == 0]
            raise SizewiseError(
                f"group size {g} does not divide the input dimension {in_features} of {name}; "
                f"sizes that do: {', '.join(map(str, ok))} (or per-channel)")

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """Every bit stored for one [out, in] weight: codes, scales, zeros."""
        self.check(in_features)
        groups = out_features * (in_features // self.group_len(in_features))
        per_group = DTYPE_BITS[self.scale_dtype]
        if not self.symmetric:
            per_group += self.bits if self.zero == "int" else 16
        return out_features * in_features * self.bits + groups * per_group

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class FloatFormat:
    """A weight kept in floating point (not quantized)."""

    dtype: str = "float16"
    kind = "float"

    def __post_init__(self):
        if self.dtype not in DTYPE_BITS:
            raise SizewiseError(f"float dtype must be one of {sorted(DTYPE_BITS)}, got {self.dtype!r}")

    def check(self, in_features: int, name: str = "layer") -> None:
        return None

    def stored_bits(self, out_features: int, in_features: int) -> int:
        return out_features * in_features * DTYPE_BITS[self.dtype]

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


Format = QuantFormat | FloatFormat   # and llama.cpp's kquant.KQuantFormat and codebook.CodebookFormat (IQ4_NL)


def format_from_dict(d: dict) -> Format:
    d = dict(d)
    kind = d.pop("kind")
    if kind == "quant":
        return QuantFormat(**d)
    if kind == "float":
        return FloatFormat(**d)
    if kind == "kquant":
        from .kquant import KQuantFormat  # kquant imports this module

        return KQuantFormat(**d)
    if kind == "codebook":
        from .codebook import CodebookFormat

        return CodebookFormat(**d)
    raise SizewiseError(f"unknown format kind {kind!r}")


@dataclass
class QuantizedTensor:
    """A quantized [out, in] weight: codes in original column order, per-group scales and zeros."""

    fmt: QuantFormat
    codes: torch.Tensor            # uint8 [out, in]
    scales: torch.Tensor           # fmt.scale_dtype [out, groups]
    zeros: torch.Tensor | None     # uint8 (int zero) or float16 [out, groups]; None if symmetric

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def stored_bits(self) -> int:
        return self.fmt.stored_bits(*self.shape)

    def dequantize(self) -> torch.Tensor:
        from .grid import decode  # grid math lives in one place

        g = self.fmt.group_len(self.shape[1])
        scale = self.scales.float().repeat_interleave(g, dim=1)
        zero = None if self.zeros is None else self.zeros.float().repeat_interleave(g, dim=1)
        return decode(self.codes, scale, zero, self.fmt)


def label(fmt: Format) -> str:
    """Short human-readable name, e.g. 'int4 g64 asym', 'Q4_K' or 'float16'."""
    if isinstance(fmt, FloatFormat):
        return fmt.dtype
    if fmt.kind in ("kquant", "codebook"):
        return fmt.type_name
    group = "per-channel" if fmt.group_size is None else f"g{fmt.group_size}"
    kind = "sym" if fmt.symmetric else ("asym" if fmt.zero == "int" else "asym-fmin")
    scale = "" if fmt.scale_dtype == "float16" else f" s:{fmt.scale_dtype}"
    return f"int{fmt.bits} {group} {kind}{scale}"
