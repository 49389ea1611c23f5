"""Fitting a k-quant's two-level grid: pure functions on super-blocks [N, J, L] (weights, optional
importance), the method of llama.cpp's make_qkx2_quants / make_qx_quants. `fmt` is read for its
widths only (bits, qmax, symmetric, ls_range, spec.lbits); `kquant.kquant_fit` wraps the result in
a `KQuantGrid`.
"""

from __future__ import annotations

import torch

_F16_MAX = 65504.0
_TINY = 2.0 ** -24  # smallest float16 subnormal: a stored scale is never zero

#
# Shapes inside: x, w are [N, J, L]: N super-blocks, J sub-blocks of L weights each. The fit is
# (1) per sub-block, a float scale (and min) by a candidate search with weighted least squares,
#     the method of llama.cpp's make_qkx2_quants / make_qx_quants;
# (2) per super-block, d (and dmin) in float16 and the integer ls (and lm) by rounding;
# (3) a few rounds of re-fitting with the codes held fixed, first ls/lm per sub-block, then d/dmin
#     per super-block, each kept only where it lowers the super-block's weighted error.


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-_F16_MAX, _F16_MAX).to(torch.float16).float()


def _nonzero(x: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(x == 0, torch.full_like(x, fill), x)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _codes(x, scale, zero, fmt):
    """Float codes for x against per-sub-block scale/zero [N, J] (encode's rounding, kept in float)."""
    if fmt.symmetric:
        q = torch.round(x / scale[..., None]) + (1 << (fmt.bits - 1))
    else:
        q = torch.round((x - zero[..., None]) / scale[..., None])
    return q.clamp(0, fmt.qmax)


def _err(x, w, c, scale, zero, fmt):
    """Weighted squared error per super-block [N] of the decoded values."""
    if fmt.symmetric:
        y = scale[..., None] * (c - (1 << (fmt.bits - 1)))
    else:
        y = scale[..., None] * c + zero[..., None]
    e = (y - x) ** 2
    return (e if w is None else w * e).sum(dim=(-2, -1))


def _wmul(w, t):
    return t if w is None else w * t


def _wsum(w, t):
    """Weighted sum over the last dim; w None means uniform weights (saves a pass)."""
    return t.sum(-1) if w is None else (w * t).sum(-1)


def _affine_ls(x, w, c, sw, sx):
    """Weighted least-squares (s, off) of x ~ s*c + off per sub-block, with off <= 0 (ggml stores the
    min non-negative); also the fit's error from the sums (no extra pass) and where it is defined."""
    wc = c if w is None else w * c
    sc, scc, sxc = wc.sum(-1), (wc * c).sum(-1), (wc * x).sum(-1)
    det = sw * scc - sc * sc
    ok = det > 1e-6 * sw * scc
    s = _safe_div(sw * sxc - sc * sx, det)
    off = _safe_div(scc * sx - sc * sxc, det)
    pin = off > 0  # the grid must reach down to 0 or below: pin the offset at 0 and refit the slope
    s = torch.where(pin, _safe_div(sxc, scc), s)
    off = torch.where(pin, torch.zeros_like(off), off)
    # sum w (s c + off - x)^2 without sxx (constant per sub-block, irrelevant to comparisons)
    e = s * s * scc + 2 * s * off * sc + off * off * sw - 2 * s * sxc - 2 * off * sx
    return s, off, e, ok & (s > 0)


def _search_affine(x, w, fmt, steps, reassign: int = 1):
    """Per sub-block float (s, m) for values s*c - m, m >= 0, in the manner of llama.cpp's
    make_qkx2_quants: for each candidate inverse scale (nmax + step)/(max - min) assign codes, refit
    s and m by weighted least squares (then reassign and refit `reassign` more times); best wins.
    The min/max grid itself is the starting point."""
    nmax = fmt.qmax
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)
    rng = hi - lo
    sw = torch.full_like(rng, x.shape[-1]) if w is None else w.sum(-1)
    sx = _wsum(w, x)
    best_s, best_off = rng / nmax, lo
    c = ((x - lo[..., None]) * _safe_div(torch.full_like(rng, nmax), rng)[..., None]).round_().clamp_(0, nmax)
    wc = c if w is None else w * c
    sc, scc, sxc = wc.sum(-1), (wc * c).sum(-1), (wc * x).sum(-1)
    best_e = best_s * best_s * scc + 2 * best_s * best_off * sc + best_off * best_off * sw \
        - 2 * best_s * sxc - 2 * best_off * sx
    for step in steps:
        inv = _safe_div(torch.full_like(rng, nmax + step), rng)
        c = ((x - lo[..., None]) * inv[..., None]).round_().clamp_(0, nmax)
        for it in range(1 + reassign):
            s, off, e, ok = _affine_ls(x, w, c, sw, sx)
            better = ok & (e < best_e)
            best_s, best_off = torch.where(better, s, best_s), torch.where(better, off, best_off)
            best_e = torch.where(better, e, best_e)
            if it < reassign:
                c = ((x - off[..., None]) * _safe_div(torch.ones_like(s), s)[..., None]).round_().clamp_(0, nmax)
    return best_s, -best_off


