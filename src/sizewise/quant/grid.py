"""Grid math as pure functions: fit a group's scale/zero, encode weights to codes, decode back.

`fmt` is read for its fields only (bits, qmax, symmetric, zero, scale_dtype, group_len): the uniform
format (`uniform.QuantFormat`) and the k-quants' effective grids both decode through here.

Scales and zeros are rounded to their stored precision *before* codes are computed, so the codes
are optimal for what is actually stored, and `decode` is the single definition of a weight's
value everywhere (engine, artifact loading, exporters).
"""

from __future__ import annotations

import torch

from .formats import TORCH_DTYPES

_TINY = 2.0 ** -24  # smallest float16 subnormal: a scale never rounds to zero


def _stored(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(TORCH_DTYPES[dtype]).float()


def _stored_scale(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round a scale to its storage dtype *upwards*, so the grid still spans the group's range."""
    y = x.to(TORCH_DTYPES[dtype])
    up = torch.nextafter(y, torch.full_like(y, float("inf")))
    return torch.where(y.float() < x, up, y).float().clamp_min(_TINY)


def extent(w: torch.Tensor, fmt) -> tuple[torch.Tensor, ...]:
    """What `fit` reads of groups laid along the last dim of `w`: (|w| max,) if symmetric, else (min, max)."""
    w = w.float()
    return (w.abs().amax(dim=-1),) if fmt.symmetric else (w.amin(dim=-1), w.amax(dim=-1))


def fit(w: torch.Tensor, fmt, clip: float | torch.Tensor = 1.0):
    """Scale and zero for groups laid along the last dim of `w` (reduced away).

    `clip` < 1 shrinks the range (MSE-optimal clipping searches it). Returns float32 tensors
    already rounded to their stored precision; zero is None for symmetric formats.
    """
    return fit_extent(extent(w, fmt), fmt, clip)


def fit_extent(ext: tuple[torch.Tensor, ...], fmt, clip: float | torch.Tensor = 1.0):
    """`fit` from the groups' `extent`: a search over clip ratios reduces the weights once."""
    if fmt.symmetric:
        amax = ext[0] * clip
        scale = _stored_scale(amax * 2 / fmt.qmax, fmt.scale_dtype)
        return scale, None
    lo, hi = ext[0] * clip, ext[1] * clip
    if fmt.zero == "int":
        # The range must contain 0 so that the integer zero point lies on the grid.
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = _stored_scale((hi - lo) / fmt.qmax, fmt.scale_dtype)
        zero = torch.round(-lo / scale).clamp(0, fmt.qmax)
        return scale, zero
    scale = _stored_scale((hi - lo) / fmt.qmax, fmt.scale_dtype)
    return scale, _stored(lo, "float16")


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt):
    """Nearest code for each weight; scale/zero broadcast against `w`. Returns uint8 codes."""
    w = w.float()
    if fmt.symmetric:
        q = torch.round(w / scale) + (1 << (fmt.bits - 1))
    elif fmt.zero == "int":
        q = torch.round(w / scale) + zero
    else:
        q = torch.round((w - zero) / scale)
    return q.clamp(0, fmt.qmax).to(torch.uint8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt):
    """The value of each code, in float32; scale/zero broadcast against `codes`."""
    q = codes.float()
    if fmt.symmetric:
        return scale * (q - (1 << (fmt.bits - 1)))
    if fmt.zero == "int":
        return scale * (q - zero)
    return scale * q + zero


def round_trip(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt) -> torch.Tensor:
    """`decode(encode(w, ...), ...)`, the same values, in fewer passes (no uint8 codes; for searches)."""
    if fmt.symmetric:
        off = 1 << (fmt.bits - 1)
        return torch.div(w, scale).round_().add_(off).clamp_(0, fmt.qmax).sub_(off).mul_(scale)
    if fmt.zero == "int":
        return torch.div(w, scale).round_().add_(zero).clamp_(0, fmt.qmax).sub_(zero).mul_(scale)
    return torch.sub(w, zero).div_(scale).round_().clamp_(0, fmt.qmax).mul_(scale).add_(zero)


def grouped(w: torch.Tensor, fmt) -> torch.Tensor:
    """View [out, in] as [out, groups, group_len]."""
    out, inp = w.shape
    fmt.check(inp)
    return w.reshape(out, inp // fmt.group_len(inp), fmt.group_len(inp))
