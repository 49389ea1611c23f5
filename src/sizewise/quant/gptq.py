"""GPTQ (Frantar et al., 2022) as a pure function of (weight, XᵀX, format).

Columns are quantized one at a time; each column's rounding error is spread over the columns
not yet quantized, weighted by the inverse Hessian, so that the layer output XWᵀ moves as little
as possible. The inverse Hessian enters only through its upper Cholesky factor U (H⁻¹ = UᵀU),
and updates to columns outside the current block are applied lazily, one matmul per block.

The grid math (fit / encode / decode) is the one in grid.py: what GPTQ rounds to is exactly what
`QuantizedTensor.dequantize()` (or, for k-quants, `KQuantTensor.dequantize()`) returns.

`hessian_factor` depends only on XᵀX, so callers that quantize several weights fed by the same
inputs (q/k/v, gate/up) or try several formats on one layer can compute it once and pass it in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SizewiseError
from .formats import TORCH_DTYPES, Format
from .grid import decode, encode, fit, grouped
from .refine import mse_clip
from .uniform import QuantFormat, pack_tensor

_DAMP_RETRIES = 4   # each retry multiplies the damping by 10


@dataclass(frozen=True)
class HessianFactor:
    """Everything GPTQ needs from XᵀX, in processing order.

    perm: processing order of the input columns (identity without act_order).
    u: upper Cholesky factor of the damped inverse Hessian, float32 [in, in], in `perm` order.
    dead: bool [in], original order; input channels that never fired (their weights are zeroed).
    diag: float32 [in], original order; diag(XᵀX) (0 for dead channels), used to weight clip search.
    damp: the relative damping actually used (larger than asked if H needed it).
    """

    perm: torch.Tensor
    u: torch.Tensor
    dead: torch.Tensor
    diag: torch.Tensor
    damp: float
    act_order: bool


def _inverse_cholesky_upper(hr: torch.Tensor) -> torch.Tensor | None:
    """Upper U with UᵀU = H⁻¹, or None if H is not positive definite; `hr` is H index-reversed
    (`hr[i, j] = H[n-1-i, n-1-j]`) and is consumed (freed here: a 8960-wide H is 0.6 GB in float64).

    Factor hr as L Lᵀ; reversing back gives H = R Rᵀ with R upper, so H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹
    (upper, positive diagonal). One Cholesky and one triangular inverse, instead of Cholesky,
    explicit inverse and a second Cholesky.
    """
    top = float(hr.diagonal().max())
    info = torch.empty((), dtype=torch.int32, device=hr.device)
    torch.linalg.cholesky_ex(hr, out=(hr, info))      # into hr: no second factor kept beside it
    # A pivot this small means H is singular up to rounding: the factor "exists" but its
    # inverse would blow GPTQ's updates up, so treat it as a failure and damp more.
    if int(info) != 0 or float(hr.diagonal().min()) ** 2 <= 1e-10 * top:
        return None
    _reverse_in_place(hr)                             # L flipped both ways: R, upper
    _invert_upper(hr)
    return hr if _all_finite(hr) else None


def _row_blocks(t: torch.Tensor) -> range:
    """Starts of blocks of `_rows_per_block(t)` rows of matrix `t`: about 4M elements each."""
    return range(0, t.shape[0], _rows_per_block(t))


def _rows_per_block(t: torch.Tensor) -> int:
    return max(1, (1 << 22) // max(1, t.shape[1]))


def _all_finite(t: torch.Tensor) -> bool:
    """No inf or NaN in matrix `t`, checked a block of rows at a time: `isfinite` of a whole 8960-wide
    float64 matrix takes more memory than the matrix itself (+0.8 GB)."""
    step = _rows_per_block(t)
    return all(bool(torch.isfinite(t[i:i + step]).all()) for i in _row_blocks(t))


def _reverse_in_place(t: torch.Tensor, chunk: int = 1 << 22) -> None:
    """`t.flip(0, 1)` for a contiguous matrix, in place: reversing a matrix both ways reverses its
    row-major buffer, swapped here a chunk from each end at a time (`flip` would copy all of it)."""
    flat = t.view(-1)
    n = flat.numel()
    for k in range(0, n // 2, chunk):
        c = min(chunk, n // 2 - k)
        head = flat[k:k + c].flip(0)
        flat[k:k + c] = flat[n - k - c:n - k].flip(0)
        flat[n - k - c:n - k] = head


def _invert_upper(r: torch.Tensor, leaf: int = 128) -> None:
    """Invert the upper-triangular `r` in place, by 2x2 block recursion.

    inv([[A, B], [0, C]]) = [[A⁻¹, −A⁻¹ B C⁻¹], [0, C⁻¹]]: n³/3 flops, mostly in matmuls, where a
    triangular solve against the identity does n³ (about 2x slower at n = 1536); in place, so that an
    8960-wide factor needs no second n x n buffer.
    """
    n = r.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=r.dtype, device=r.device)
        r.copy_(torch.linalg.solve_triangular(r, eye, upper=True))
        return
    h = n // 2
    _invert_upper(r[:h, :h], leaf)
    _invert_upper(r[h:, h:], leaf)
    r[:h, h:] = -(r[:h, :h] @ r[:h, h:]) @ r[h:, h:]


def hessian_factor(xtx: torch.Tensor, *, damp: float = 0.01, act_order: bool = True) -> HessianFactor:
    """Prepare XᵀX for GPTQ: dead channels, damping (retried if singular), order, Cholesky.

    Memory: two float64 copies of H at most (an 8960-wide H is 0.6 GB; torch's Cholesky works on a copy
    of its input): H is permuted and index-reversed in one gather, a block of rows at a time (the Cholesky
    wants it reversed), flipped and inverted in place, checked in blocks, and a retry rebuilds it from
    `xtx` instead of keeping a spare copy."""
    if xtx.ndim != 2 or xtx.shape[0] != xtx.shape[1]:
        raise SizewiseError(f"XᵀX must be a square matrix, got shape {tuple(xtx.shape)}")
    if not _all_finite(xtx):
        raise SizewiseError("XᵀX contains NaN or infinite values; check the calibration activations")
    n = xtx.shape[0]
    diag = xtx.diagonal().to(torch.float64)
    dead = diag <= 0
    diag = diag.clamp_min(0)
    # Largest curvature first (act_order): the columns that matter most are rounded while the most
    # columns remain to absorb their error. Stable sort keeps ties in original order.
    perm = (torch.sort(diag, descending=True, stable=True).indices if act_order
            else torch.arange(n, device=xtx.device))
    rev = perm.flip(0)
    dead_rev = dead[rev]
    kept = diag[perm]                                   # the diagonal in processing order, dead pinned to 1
    kept[dead[perm]] = 1
    mean_diag = float(kept.mean())

    def reversed_h(rel: float) -> torch.Tensor:
        # float64 for the factorization: H of a 1536-wide layer spans many orders of magnitude.
        hr = torch.empty((n, n), dtype=torch.float64, device=xtx.device)
        step = _rows_per_block(hr)
        for i in _row_blocks(hr):
            hr[i:i + step] = xtx.index_select(0, rev[i:i + step]).index_select(1, rev)
        # A channel that never fired has no curvature: pin it so H stays invertible.
        hr[dead_rev, :] = 0
        hr[:, dead_rev] = 0
        hr.diagonal()[dead_rev] = 1
        hr.diagonal().add_(rel * mean_diag)
        return hr

    rel = damp
    for _ in range(_DAMP_RETRIES + 1):
        u = _inverse_cholesky_upper(reversed_h(rel))
        if u is not None:
            return HessianFactor(perm, u.float(), dead, diag.float(), rel, act_order)
        rel = max(rel, 1e-4) * 10
    raise SizewiseError(
        f"XᵀX is not positive definite even with damping {rel / 10:g} x mean diagonal; "
        "the calibration activations are degenerate (too few tokens, or all zero)")


def _fit_groups(w: torch.Tensor, fmt: QuantFormat, weight: torch.Tensor | None, clip_search: bool):
    """Scale/zero [out, groups] for w [out, in] (grouped by fmt), optionally MSE-clipped."""
    clip = mse_clip(w, fmt, weight=weight) if clip_search else 1.0
    return fit(grouped(w, fmt), fmt, clip)


def gptq(weight: torch.Tensor, xtx: torch.Tensor, fmt: Format, *, block_size: int = 128,
         act_order: bool = True, damp: float = 0.01, clip_search: bool = False,
         factor: HessianFactor | None = None):
    """Quantize weight [out, in] to `fmt`, minimizing ‖XWᵀ − XŴᵀ‖ for the X behind xtx = ΣxxT.

    act_order: process columns by decreasing diag(XᵀX). Groups stay contiguous in the original
    column order, with their scale/zero fitted up front from the weight before any update
    ("static groups"), so nothing about the order is stored. Without act_order, each group's
    grid is fitted from the already-updated weights when its first column is reached (original
    GPTQ). Per-channel grids are always fitted up front.
    clip_search: fit each group's range by `mse_clip`, weighting inputs by diag(XᵀX).
    factor: a precomputed `hessian_factor(xtx, damp=..., act_order=...)`; xtx is then unused.

    A format with a fixed grid (`fmt.fixed_grid`: a k-quant's two-level grid, IQ4_NL's and MXFP4's
    block scales) has it fitted up front with diag(XᵀX) as the input channels' importance (llama.cpp's
    imatrix is the same statistic); GPTQ then chooses every code on that fixed grid. clip_search
    does not apply: those fits search the scales themselves. Returns the format's stored tensor.
    """
    if block_size < 1:
        raise SizewiseError(f"block size must be positive, got {block_size}")
    w, factor = prepare(weight, xtx, fmt, factor, damp, act_order, "GPTQ")
    stored, _ = solve_columns(w, factor, fmt, block_size, clip_search)
    return stored


def prepare(weight: torch.Tensor, xtx: torch.Tensor | None, fmt: Format, factor: HessianFactor | None,
            damp: float, act_order: bool, what: str) -> tuple[torch.Tensor, HessianFactor]:
    """(a float32 copy of weight [out, in] for the column loop, dead input channels zeroed; the Hessian
    factor, computed or checked against the weight)."""
    if weight.ndim != 2:
        raise SizewiseError(f"{what} needs a 2-D weight, got shape {tuple(weight.shape)}")
    in_f = weight.shape[1]
    fmt.check(in_f)
    if factor is None:
        factor = hessian_factor(xtx, damp=damp, act_order=act_order)
    elif factor.act_order != act_order:
        raise SizewiseError("the Hessian factor was prepared with a different act_order")
    if factor.u.shape[0] != in_f:
        raise SizewiseError(f"XᵀX is {factor.u.shape[0]} wide but the weight has {in_f} input columns")
    w = weight.detach().float().clone()
    w[:, factor.dead.to(w.device)] = 0  # no data constrains these; zero is on every grid with an integer zero
    return w, factor


def solve_columns(w: torch.Tensor, factor: HessianFactor, fmt: Format, block_size: int = 128,
                  clip_search: bool = False, prune=None):
    """GPTQ's column loop on w [out, in] (modified in place) for any format, optionally pruning.

    fmt: the grid the kept weights are rounded to; a format that is not quantized (`FloatFormat`)
    keeps them in its float dtype (the loop then only spreads the pruning error: SparseGPT).
    prune: a `select(w1, d1, i1, i, keep1)` that clears in `keep1` (bool, like the block `w1`
    [columns, out] in processing order, starting at column i1) the weights to prune, at step i of the
    block, before column i is rounded; d1 the block's diagonal of the inverse-Hessian factor (SparseGPT's
    OBS saliency is w²/d²). Pruned weights are "rounded" to zero, their error spread like a rounding error.
    Returns (the format's stored tensor, or the float values [out, in] for a float format; the keep
    mask [out, in] in original column order, or None without `prune`).
    """
    in_f = w.shape[1]
    if not fmt.quantized:
        def enc(x, s, z):
            return x.to(TORCH_DTYPES[fmt.dtype])
        coding = (enc, lambda c, s, z: c.float())
        values, _, keep = _round_columns(w, factor, coding, block_size, (torch.ones_like(w), None), prune=prune)
        return values, keep
    fixed = fmt.fixed_grid(w, factor.diag)
    if fixed is not None:
        codes, _, keep = _round_columns(w, factor, (fixed.encode, fixed.decode), block_size,
                                        (fixed.scale, fixed.zero), prune=prune)
        return fixed.wrap(codes), keep
    g = fmt.group_len(in_f)
    cw = factor.diag.to(w.device) if clip_search else None
    if factor.act_order or g == in_f:
        scale, zero = _fit_groups(w, fmt, cw, clip_search)          # [out, groups]
        per_weight = (scale.repeat_interleave(g, dim=1), None if zero is None else zero.repeat_interleave(g, dim=1))
        codes, _, keep = _round_columns(w, factor, _uniform(fmt), block_size, per_weight, prune=prune)
    else:
        codes, (scale, zero), keep = _round_columns(w, factor, _uniform(fmt), block_size, group=g, cw=cw,
                                                    clip_search=clip_search, fmt=fmt, prune=prune)
    return pack_tensor(codes, scale, zero, fmt), keep


def _uniform(fmt: QuantFormat):
    """(encode, decode) of a uniform grid (`grid.encode/decode`)."""
    return (lambda x, s, z: encode(x, s, z, fmt)), (lambda c, s, z: decode(c, s, z, fmt))


def _round_columns(w: torch.Tensor, factor: HessianFactor, coding, block_size: int,
                   fixed: tuple[torch.Tensor, torch.Tensor | None] | None = None, *, group: int = 0,
                   cw: torch.Tensor | None = None, clip_search: bool = False, fmt: QuantFormat | None = None,
                   prune=None):
    """GPTQ's column loop over w [out, in]: each column rounded in processing order, its error spread.

    coding: (encode, decode) of the grid, each elementwise with scale/zero broadcast.
    fixed: (scale, zero) per weight, each [out, in] (zero None if symmetric), rounded against as given.
    Without it each group of `group` columns (original order only) gets its uniform grid (`fmt`)
    fitted from its weights as updated so far, when its first column is reached.
    prune: see `solve_columns`; pruned weights are set to zero instead of rounded.
    Returns (uint8 codes [out, in] in original column order, that fitted (scale, zero) [out, groups],
    or None with a fixed grid, the keep mask [out, in] or None). Decoding the codes gives exactly the
    values rounded to, where kept.
    """
    _encode, _decode = coding
    in_f = w.shape[1]
    dev = w.device
    perm, u = factor.perm.to(dev), factor.u.to(dev)
    if fixed is not None:
        # Per processing step, the scale/zero of that column: [in, out].
        st = fixed[0].t()[perm].contiguous()
        zt = None if fixed[1] is None else fixed[1].t()[perm].contiguous()
    else:
        scales, zeros = [], []

    # Transposed so that a column of W is a contiguous row: the per-column work is row ops.
    wt = w.t()[perm].contiguous()                                     # [in, out], processing order
    d = u.diagonal()
    s = z = None
    keep = None if prune is None else torch.ones_like(wt, dtype=torch.bool)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = wt[i1:i2]                     # view: updated in place, row i final once reached
        u1 = u[i1:i2, i1:i2]
        e1 = torch.empty_like(w1)
        keep1 = None if keep is None else keep[i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if keep1 is not None:
                prune(w1, d[i1:i2], i1, i, keep1)
            if fixed is None:
                if c % group == 0:
                    s, z = _fit_current_group(wt, u, e1, i1, i2, c, group, fmt, cw, clip_search)
                    scales.append(s)
                    zeros.append(z)
            else:
                s = st[c]
                z = None if zt is None else zt[c]
            wc = w1[i]
            q = _decode(_encode(wc, s, z), s, z)
            if keep1 is not None:
                q = torch.where(keep1[i], q, 0.0)
            err = (wc - q) / d[c]
            e1[i] = err
            # Spread this column's error over the rest of the block now; beyond it, later.
            w1[i + 1:].addr_(u1[i, i + 1:], err, alpha=-1.0)
        if i2 < in_f:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), e1, alpha=-1.0)

    fitted = None
    if fixed is None:
        scale = torch.stack(scales, dim=1)
        zero = None if zeros[0] is None else torch.stack(zeros, dim=1)
        st = scale.t().repeat_interleave(group, dim=0)
        zt = None if zero is None else zero.t().repeat_interleave(group, dim=0)
        fitted = (scale, zero)
    # Each row of wt now holds the value that was rounded; encoding is elementwise, so this
    # reproduces the codes chosen inside the loop exactly.
    codes_t = _encode(wt, st, zt)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(in_f, device=dev)
    if keep is not None:
        keep = keep[inv].t().contiguous()
    return codes_t[inv].t().contiguous(), fitted, keep                  # original column order


def _fit_current_group(wt, u, e1, i1, i2, c, g, fmt, cw, clip_search):
    """Grid of the group starting at column c, from its weights as updated so far.

    Columns inside the current block are up to date in wt; columns past it still lack this
    block's pending (lazy) update from the columns already rounded, so apply it here.
    """
    end = c + g
    cur = wt[c:min(end, i2)]
    if end > i2:
        done = c - i1
        rest = wt[i2:end]
        if done:
            rest = rest - u[i1:c, i2:end].t() @ e1[:done]
        cur = torch.cat([cur, rest])
    group_fmt = QuantFormat(fmt.bits, None, fmt.symmetric, fmt.scale_dtype, fmt.zero)
    weight = None if cw is None else cw[c:end]
    scale, zero = _fit_groups(cur.t(), group_fmt, weight, clip_search)
    return scale[:, 0], None if zero is None else zero[:, 0]