def _search_symmetric(x, w, fmt, steps, both_sides: bool = True):
    """Per sub-block signed float scale s for values s*q, q in [-h, h-1], in the manner of llama.cpp's
    make_qx_quants: map the largest-magnitude weight near code -h (and, if both_sides, near h-1),
    refit s by weighted least squares for each candidate; the largest explained energy wins."""
    h = 1 << (fmt.bits - 1)
    idx = x.abs().argmax(-1, keepdim=True)
    mx = x.gather(-1, idx).squeeze(-1)
    best_s = mx / -h
    best_g = torch.full_like(mx, -1.0)
    targets = [-(h + st) for st in steps]
    if both_sides:
        targets += [h - 1 + st for st in steps if h - 1 + st > 0]
    for t in targets:
        inv = _safe_div(torch.full_like(mx, float(t)), mx)
        q = (x * inv[..., None]).round_().clamp_(-h, h - 1)
        wq = q if w is None else w * q
        sqq, sxq = (wq * q).sum(-1), (wq * x).sum(-1)
        g = _safe_div(sxq * sxq, sqq)  # error = sum w x^2 - sxq^2/sqq at the least-squares scale
        better = (sqq > 0) & (g > best_g)
        best_s, best_g = torch.where(better, _safe_div(sxq, sqq), best_s), torch.where(better, g, best_g)
    return best_s


def _round_ls(s, d, fmt):
    lo, hi = fmt.ls_range
    ls = torch.round(s / d[..., None]).clamp(lo, hi)
    return _nonzero(ls, 1.0)  # ls = 0 would zero the scale; 1 still decodes the middle code to 0


def _round_lm(m, dmin, fmt):
    hi = (1 << fmt.spec.lbits) - 1
    return torch.round(_safe_div(m, dmin[..., None].expand_as(m))).clamp(0, hi)


def _grid_of(d, dmin, ls, lm, fmt):
    scale = d[..., None] * ls
    zero = None if fmt.symmetric else -(dmin[..., None] * lm)
    return scale, zero


def _search_steps(fmt) -> list[float]:
    """Candidate offsets to nmax (asymmetric) or h (symmetric) of the sub-block search."""
    if fmt.symmetric:
        return [0.1 * k for k in range(-9, 10)]
    if fmt.qmax == 3:
        return [-0.5 + 0.1 * k for k in range(16)]
    return [-1.0 + 0.1 * k for k in range(21)]


