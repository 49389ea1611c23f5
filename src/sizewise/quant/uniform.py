"""Uniform integer grids: `QuantFormat`, its stored tensor, round-to-nearest, and its ggml blocks.

With group size 32 and float16 scales, a symmetric grid at 4, 5 or 8 bits *is* ggml's Q4_0 / Q5_0 /
Q8_0, and an asymmetric one with a float16 minimum at 4 or 5 bits is Q4_1 / Q5_1: the GGUF bytes
only move bits around (`ggml_layout.legacy_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import SizewiseError
from .formats import DTYPE_BITS, MAX_BITS, MIN_BITS, TORCH_DTYPES, Format, IntGrid, Part, StoredTensor
from .ggml_layout import QK, legacy_blocks
from .grid import _TINY, decode, encode, fit, grouped
from .refine import lsq_refit, mse_clip

_F16_MAX = 65504.0
# (bits, symmetric) -> the ggml type of 32-weight groups with float16 scales (and float16 mins)
_LEGACY_TYPES = {(8, True): "Q8_0", (4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1"}


@dataclass(frozen=True)
class QuantFormat(Format):
    """Uniform integer grid with one scale (and zero) per group of consecutive input columns.

    - `group_size=None` means one group per output row (per-channel).
    - symmetric: code q in [0, 2^b), weight = scale * (q - 2^(b-1)); no zero is stored.
    - asymmetric, `zero="int"`: weight = scale * (q - z), z a b-bit integer per group (GPTQ style).
    - asymmetric, `zero="float16"`: weight = scale * q + m, m a float16 per group (ggml Q4_1 style).

    Stored as `codes` (b-bit, bit-packed in an artifact), `scales` [out, groups] in `scale_dtype`
    and, if asymmetric, `zeros` [out, groups] (b-bit integers, or float16).
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = False
    scale_dtype: str = "float16"
    zero: str = "int"
    kind: ClassVar[str] = "quant"

    def __post_init__(self):
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise SizewiseError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise SizewiseError(f"group size must be positive, got {self.group_size}")
        if self.scale_dtype not in DTYPE_BITS:
            raise SizewiseError(f"scale dtype must be one of {sorted(DTYPE_BITS)}, got {self.scale_dtype!r}")
        if self.zero not in ("int", "float16"):
            raise SizewiseError(f"zero must be 'int' or 'float16', got {self.zero!r}")

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

    @property
    def label(self) -> str:
        group = "per-channel" if self.group_size is None else f"g{self.group_size}"
        kind = "sym" if self.symmetric else ("asym" if self.zero == "int" else "asym-fmin")
        scale = "" if self.scale_dtype == "float16" else f" s:{self.scale_dtype}"
        return f"int{self.bits} {group} {kind}{scale}"

    @property
    def group_label(self) -> str:
        return "channel" if self.group_size is None else str(self.group_size)

    @property
    def ggml_type(self) -> str | None:
        """An integer zero point has no exact ggml home (Q4_1 stores the offset -scale*z as a float16,
        which rounds it in general); bfloat16/float32 scales do not fit a float16 `d` either."""
        if self.group_size != QK or self.scale_dtype != "float16":
            return None
        if not self.symmetric and self.zero != "float16":
            return None
        return _LEGACY_TYPES.get((self.bits, self.symmetric))

    @classmethod
    def ggml_formats(cls) -> tuple["QuantFormat", ...]:
        return (*(cls(b, QK, symmetric=True) for b in (4, 5, 8)),
                *(cls(b, QK, symmetric=False, zero="float16") for b in (4, 5)))

    # --- stored tensors -----------------------------------------------------------------------

    def parts(self, out_features: int, in_features: int) -> tuple[Part, ...]:
        self.check(in_features)
        groups = (out_features, in_features // self.group_len(in_features))
        out = [Part("codes", (out_features, in_features), "uint8", code_bits=self.bits),
               Part("scales", groups, self.scale_dtype)]
        if not self.symmetric:
            out.append(Part("zeros", groups, "uint8", code_bits=self.bits) if self.zero == "int"
                       else Part("zeros", groups, "float16"))
        return tuple(out)

    def to_parts(self, qt: "QuantizedTensor") -> dict[str, torch.Tensor]:
        out = {"codes": qt.codes.cpu().contiguous(), "scales": qt.scales.cpu().contiguous()}
        if qt.zeros is not None:
            out["zeros"] = qt.zeros.cpu().contiguous()
        return out

    def from_parts(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> "QuantizedTensor":
        out, inp = shape
        groups = (out, inp // self.group_len(inp))
        codes, scales = tensors["codes"].reshape(out, inp), tensors["scales"]
        zeros = None if self.symmetric else tensors["zeros"].reshape(groups)
        if tuple(scales.shape) != groups:
            raise SizewiseError(f"scales of shape {tuple(scales.shape)} do not fit a {out}x{inp} {self.label} weight")
        return QuantizedTensor(self, codes, scales, zeros)

    def ggml_blocks(self, qt: "QuantizedTensor") -> np.ndarray:
        """Our [out, in] codes and per-32 scales/mins as ggml blocks: uint8 [out, in/32 * block bytes]."""
        if self.ggml_type is None:
            raise SizewiseError(
                f"{self.label} has no exact GGUF type: the 32-weight types need group size 32, float16 scales and, "
                f"if asymmetric, a float16 min (zero='float16'), at 4, 5 or 8 bits (8: symmetric only)")
        out, _ = qt.shape
        codes = qt.codes.detach().cpu().numpy()
        return legacy_blocks(codes, qt.scales, None if self.symmetric else qt.zeros, self.bits).reshape(out, -1)

    def int_grid(self, qt: "QuantizedTensor") -> IntGrid | None:
        """Codes and integer zeros shifted by 2^(b-1) to signed int8 (the difference, hence the weight,
        is unchanged); a float16 minimum (Q4_1 style) is no integer zero point."""
        if not self.symmetric and self.zero != "int":
            return None
        mid = 1 << (self.bits - 1)
        codes = (qt.codes.to(torch.int16) - mid).to(torch.int8)
        zeros = None if self.symmetric else (qt.zeros.to(torch.int16) - mid).to(torch.int8)
        return IntGrid(self.bits, self.group_size, codes, qt.scales, zeros)

    # --- quantizers ---------------------------------------------------------------------------

    def round(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> "QuantizedTensor":
        return rtn(w, self)

    def round_mse(self, w: torch.Tensor) -> "QuantizedTensor":
        return rtn_refined(w, self)


@dataclass
class QuantizedTensor(StoredTensor):
    """A quantized [out, in] weight: codes in original column order, per-group scales and zeros."""

    fmt: QuantFormat
    codes: torch.Tensor            # uint8 [out, in]
    scales: torch.Tensor           # fmt.scale_dtype [out, groups]
    zeros: torch.Tensor | None     # uint8 (int zero) or float16 [out, groups]; None if symmetric

    def dequantize(self) -> torch.Tensor:
        g = self.fmt.group_len(self.shape[1])
        scale = self.scales.float().repeat_interleave(g, dim=1)
        zero = None if self.zeros is None else self.zeros.float().repeat_interleave(g, dim=1)
        return decode(self.codes, scale, zero, self.fmt)


def pack_tensor(codes: torch.Tensor, scale: torch.Tensor, zero, fmt: QuantFormat) -> QuantizedTensor:
    """Wrap codes and per-group scale/zero ([out, groups]) in their stored dtypes."""
    zeros = None
    if zero is not None:
        zeros = zero.to(torch.uint8) if fmt.zero == "int" else zero.to(torch.float16)
    return QuantizedTensor(fmt, codes, scale.to(TORCH_DTYPES[fmt.scale_dtype]), zeros)


def rtn(w: torch.Tensor, fmt: QuantFormat, clip: float | torch.Tensor = 1.0) -> QuantizedTensor:
    """Round-to-nearest: fit each group's grid to its own min/max, then round every weight."""
    wg = grouped(w.float(), fmt)
    scale, zero = fit(wg, fmt, clip)
    z = None if zero is None else zero[..., None]
    codes = encode(wg, scale[..., None], z, fmt).reshape(w.shape)
    return pack_tensor(codes, scale, zero, fmt)


def fit_ggml(w: torch.Tensor, fmt: QuantFormat):
    """ggml's own scale for its symmetric blocks (Q4_0/Q5_0 reference): the largest-magnitude weight of
    each group, *with its sign*, maps exactly to the extreme code -2^(b-1): d = max / -2^(b-1).

    The code range [-2^(b-1), 2^(b-1)-1] is lopsided; this gives the extra level to the side the
    largest weight is on, with a step of amax/2^(b-1) instead of grid.fit's 2*amax/(2^b - 1). The scale
    is negative when that weight is positive; `decode` does not care. Returns (scale, None) in float32,
    rounded to float16 like `grid.fit`. For asymmetric formats ggml's Q4_1/Q5_1 choice (min/max) is
    grid.fit's.
    """
    if not fmt.symmetric:
        raise SizewiseError("fit_ggml is for symmetric formats; ggml's asymmetric choice is grid.fit's")
    w = w.float()
    idx = w.abs().argmax(dim=-1, keepdim=True)
    signed_max = w.gather(-1, idx).squeeze(-1)
    scale = (signed_max / -(1 << (fmt.bits - 1))).clamp(-_F16_MAX, _F16_MAX).to(torch.float16).float()
    # never zero, like grid.fit: an all-zero group still decodes to 0 at the middle code
    scale = torch.where(scale == 0, torch.full_like(scale, _TINY), scale)
    return scale, None


def rtn_ggml(w: torch.Tensor, fmt: QuantFormat) -> QuantizedTensor:
    """Round-to-nearest with ggml's scale choice (`fit_ggml`) for symmetric formats, grid.rtn otherwise."""
    if not fmt.symmetric:
        return rtn(w, fmt)
    wg = grouped(w.float(), fmt)
    scale, _ = fit_ggml(wg, fmt)
    codes = encode(wg, scale[..., None], None, fmt).reshape(w.shape)
    return pack_tensor(codes, scale, None, fmt)


def rtn_refined(w: torch.Tensor, fmt: QuantFormat, weight: torch.Tensor | None = None, *,
                refit_iters: int = 0) -> QuantizedTensor:
    """Round-to-nearest on the grid whose per-group clip `mse_clip` chose.

    refit_iters > 0 additionally runs `lsq_refit` on that grid (worth it for float zeros).
    """
    wg = grouped(w.float(), fmt)
    scale, zero = fit(wg, fmt, mse_clip(w, fmt, weight=weight))
    if refit_iters:
        scale, zero = lsq_refit(w, fmt, scale, zero, weight=weight, iters=refit_iters)
    z = None if zero is None else zero[..., None]
    codes = encode(wg, scale[..., None], z, fmt).reshape(w.shape)
    return pack_tensor(codes, scale, zero, fmt)
