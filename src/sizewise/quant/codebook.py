"""llama.cpp's codebook types as formats: 4-bit codes into a fixed table of levels, one scale per 32.

IQ4_NL: a weight is worth d * IQ4_NL_LEVELS[code], d the float16 scale of its 32-weight block. The
levels are denser near zero than a uniform grid's, where most weights of a trained layer lie, so at
Q4_0's size (4.5 bits per weight) a block's squared error is about half of Q4_0's on SmolLM2's layers.
MXFP4 (OCP microscaling FP4): the levels are the E2M1 floats (doubled: 0, ±1, ±2, ±3, ±4, ±6, ±8,
±12) and the scale a power of two stored as one E8M0 byte, so a block costs 17 bytes, 4.25 bits per
weight, the smallest type llama.cpp has for rows that are not multiples of 256. Both take rows of
any multiple of 32 weights, so unlike the k-quants they fit 576-wide layers.

`CodebookFormat` says the layout, `codebook_fit` chooses each block's scale (weighted by an optional
per-input-channel importance, like llama.cpp's imatrix), `codebook_encode` rounds weights to the
nearest level; the format packs its ggml blocks (`ggml_layout.codebook_blocks`).
The value is float32 d (a float16, or a power of two) times a small integer, exact, as gguf's numpy
dequantizer computes it. Codes index the levels in ascending order; `ggml_codes` maps them to ggml's
nibbles (MXFP4's table is sign-magnitude).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import SizewiseError
from .formats import FixedGrid, GGMLBlocks, StoredTensor
from .ggml_layout import QK, codebook_blocks, codebook_unblocks, f16_bytes

BLOCK = QK
# ggml's kvalues_iq4nl, ascending
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# ggml's kvalues_mxfp4 (0, 1, 2, 3, 4, 6, 8, 12, then their negatives) in ascending order, -0 left out
MXFP4_LEVELS = (-12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12)
_MXFP4_NIBBLES = (15, 14, 13, 12, 11, 10, 9, 0, 1, 2, 3, 4, 5, 6, 7)
_F16_MAX = 65504.0
# type -> (levels, scale: "float16" or "e8m0" (2^(e-128), one byte), ggml nibble of each code)
_CODEBOOKS = {"IQ4_NL": (IQ4_NL_LEVELS, "float16", tuple(range(16))),
              "MXFP4": (MXFP4_LEVELS, "e8m0", _MXFP4_NIBBLES)}
E8M0_BIAS = 128          # ggml_e8m0_to_fp32_half: byte e is worth 2^(e - 128)


@dataclass(frozen=True)
class CodebookFormat(GGMLBlocks):
    """One ggml block per 32 weights of a row: the scale (float16 d, or MXFP4's E8M0 byte) | qs[16]:
    low nibble c[i], high nibble c[i+16] (Q4_0's layout), 18 or 17 bytes; code c is worth d * levels[c]."""

    type_name: str = "IQ4_NL"
    kind: ClassVar[str] = "codebook"

    def __post_init__(self):
        if self.type_name not in _CODEBOOKS:
            raise SizewiseError(f"unknown codebook type {self.type_name!r}; known: {', '.join(_CODEBOOKS)}")

    @property
    def levels(self) -> torch.Tensor:
        return torch.tensor(_CODEBOOKS[self.type_name][0], dtype=torch.float32)

    @property
    def scale(self) -> str:
        return _CODEBOOKS[self.type_name][1]

    @property
    def ggml_codes(self) -> tuple[int, ...]:
        return _CODEBOOKS[self.type_name][2]

    @property
    def bits(self) -> int:
        return 4

    @property
    def block_bytes(self) -> int:
        return (2 if self.scale == "float16" else 1) + BLOCK * self.bits // 8

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / BLOCK

    def check(self, in_features: int, name: str = "layer") -> None:
        if in_features % BLOCK:
            raise SizewiseError(f"{self.type_name} needs an input dimension that is a multiple of {BLOCK}; "
                                f"{name} has {in_features}")

    def stored_bits(self, out_features: int, in_features: int) -> int:
        self.check(in_features)
        return out_features * (in_features // BLOCK) * self.block_bytes * 8

    @property
    def label(self) -> str:
        return self.type_name

    @property
    def group_label(self) -> str:
        return str(BLOCK)

    @property
    def ggml_type(self) -> str:
        return self.type_name

    @classmethod
    def ggml_formats(cls) -> tuple["CodebookFormat", ...]:
        return tuple(cls(t) for t in _CODEBOOKS)

    def ggml_blocks(self, ct: "CodebookTensor") -> np.ndarray:
        """IQ4_NL / MXFP4 blocks of an [out, in] weight: d f16 (MXFP4: one E8M0 byte) | 16 bytes of
        nibbles (c[i], c[i+16]), as Q4_0; codes become ggml's nibbles (`ggml_codes`)."""
        out, inp = ct.shape
        self.check(inp)
        codes = ct.codes.detach().cpu().numpy().astype(np.uint8).reshape(-1, BLOCK)
        if int(codes.max(initial=0)) >= len(self.ggml_codes):
            raise SizewiseError(f"a code exceeds {len(self.ggml_codes) - 1} for {self.type_name}")
        codes = np.asarray(self.ggml_codes, dtype=np.uint8)[codes]
        if self.scale == "e8m0":
            mant, exp = np.frexp(ct.d.detach().cpu().numpy().astype(np.float32).reshape(-1, 1))
            e = exp.astype(np.int64) - 1 + E8M0_BIAS                       # d = 0.5 * 2^exp
            if not (np.all(mant == 0.5) and np.all((e >= 0) & (e <= 254))):
                raise SizewiseError(f"an {self.type_name} scale is not a power of two in E8M0's range")
            scale = e.astype(np.uint8)
        else:
            scale = f16_bytes(ct.d)
        blocks = codebook_blocks(codes, scale)
        assert blocks.shape[1] == self.block_bytes
        return blocks.reshape(out, -1)

    def from_ggml_blocks(self, data: np.ndarray, shape: tuple[int, int]) -> "CodebookTensor":
        """Inverse of `ggml_blocks`."""
        out, inp = shape
        self.check(inp)
        nb = out * inp // BLOCK
        if data.dtype != np.uint8 or data.size != nb * self.block_bytes:
            raise SizewiseError(f"{data.size} {data.dtype} values are not the {nb * self.block_bytes} bytes of an "
                                f"{out}x{inp} {self.type_name} weight")
        blocks = np.ascontiguousarray(data).reshape(nb, self.block_bytes)
        scale, nibbles = codebook_unblocks(blocks, 1 if self.scale == "e8m0" else 2)
        if self.scale == "e8m0":
            d = torch.from_numpy(np.ldexp(np.float32(1), scale.astype(np.int64) - E8M0_BIAS).astype(np.float32))
        else:
            d = torch.from_numpy(scale.copy().view("<f2").astype(np.float16))
        d = d.reshape(out, inp // BLOCK)
        ours = np.full(16, -1, dtype=np.int64)                  # ggml nibble -> our code (MXFP4's -0 reads as 0)
        for code, nib in enumerate(self.ggml_codes):
            ours[nib] = code
        if self.type_name == "MXFP4":
            ours[8] = self.ggml_codes.index(0)
        codes = ours[nibbles]
        if (codes < 0).any():
            raise SizewiseError(f"an {self.type_name} block holds a nibble with no level")
        return CodebookTensor(self, d, torch.from_numpy(codes.astype(np.uint8)).reshape(out, inp))

    def round(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> "CodebookTensor":
        """`codebook_fit` already searches each block's scale, as llama.cpp's IQ4_NL search does: a
        clip search (`round_mse`) would repeat it."""
        return codebook_rtn(w, self, importance)

    def fixed_grid(self, w: torch.Tensor, importance: torch.Tensor | None) -> FixedGrid:
        d = codebook_fit(w, self, importance=importance)
        return FixedGrid(per_weight_scale(d).to(w.device), None, lambda x, s, z: codebook_encode(x, s, self),
                         lambda c, s, z: codebook_decode(c, s, self), lambda codes: CodebookTensor(self, d, codes))


@dataclass
class CodebookTensor(StoredTensor):
    """An [out, in] weight: d [out, in/32] (float16; MXFP4: float32 powers of two) and uint8 codes
    [out, in], indices into the format's levels."""

    fmt: CodebookFormat
    d: torch.Tensor
    codes: torch.Tensor

    def per_weight(self) -> torch.Tensor:
        """The scale of every weight, float32 [out, in]."""
        return per_weight_scale(self.d)

    def dequantize(self) -> torch.Tensor:
        return codebook_decode(self.codes, self.per_weight(), self.fmt)


def per_weight_scale(d: torch.Tensor) -> torch.Tensor:
    return d.float().repeat_interleave(BLOCK, dim=-1)


def codebook_encode(x: torch.Tensor, scale: torch.Tensor, fmt: CodebookFormat) -> torch.Tensor:
    """Nearest level's code for x / scale, elementwise (scale broadcast to x; 0 maps to the level
    nearest 0). uint8."""
    levels = fmt.levels.to(x.device)
    mid = (levels[1:] + levels[:-1]) / 2
    v = torch.where(scale != 0, x / torch.where(scale != 0, scale, torch.ones_like(scale)), torch.zeros_like(x))
    return torch.bucketize(v.contiguous(), mid).to(torch.uint8)


def codebook_decode(codes: torch.Tensor, scale: torch.Tensor, fmt: CodebookFormat) -> torch.Tensor:
    return scale * fmt.levels.to(scale.device)[codes.to(scale.device).long()]


def codebook_fit(w: torch.Tensor, fmt: CodebookFormat, importance: torch.Tensor | None = None, *,
                 steps: int = 7, name: str = "layer") -> torch.Tensor:
    """Each block's d for an [out, in] weight, least squared error weighted by `importance`
    (one non-negative value per input channel; None: plain MSE), in the manner of llama.cpp's
    IQ4_NL search: the largest-magnitude weight is mapped near each end of the table in turn
    (`steps` level offsets either way), codes are assigned, d is refitted by weighted least squares,
    and the candidate explaining the most weighted energy wins. Returns float16 [out, in/32]; for
    an E8M0 scale (MXFP4) float32 powers of two, the best of the three around max|w| / 12."""
    fmt.check(w.shape[1], name)
    out, inp = w.shape
    x = w.float().reshape(out, inp // BLOCK, BLOCK)
    wt = None
    if importance is not None:
        imp = importance.float().to(x.device).clamp_min(0)
        if imp.shape != (inp,):
            raise SizewiseError(f"importance must have one value per input channel ({inp}), got {tuple(imp.shape)}")
        wt = (imp + 1e-8 * imp.mean().clamp_min(1e-30)).reshape(1, inp // BLOCK, BLOCK)
    levels = fmt.levels.to(x.device)
    if fmt.scale == "e8m0":
        return _power_of_two_fit(x, wt, fmt)
    mx = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)        # signed largest
    best_d = mx / levels[0]
    best_g = torch.full_like(mx, -1.0)
    for end in (float(levels[0]), float(levels[-1])):
        for k in range(-steps, steps + 1):
            d = mx / (end + k)
            q = levels[codebook_encode(x, d[..., None], fmt).long()]
            wq = q if wt is None else wt * q
            sqq, sxq = (wq * q).sum(-1), (wq * x).sum(-1)
            g = torch.where(sqq > 0, sxq * sxq / torch.where(sqq > 0, sqq, torch.ones_like(sqq)), torch.zeros_like(sqq))
            better = (sqq > 0) & (g > best_g)
            best_d = torch.where(better, sxq / torch.where(sqq > 0, sqq, torch.ones_like(sqq)), best_d)
            best_g = torch.where(better, g, best_g)
    return best_d.clamp(-_F16_MAX, _F16_MAX).to(torch.float16)


def _power_of_two_fit(x: torch.Tensor, wt: torch.Tensor | None, fmt: CodebookFormat) -> torch.Tensor:
    """Per block, the power of two d (an E8M0 byte's range) of least weighted squared error, among
    the one that just covers the largest weight with the top level and its two neighbours."""
    levels = fmt.levels.to(x.device)
    amax = x.abs().amax(-1)
    k0 = torch.ceil(torch.log2(amax.clamp_min(2.0 ** -140) / float(levels.abs().max())))
    best_d, best_e = None, None
    for k in (k0 - 1, k0, k0 + 1):
        d = torch.exp2(k.clamp(-E8M0_BIAS, 254 - E8M0_BIAS))
        err = x - d[..., None] * levels[codebook_encode(x, d[..., None], fmt).long()]
        e = ((err * err) if wt is None else wt * err * err).sum(-1)
        if best_d is None:
            best_d, best_e = d, e
        else:
            better = e < best_e
            best_d, best_e = torch.where(better, d, best_d), torch.where(better, e, best_e)
    return best_d


def codebook_rtn(w: torch.Tensor, fmt: CodebookFormat, importance: torch.Tensor | None = None,
                 name: str = "layer") -> CodebookTensor:
    """Fit each block's scale, then round every weight to its nearest level."""
    d = codebook_fit(w, fmt, importance, name=name)
    return CodebookTensor(fmt, d, codebook_encode(w.float(), per_weight_scale(d).to(w.device), fmt))
