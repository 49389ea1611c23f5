"""Sparse weights as a format: a mask plus the kept values in another format (float16 or a quant grid).

Two sparsity patterns, each keeping the same number of weights in every row (so the kept values are
an [out, kept] matrix):

- N:M ("2:4", "4:8"): N kept in every group of M consecutive input columns; the mask is stored as one
  index per group into the C(M, N) combinations, ⌈log2 C(M, N)⌉ bits (2:4: 3 bits per 4 weights).
- unstructured ("50%"): that fraction of each row pruned, anywhere; the mask is a bitmap, 1 bit per
  weight (at 50% its entropy is 1 bit as well: entropy coding it would not save anything; the
  lossless packer codes it as 1-bit codes anyway).

Stored parts: `mask`, then the kept format's parts with every per-weight part (shape [out, in]: codes,
or the float values) holding only the kept entries, row by row. Scales and zeros stay per group of
the original columns. GGUF has no sparse type: the weight is written dense, pruned entries as exact
zeros, in the kept format's ggml type where that type holds a zero exactly (F16/F32, the symmetric
Q4_0/Q5_0/Q8_0); other kept formats are refused.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch

from ..errors import SizewiseError
from .formats import Format, Part, dense
from .lowrank import LowRankFormat
from .uniform import QuantFormat, QuantizedTensor

_NM = re.compile(r"^(\d+):(\d+)$")
_PCT = re.compile(r"^(\d+(?:\.\d+)?)%$")


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: N:M (n kept of every m) or a pruned fraction of each row."""

    n: int = 0
    m: int = 0
    fraction: float = 0.0

    @property
    def nm(self) -> bool:
        return self.m > 0

    def kept(self, in_features: int) -> int:
        """Weights kept per row."""
        if self.nm:
            return in_features // self.m * self.n
        return in_features - round(in_features * self.fraction)

    def pruned_through(self, columns: int) -> int:
        """Weights of a row pruned among its first `columns` (unstructured: spread evenly over blocks)."""
        return round(columns * self.fraction)

    def mask_bits(self, out_features: int, in_features: int) -> int:
        if self.nm:
            return out_features * (in_features // self.m) * index_bits(self.n, self.m)
        return out_features * in_features


def parse_pattern(text: str) -> Pattern:
    """'2:4', '4:8' (N:M) or '50%' (unstructured); one-line error otherwise."""
    text = str(text).strip()
    if (g := _NM.match(text)):
        n, m = int(g[1]), int(g[2])
        if not 0 < n < m <= 16:
            raise SizewiseError(f"N:M sparsity needs 0 < N < M <= 16, got {text}")
        return Pattern(n=n, m=m)
    if (g := _PCT.match(text)):
        f = float(g[1]) / 100
        if not 0 < f < 1:
            raise SizewiseError(f"sparsity must be between 0% and 100%, got {text}")
        return Pattern(fraction=f)
    raise SizewiseError(f"sparsity {text!r} is neither N:M (2:4, 4:8) nor a percentage (50%)")


def index_bits(n: int, m: int) -> int:
    return max(1, math.ceil(math.log2(math.comb(m, n))))


@lru_cache(maxsize=None)
def _combinations(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool [C(m,n), m]: the kept positions of each index, int64 [2^m]: index of a kept-bitmask, -1 if none)."""
    combos = list(itertools.combinations(range(m), n))
    keep = torch.zeros(len(combos), m, dtype=torch.bool)
    lookup = torch.full((1 << m,), -1, dtype=torch.int64)
    for i, c in enumerate(combos):
        keep[i, list(c)] = True
        lookup[sum(1 << j for j in c)] = i
    return keep, lookup


def encode_nm(keep: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """keep bool [out, in] → uint8 indices [out, in/m] (one combination per group)."""
    out, inp = keep.shape
    bits = keep.reshape(out, inp // m, m).long() * (1 << torch.arange(m))
    idx = _combinations(n, m)[1][bits.sum(-1)]
    if bool((idx < 0).any()):
        raise SizewiseError(f"the mask does not keep exactly {n} of every {m} weights")
    return idx.to(torch.int16 if m > 8 else torch.uint8)


def decode_nm(idx: torch.Tensor, n: int, m: int) -> torch.Tensor:
    combos = _combinations(n, m)[0]
    idx = idx.long()
    if bool((idx >= len(combos)).any()):
        raise SizewiseError(f"a stored {n}:{m} mask index is out of range")
    return combos[idx].reshape(idx.shape[0], -1)


def per_weight(part: Part, out_features: int, in_features: int) -> bool:
    """A part with one value per weight (codes, float values): the one a mask thins out."""
    return part.shape == (out_features, in_features)


@dataclass(frozen=True)
class SparseFormat(Format):
    """A pruned weight: `pattern` ('2:4', '4:8', '50%') and the format of the kept values (`inner`)."""

    inner: Format
    pattern: str = "2:4"
    kind: ClassVar[str] = "sparse"

    def __post_init__(self):
        parse_pattern(self.pattern)
        if isinstance(self.inner, (SparseFormat, LowRankFormat)):
            raise SizewiseError("a sparse format keeps plain values (float or a grid), not another sparse or "
                                "low-rank format (put the factors outside: lowrank(sparse))")

    @property
    def spec(self) -> Pattern:
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "inner": self.inner.to_dict(), "pattern": self.pattern}

    @property
    def label(self) -> str:
        return f"{self.pattern} sparse {self.inner.label}"

    @property
    def group_label(self) -> str:
        return self.inner.group_label

    @property
    def bits(self) -> int:
        """Bits per kept value (its grid's, or the float dtype's)."""
        return self.inner.bits

    @property
    def compression(self) -> str:
        return "sparse"

    def check(self, in_features: int, name: str = "layer") -> None:
        self.inner.check(in_features, name)
        sp = self.spec
        if sp.nm and in_features % sp.m:
            raise SizewiseError(f"{self.pattern} sparsity needs the input dimension of {name} ({in_features}) "
                                f"to be a multiple of {sp.m}")
        if not any(per_weight(p, 2, in_features) for p in self.inner.parts(2, in_features)):
            raise SizewiseError(f"{self.inner.label} stores no value per weight (ggml blocks): it cannot hold "
                                "only the kept weights of a sparse layer")

    def stored_bits(self, out_features: int, in_features: int) -> int:
        self.check(in_features)
        sp = self.spec
        pruned = out_features * (in_features - sp.kept(in_features))
        dense = self.inner.stored_bits(out_features, in_features)
        per = sum(p.bits_per_value for p in self.inner.parts(out_features, in_features)
                  if per_weight(p, out_features, in_features))
        return dense - pruned * per + sp.mask_bits(out_features, in_features)

    def parts(self, out_features: int, in_features: int) -> tuple[Part, ...]:
        self.check(in_features)
        sp = self.spec
        mask = (Part("mask", (out_features, in_features // sp.m), "uint8", code_bits=index_bits(sp.n, sp.m))
                if sp.nm else Part("mask", (out_features, in_features), "uint8", code_bits=1))
        kept = sp.kept(in_features)
        inner = [Part(p.suffix, (out_features, kept), p.dtype, p.code_bits)
                 if per_weight(p, out_features, in_features) else p
                 for p in self.inner.parts(out_features, in_features)]
        if any(p.suffix == "mask" for p in inner):
            raise SizewiseError(f"{self.inner.label} already has a part named 'mask'")
        return (mask, *inner)

    def to_parts(self, st: "SparseTensor") -> dict[str, torch.Tensor]:
        out, inp = st.shape
        sp = self.spec
        values = self.inner.to_parts(st.inner)
        keep = st.keep.cpu()
        res = {"mask": encode_nm(keep, sp.n, sp.m) if sp.nm else keep.to(torch.uint8)}
        for p in self.inner.parts(out, inp):
            v = values[p.suffix]
            res[p.suffix] = v[keep].reshape(out, -1).contiguous() if per_weight(p, out, inp) else v
        return res

    def from_parts(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> "SparseTensor":
        out, inp = shape
        sp = self.spec
        mask = tensors["mask"]
        if sp.nm:
            keep = decode_nm(mask.reshape(out, inp // sp.m), sp.n, sp.m)
        else:
            if mask.numel() and int(mask.max()) > 1:
                raise SizewiseError("a stored sparsity bitmap holds values other than 0 and 1")
            keep = mask.reshape(out, inp).bool()
        kept = sp.kept(inp)
        if bool((keep.sum(1) != kept).any()):
            raise SizewiseError(f"a stored {self.pattern} mask does not keep {kept} weights in every row")
        dense = {}
        for p in self.inner.parts(out, inp):
            v = tensors[p.suffix]
            if per_weight(p, out, inp):
                full = torch.zeros(out, inp, dtype=v.dtype)
                full[keep] = v.reshape(-1)
                v = full
            dense[p.suffix] = v
        return SparseTensor(self, keep, self.inner.from_parts(dense, shape))

    # --- GGUF: dense, pruned entries exact zeros ---------------------------------------------------

    @property
    def ggml_type(self) -> str | None:
        if not self.inner.quantized:
            return self.inner.ggml_type if self.inner.ggml_type in ("F16", "F32") else None
        if isinstance(self.inner, QuantFormat) and self.inner.symmetric:
            return self.inner.ggml_type       # the middle code is exactly zero
        return None

    def ggml_blocks(self, st: "SparseTensor") -> np.ndarray:
        if self.ggml_type is None:
            raise SizewiseError(f"{self.label} has no exact GGUF type: llama.cpp has no sparse type and "
                                f"{self.inner.label} cannot hold the pruned weights as exact zeros; keep the weights "
                                "in float16 or a symmetric group-32 grid (--sym --group-size 32)")
        if not self.inner.quantized:
            return (dense(st.inner) * st.keep).to(st.inner.dtype).numpy()
        q = st.inner
        codes = torch.where(st.keep, q.codes, torch.full_like(q.codes, 1 << (self.inner.bits - 1)))
        return self.inner.ggml_blocks(QuantizedTensor(q.fmt, codes, q.scales, q.zeros))

    @property
    def carries_lora(self) -> bool:
        return self.inner.carries_lora

    def lora(self, st: "SparseTensor"):
        return self.inner.lora(st.inner)

    def round(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> "SparseTensor":
        """Magnitude pruning, then the kept weights rounded (data-free)."""
        return prune_by_score(w, w.abs(), self)


@dataclass
class SparseTensor:
    """A pruned [out, in] weight: `keep` (bool, exactly the pattern's count per row) and the kept
    format's stored tensor of the dense weight (its values at pruned entries are ignored)."""

    fmt: SparseFormat
    keep: torch.Tensor
    inner: object

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.keep.shape)

    def stored_bits(self) -> int:
        return self.fmt.stored_bits(*self.shape)

    def dequantize(self) -> torch.Tensor:
        return dense(self.inner) * self.keep


def check_keeps(keep: torch.Tensor, pattern: Pattern) -> None:
    """Raise if `keep` does not have the pattern's kept count in every row (and group of M)."""
    out, inp = keep.shape
    if pattern.nm:
        ok = bool((keep.reshape(out, -1, pattern.m).sum(-1) == pattern.n).all())
    else:
        ok = bool((keep.sum(1) == pattern.kept(inp)).all())
    if not ok:
        raise SizewiseError(f"internal: a mask breaks its sparsity pattern {pattern}")


def keep_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """bool [out, in]: True where a weight is kept (largest scores per row, or per group of M)."""
    out, inp = score.shape
    if pattern.nm:
        groups = score.reshape(out, inp // pattern.m, pattern.m)
        idx = groups.topk(pattern.n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
        return keep.reshape(out, inp)
    idx = score.topk(pattern.kept(inp), dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def prune_by_score(w: torch.Tensor, score: torch.Tensor, fmt: SparseFormat) -> SparseTensor:
    """Keep the highest-scoring weights of `w` [out, in] in `fmt`'s pattern; round the kept ones to its
    kept format (the pruned ones are zero before rounding, so a grid fits the kept weights' range)."""
    fmt.check(w.shape[1])
    keep = keep_mask(score.float(), fmt.spec)
    check_keeps(keep, fmt.spec)
    kept = w.float() * keep
    return SparseTensor(fmt, keep, fmt.inner.round(kept))
