"""llama.cpp's IQ4_NL as a format: 4-bit codes into a fixed non-uniform table, one float16 scale per 32.

A weight is worth d * IQ4_NL_LEVELS[code], d the float16 scale of its 32-weight block. The levels are
denser near zero than a uniform grid's, where most weights of a trained layer lie, so at Q4_0's size
(4.5 bits per weight) a block's squared error is about half of Q4_0's on SmolLM2's layers. It takes
rows of any multiple of 32 weights, so unlike the k-quants it fits 576-wide layers.

`CodebookFormat` says the layout, `codebook_fit` chooses each block's scale (weighted by an optional
per-input-channel importance, like llama.cpp's imatrix), `codebook_encode` rounds weights to the
nearest level. The ggml bytes are GGUF's business: `export/gguf_types.py` packs and unpacks them.
The value is float32 d (a float16) times a small integer, exact, as gguf's numpy dequantizer computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SizewiseError

BLOCK = 32
# ggml's kvalues_iq4nl, ascending
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_F16_MAX = 65504.0
_CODEBOOKS = {"IQ4_NL": IQ4_NL_LEVELS}


@dataclass(frozen=True)
class CodebookFormat:
    """One ggml block per 32 weights of a row: d float16 | qs[16]: low nibble c[i], high nibble c[i+16]
    (Q4_0's layout), 18 bytes; code c is worth d * levels[c]."""

    type_name: str = "IQ4_NL"
    kind = "codebook"

    def __post_init__(self):
        if self.type_name not in _CODEBOOKS:
            raise SizewiseError(f"unknown codebook type {self.type_name!r}; known: {', '.join(_CODEBOOKS)}")

    @property
    def levels(self) -> torch.Tensor:
        return torch.tensor(_CODEBOOKS[self.type_name], dtype=torch.float32)

    @property
    def bits(self) -> int:
        return 4

    @property
    def block_bytes(self) -> int:
        return 2 + BLOCK * self.bits // 8

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

    def to_dict(self) -> dict:
        return {"kind": self.kind, "type_name": self.type_name}


@dataclass
class CodebookTensor:
    """An [out, in] weight: d float16 [out, in/32] and uint8 codes [out, in] in [0, 16)."""

    fmt: CodebookFormat
    d: torch.Tensor
    codes: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def stored_bits(self) -> int:
        return self.fmt.stored_bits(*self.shape)

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
    """Each block's float16 d for an [out, in] weight, least squared error weighted by `importance`
    (one non-negative value per input channel; None: plain MSE), in the manner of llama.cpp's
    IQ4_NL search: the largest-magnitude weight is mapped near each end of the table in turn
    (`steps` level offsets either way), codes are assigned, d is refitted by weighted least squares,
    and the candidate explaining the most weighted energy wins. Returns float16 [out, in/32]."""
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


def codebook_rtn(w: torch.Tensor, fmt: CodebookFormat, importance: torch.Tensor | None = None,
                 name: str = "layer") -> CodebookTensor:
    """Fit each block's scale, then round every weight to its nearest level."""
    d = codebook_fit(w, fmt, importance, name=name)
    return CodebookTensor(fmt, d, codebook_encode(w.float(), per_weight_scale(d).to(w.device), fmt))
