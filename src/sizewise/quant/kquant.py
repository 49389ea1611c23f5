"""llama.cpp's k-quants as a format: two-level grids over 256-weight super-blocks, fitted and rounded.

Q2_K .. Q6_K cut each 256-weight super-block of a row into 16- or 32-weight sub-blocks; a sub-block's
scale (and min) is a small integer times the super-block's float16 `d` (and `dmin`). `KQuantFormat`
says the widths, `KQuantGrid` holds the stored parameters, `kquant_fit` chooses them (weighted by an
optional per-input-channel importance, like llama.cpp's imatrix), `kquant_encode` rounds weights
against them. The ggml byte layout is GGUF's business: `export/gguf_types.py` packs and unpacks it.

A weight's value is defined once, by `grid.decode` over the *effective* scale and zero of its
sub-block (`KQuantGrid.effective`): the float32 products `d*ls` and `-(dmin*lm)`, exact because an
fp16 times a <=8-bit integer fits float32's 24-bit mantissa. That is the arithmetic of gguf's
numpy dequantizer, in the same order, so the ggml bytes decode to our values bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SizewiseError
from .formats import QuantFormat
from .grid import decode, encode

SUPER = 256  # weights per super-block (ggml's QK_K)

_F16_MAX = 65504.0
_TINY = 2.0 ** -24  # smallest float16 subnormal: a stored scale is never zero


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
class KQuantFormat:
    """A llama.cpp k-quant. One 256-weight super-block (ggml's block_qN_K, little-endian):

      Q2_K  84 B: scales[16]: low nibble ls, high nibble lm | qs[64]: 2-bit codes | d f16 | dmin f16
      Q3_K 110 B: hmask[32]: bit 2 of codes | qs[64]: bits 0-1 | scales[12]: 16 x 6-bit (ls + 32) | d f16
      Q4_K 144 B: d f16 | dmin f16 | scales[12]: 8 x 6-bit ls, 8 x 6-bit lm | qs[128]: 4-bit codes
      Q5_K 176 B: d f16 | dmin f16 | scales[12] as Q4_K | qh[32]: bit 4 of codes | qs[128]: bits 0-3
      Q6_K 210 B: ql[128]: bits 0-3 | qh[64]: bits 4-5 | scales[16]: int8 ls | d f16

    Code c of sub-block j is worth (d*ls_j)*c - dmin*lm_j (Q2/Q4/Q5_K, ls and lm unsigned) or
    (d*ls_j)*(c - 2^(bits-1)) (Q3/Q6_K, ls signed). The exact bit positions are in
    `export/gguf_types.py`; the sizes here follow from the widths and the tests check them against gguf's.
    """

    type_name: str
    kind = "kquant"

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

    def to_dict(self) -> dict:
        return {"kind": self.kind, "type_name": self.type_name}


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
class KQuantTensor:
    """A k-quant weight: its grid and uint8 codes [out, in] in [0, 2^bits), original column order."""

    grid: KQuantGrid
    codes: torch.Tensor

    @property
    def fmt(self) -> KQuantFormat:
        return self.grid.fmt

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def stored_bits(self) -> int:
        return self.fmt.stored_bits(*self.shape)

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


# --- fitting ----------------------------------------------------------------------------------
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


def _codes(x, scale, zero, fmt: KQuantFormat):
    """Float codes for x against per-sub-block scale/zero [N, J] (encode's rounding, kept in float)."""
    if fmt.symmetric:
        q = torch.round(x / scale[..., None]) + (1 << (fmt.bits - 1))
    else:
        q = torch.round((x - zero[..., None]) / scale[..., None])
    return q.clamp(0, fmt.qmax)


def _err(x, w, c, scale, zero, fmt: KQuantFormat):
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


def _search_affine(x, w, fmt: KQuantFormat, steps, reassign: int = 1):
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


def _search_symmetric(x, w, fmt: KQuantFormat, steps, both_sides: bool = True):
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


def _search_steps(fmt: KQuantFormat) -> list[float]:
    """Candidate offsets to nmax (asymmetric) or h (symmetric) of the sub-block search."""
    if fmt.symmetric:
        return [0.1 * k for k in range(-9, 10)]
    if fmt.qmax == 3:
        return [-0.5 + 0.1 * k for k in range(16)]
    return [-1.0 + 0.1 * k for k in range(21)]


def _fit_blocks(x, w, fmt: KQuantFormat, rounds: int, reassign: int = 1, both_sides: bool = True):
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

