"""llama.cpp's k-quants as a format: two-level grids over 256-weight super-blocks, fitted and rounded.

Q2_K .. Q6_K cut each 256-weight super-block of a row into 16- or 32-weight sub-blocks; a sub-block's
scale (and min) is a small integer times the super-block's float16 `d` (and `dmin`). `KQuantFormat`
says the widths, `KQuantGrid` holds the stored parameters, `kquant_fit` chooses them (weighted by an
optional per-input-channel importance, like llama.cpp's imatrix), `kquant_encode` rounds weights
against them. The ggml byte layout is `ggml_layout.py`'s; the format packs and unpacks its blocks.

A weight's value is defined once, by `grid.decode` over the *effective* scale and zero of its
sub-block (`KQuantGrid.effective`): the float32 products `d*ls` and `-(dmin*lm)`, exact because an
fp16 times a <=8-bit integer fits float32's 24-bit mantissa. That is the arithmetic of gguf's
numpy dequantizer, in the same order, so the ggml bytes decode to our values bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import SizewiseError
from .formats import FixedGrid, GGMLBlocks, StoredTensor
from .ggml_layout import SUPER, kquant_blocks, kquant_unblocks
from .grid import decode, encode
from .kquant_fit import _fit_blocks
from .uniform import QuantFormat


@dataclass(frozen=True)
class _KSpec:
    bits: int        # width of a weight's code
    sub: int         # weights per sub-block: one integer scale (and min) each
    symmetric: bool  # (d*ls)*(c - 2^(bits-1)) with signed ls; else (d*ls)*c - dmin*lm
    lbits: int       # width of the integer sub-block scale (and min)


_KSPECS = {
    "Q2_K": _KSpec(2, 16, False, 4),
    "Q3_K": _KSpec(3, 16, True, 6),
    "Q4_K": _KSpec(4, 32, False, 6),
    "Q5_K": _KSpec(5, 32, False, 6),
    "Q6_K": _KSpec(6, 16, True, 8),
}
KQUANT_TYPES = tuple(_KSPECS)


@dataclass(frozen=True)
class KQuantFormat(GGMLBlocks):
    """A llama.cpp k-quant. One 256-weight super-block (ggml's block_qN_K, little-endian):

      Q2_K  84 B: scales[16]: low nibble ls, high nibble lm | qs[64]: 2-bit codes | d f16 | dmin f16
      Q3_K 110 B: hmask[32]: bit 2 of codes | qs[64]: bits 0-1 | scales[12]: 16 x 6-bit (ls + 32) | d f16
      Q4_K 144 B: d f16 | dmin f16 | scales[12]: 8 x 6-bit ls, 8 x 6-bit lm | qs[128]: 4-bit codes
      Q5_K 176 B: d f16 | dmin f16 | scales[12] as Q4_K | qh[32]: bit 4 of codes | qs[128]: bits 0-3
      Q6_K 210 B: ql[128]: bits 0-3 | qh[64]: bits 4-5 | scales[16]: int8 ls | d f16

    Code c of sub-block j is worth (d*ls_j)*c - dmin*lm_j (Q2/Q4/Q5_K, ls and lm unsigned) or
    (d*ls_j)*(c - 2^(bits-1)) (Q3/Q6_K, ls signed). The exact bit positions are in
    `ggml_layout.py`; the sizes here follow from the widths and the tests check them against gguf's.
    """

    type_name: str
    kind: ClassVar[str] = "kquant"

    def __post_init__(self):
        if self.type_name not in _KSPECS:
            raise SizewiseError(f"unknown k-quant {self.type_name!r}; known: {', '.join(_KSPECS)}")

    @property
    def spec(self) -> _KSpec:
        return _KSPECS[self.type_name]

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def sub_size(self) -> int:
        return self.spec.sub

    @property
    def symmetric(self) -> bool:
        return self.spec.symmetric

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def ls_range(self) -> tuple[int, int]:
        """Range of the integer sub-block scale ls (signed for the symmetric types, never 0)."""
        k = self.spec.lbits
        return (-(1 << (k - 1)), (1 << (k - 1)) - 1) if self.symmetric else (1, (1 << k) - 1)

    @property
    def block_bytes(self) -> int:
        """One super-block: 256 codes, an integer scale (and min) per sub-block, d (and dmin) in float16."""
        params = 1 if self.symmetric else 2
        return (SUPER * self.bits + SUPER // self.sub_size * self.spec.lbits * params + 16 * params) // 8

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / SUPER

    def check(self, in_features: int, name: str = "layer") -> None:
        if in_features % SUPER:
            raise SizewiseError(
                f"{self.type_name} needs an input dimension that is a multiple of {SUPER}; {name} has "
                f"{in_features} (use a 32-weight type such as Q4_0/Q4_1/Q8_0 for it)")

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """Every bit of the ggml blocks: codes, sub-block scales/mins, d and dmin."""
        self.check(in_features)
        return out_features * (in_features // SUPER) * self.block_bytes * 8

    @property
    def label(self) -> str:
        return self.type_name

    @property
    def group_label(self) -> str:
        return f"{self.sub_size}/{SUPER}"      # sub-blocks of a 256-weight super-block

    @property
    def ggml_type(self) -> str:
        return self.type_name

    @classmethod
    def ggml_formats(cls) -> tuple["KQuantFormat", ...]:
        return tuple(cls(t) for t in KQUANT_TYPES)

    def ggml_blocks(self, kt: "KQuantTensor") -> np.ndarray:
        """The ggml blocks of a k-quant weight: uint8 [out, in/256 * block bytes]."""
        g = kt.grid
        out, inp = kt.shape
        self.check(inp)
        J = SUPER // self.sub_size
        codes = kt.codes.detach().cpu().numpy().astype(np.uint8).reshape(-1, SUPER)
        if int(codes.max(initial=0)) > self.qmax:
            raise SizewiseError(f"a code exceeds {self.qmax} for {self.type_name}")
        ls = g.scales.detach().cpu().numpy().astype(np.int16).reshape(-1, J)
        lo, hi = self.ls_range
        lo = lo if self.symmetric else 0  # a file may hold ls = 0 (it decodes to zeros); we never write one
        if ls.min() < lo or ls.max() > hi:
            raise SizewiseError(f"a sub-block scale is outside {self.type_name}'s range [{lo}, {hi}]")
        lm = None
        if not self.symmetric:
            lm = g.mins.detach().cpu().numpy().astype(np.int16).reshape(-1, J)
            if lm.min() < 0 or lm.max() > hi:
                raise SizewiseError(f"a sub-block min is outside {self.type_name}'s range [0, {hi}]")
            ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
        blocks = kquant_blocks(codes, g.d.reshape(-1), None if g.dmin is None else g.dmin.reshape(-1), ls, lm,
                               self.type_name)
        assert blocks.shape[1] == self.block_bytes
        return blocks.reshape(out, -1)

    def from_ggml_blocks(self, data: np.ndarray, shape: tuple[int, int]) -> "KQuantTensor":
        """Inverse of `ggml_blocks`: the grid and codes of an [out, in] weight from its blocks
        (uint8, any shape holding them in row order). Packing the result gives back `data` byte for byte."""
        out, inp = shape
        self.check(inp)
        nb, J = out * inp // SUPER, SUPER // self.sub_size
        if data.dtype != np.uint8 or data.size != nb * self.block_bytes:
            raise SizewiseError(f"{data.size} {data.dtype} values are not the {nb * self.block_bytes} bytes of an "
                                f"{out}x{inp} {self.type_name} weight")
        codes, d, dmin, ls, lm = kquant_unblocks(np.ascontiguousarray(data).reshape(nb, self.block_bytes),
                                                 self.type_name)
        sup = inp // SUPER
        grid = KQuantGrid(
            self,
            d=d.reshape(out, sup),
            dmin=None if dmin is None else dmin.reshape(out, sup),
            scales=torch.from_numpy(ls.astype(np.int16)).reshape(out, sup * J),
            mins=None if lm is None else torch.from_numpy(lm.astype(np.int16)).reshape(out, sup * J),
        )
        return KQuantTensor(grid, torch.from_numpy(codes.astype(np.uint8)).reshape(out, inp))

    def round(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> "KQuantTensor":
        """`kquant_fit` already searches each block's scale (and min) for the least squared error, as
        llama.cpp's make_qkx2_quants / make_qx_quants do: a clip search (`round_mse`) would repeat it."""
        return kquant_rtn(w, self, importance)

    def fixed_grid(self, w: torch.Tensor, importance: torch.Tensor | None) -> FixedGrid:
        grid = kquant_fit(w, self, importance=importance)
        scale, zero = grid.per_weight()
        sf = surrogate_format(self)
        return FixedGrid(scale, zero, lambda x, s, z: encode(x, s, z, sf), lambda c, s, z: decode(c, s, z, sf),
                         lambda codes: KQuantTensor(grid, codes))


def surrogate_format(fmt: KQuantFormat) -> QuantFormat:
    """The QuantFormat whose `grid.encode/decode` arithmetic is the k-quant's, given effective
    scale/zero from `KQuantGrid.effective()`: symmetric scale*(q - 2^(b-1)), else scale*q + zero."""
    if fmt.symmetric:
        return QuantFormat(fmt.bits, symmetric=True)
    return QuantFormat(fmt.bits, zero="float16")


@dataclass
class KQuantGrid:
    """The stored two-level parameters of an [out, in] k-quant weight (everything but the codes).

    d, dmin: float16 [out, in/256], one per super-block (dmin None for symmetric types).
    scales:  int16 [out, in/sub], the integer sub-block scale ls: Q2_K 1..15, Q4_K/Q5_K 1..63,
             Q3_K -32..31, Q6_K -128..127 (a fit never gives 0, so its effective scale never
             is 0; a grid read from a file may hold 0).
    mins:    int16 [out, in/sub], the integer sub-block min lm (0..15 / 0..63), None if symmetric.
    """

    fmt: KQuantFormat
    d: torch.Tensor
    dmin: torch.Tensor | None
    scales: torch.Tensor
    mins: torch.Tensor | None

    @property
    def per_super(self) -> int:
        return SUPER // self.fmt.sub_size

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float32 scale and zero per sub-block [out, in/sub], exactly as the ggml bytes decode:
        value = scale*(q - 2^(b-1)) (symmetric) or scale*q + zero (zero = -(dmin*lm))."""
        k = self.per_super
        scale = self.d.float().repeat_interleave(k, dim=1) * self.scales.float()
        if self.fmt.symmetric:
            return scale, None
        return scale, -(self.dmin.float().repeat_interleave(k, dim=1) * self.mins.float())

    def per_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`effective()` repeated over each sub-block's columns: [out, in], for column-wise
        quantizers (GPTQ) that round against this fixed grid with grid.encode(surrogate_format)."""
        scale, zero = self.effective()
        n = self.fmt.sub_size
        return scale.repeat_interleave(n, dim=1), None if zero is None else zero.repeat_interleave(n, dim=1)


@dataclass
class KQuantTensor(StoredTensor):
    """A k-quant weight: its grid and uint8 codes [out, in] in [0, 2^bits), original column order."""

    grid: KQuantGrid
    codes: torch.Tensor

    @property
    def fmt(self) -> KQuantFormat:
        return self.grid.fmt

    def dequantize(self) -> torch.Tensor:
        return kquant_decode(self.codes, self.grid)


def kquant_decode(codes: torch.Tensor, grid: KQuantGrid) -> torch.Tensor:
    """Float32 value of each code: grid.decode's arithmetic over the effective per-weight grid."""
    scale, zero = grid.per_weight()
    return decode(codes.to(scale.device), scale, zero, surrogate_format(grid.fmt))


def kquant_encode(w: torch.Tensor, grid: KQuantGrid) -> torch.Tensor:
    """Nearest code for each weight of [out, in] `w` against a fixed grid: uint8 [out, in]."""
    scale, zero = grid.per_weight()
    return encode(w.float().to(scale.device), scale, zero, surrogate_format(grid.fmt))


def kquant_fit(w: torch.Tensor, fmt: KQuantFormat, importance: torch.Tensor | None = None,
               *, rounds: int = 2, name: str = "layer") -> KQuantGrid:
    """Choose d, dmin, ls, lm for an [out, in] weight, minimising the squared error weighted by
    `importance` (one non-negative value per input channel, like llama.cpp's imatrix: the mean
    squared activation of that channel); None weighs every weight equally (plain MSE).

    Rows are independent and super-blocks too, so this runs on any device and any row slice."""
    fmt.check(w.shape[1], name)
    out, inp = w.shape
    L, J = fmt.sub_size, SUPER // fmt.sub_size
    x = w.float().reshape(-1, J, L)
    wt = None  # uniform
    if importance is not None:
        imp = importance.float().to(x.device).clamp_min(0)
        if imp.shape != (inp,):
            raise SizewiseError(f"importance must have one value per input channel ({inp}), got {tuple(imp.shape)}")
        imp = imp + 1e-8 * imp.mean().clamp_min(1e-30)  # an all-zero sub-block still gets a defined fit
        wt = imp.reshape(1, -1, J, L).expand(out, -1, -1, -1).reshape(-1, J, L)
    d, dmin, ls, lm = _fit_blocks(x, wt, fmt, rounds)
    sup = inp // SUPER
    return KQuantGrid(
        fmt,
        d=d.reshape(out, sup).to(torch.float16),
        dmin=None if dmin is None else dmin.reshape(out, sup).to(torch.float16),
        scales=ls.reshape(out, sup * J).to(torch.int16),
        mins=None if lm is None else lm.reshape(out, sup * J).to(torch.int16),
    )


def kquant_rtn(w: torch.Tensor, fmt: KQuantFormat, importance: torch.Tensor | None = None,
               *, rounds: int = 2, name: str = "layer") -> KQuantTensor:
    """Fit the two-level grid and round every weight to its nearest code on it."""
    grid = kquant_fit(w, fmt, importance, rounds=rounds, name=name)
    return KQuantTensor(grid, kquant_encode(w, grid))