def _fit_blocks(x, w, fmt, rounds: int, reassign: int = 1, both_sides: bool = True):
    """(d, dmin, ls, lm) for super-blocks x [N, J, L] with weights w (None: uniform); float32,
    d and dmin already rounded to float16."""
    if fmt.symmetric:
        s = _search_symmetric(x, w, fmt, _search_steps(fmt), both_sides)
        lo, _ = fmt.ls_range
        idx = s.abs().argmax(-1, keepdim=True)
        d = _nonzero(_f16(s.gather(-1, idx).squeeze(-1) / lo), _TINY)  # largest |s| -> ls = lo exactly
        dmin, ls, lm = None, _round_ls(s, d, fmt), None
    else:
        s, m = _search_affine(x, w, fmt, _search_steps(fmt), reassign)
        lmax = (1 << fmt.spec.lbits) - 1
        d = _nonzero(_f16(s.amax(-1) / lmax), _TINY)
        dmin = _f16(m.amax(-1) / lmax)
        ls, lm = _round_ls(s, d, fmt), _round_lm(m, dmin, fmt)

    scale, zero = _grid_of(d, dmin, ls, lm, fmt)
    c = _codes(x, scale, zero, fmt)
    err = _err(x, w, c, scale, zero, fmt)

    def keep(better, new, old):
        if old is None:
            return None
        b = better.reshape(better.shape + (1,) * (old.dim() - better.dim()))
        return torch.where(b, new, old)

    def try_params(nd, ndmin, nls, nlm):
        """Re-encode against candidate parameters; keep them in the super-blocks they improve."""
        nonlocal d, dmin, ls, lm, c, err
        nscale, nzero = _grid_of(nd, ndmin, nls, nlm, fmt)
        nc = _codes(x, nscale, nzero, fmt)
        nerr = _err(x, w, nc, nscale, nzero, fmt)
        better = nerr < err
        d, dmin, ls, lm = keep(better, nd, d), keep(better, ndmin, dmin), keep(better, nls, ls), keep(better, nlm, lm)
        c, err = keep(better, nc, c), torch.where(better, nerr, err)

    h = 1 << (fmt.bits - 1)
    sw = torch.full_like(ls, x.shape[-1]) if w is None else w.sum(-1)
    sx = _wsum(w, x)
    for _ in range(rounds):
        # (a) codes fixed: least-squares sub-block scale (and min), rounded to the integer grid of d
        if fmt.symmetric:
            q = c - h
            wq = _wmul(w, q)
            s = _safe_div((wq * x).sum(-1), (wq * q).sum(-1))
            try_params(d, dmin, _round_ls(s, d, fmt), lm)
        else:
            s, off, _, ok = _affine_ls(x, w, c, sw, sx)
            s = torch.where(ok, s, d[..., None] * ls)
            off = torch.where(ok, off, -(dmin[..., None] * lm))
            try_params(d, dmin, _round_ls(s, d, fmt), _round_lm(-off, dmin, fmt))
        # (b) codes and integers fixed: least-squares d (and dmin) over the super-block
        if fmt.symmetric:
            a = ls[..., None] * (c - h)
            wa = _wmul(w, a)
            nd = _f16(_safe_div((wa * x).sum((-2, -1)), (wa * a).sum((-2, -1))))
            try_params(_nonzero(nd, _TINY), dmin, ls, lm)
        else:
            a = ls[..., None] * c  # x ~ d*a - dmin*b, b constant over a sub-block
            wa = _wmul(w, a)
            saa, sxa = (wa * a).sum(-1), (wa * x).sum(-1)
            sa = wa.sum(-1)
            b = lm
            saa, sab, sbb = saa.sum(-1), (sa * b).sum(-1), (sw * b * b).sum(-1)
            sxa, sxb = sxa.sum(-1), (sx * b).sum(-1)
            det = saa * sbb - sab * sab
            nd = _safe_div(sxa * sbb - sxb * sab, det)
            ndmin = _safe_div(sxa * sab - sxb * saa, det)
            solo = (det <= 1e-6 * saa * sbb) | (ndmin < 0)  # no usable min: fit d alone, dmin 0
            nd = torch.where(solo, _safe_div(sxa, saa), nd)
            ndmin = torch.where(solo, torch.zeros_like(ndmin), ndmin)
            try_params(_nonzero(_f16(nd.clamp_min(0)), _TINY), _f16(ndmin), ls, lm)
    return d, dmin, ls, lm


