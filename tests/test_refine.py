"""Grid refinement: the clip search and the least-squares refit only ever lower the error."""

import pytest
import torch

from sizewise.quant.uniform import QuantFormat
from sizewise.quant.grid import fit, grouped
from sizewise.quant.uniform import rtn
from sizewise.quant.refine import group_error, lsq_refit, mse_clip
from sizewise.quant.uniform import rtn_refined

FORMATS = [QuantFormat(2, 32), QuantFormat(3, 32, symmetric=True), QuantFormat(4, None),
           QuantFormat(3, 16, zero="float16"), QuantFormat(2, None, symmetric=True)]


def _heavy_tailed(out=48, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Student-t-like weights: a few large entries per group, where clipping pays.
    return 0.02 * torch.randn(out, inp, generator=g) / (torch.rand(out, inp, generator=g) + 0.05) ** 0.5


def _channel_weight(inp=128, seed=1):
    return torch.exp(2 * torch.randn(inp, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_clip_never_worse_and_often_better(fmt, weighted):
    w = _heavy_tailed()
    cw = _channel_weight() if weighted else None
    clip = mse_clip(w, fmt, weight=cw)
    groups = 128 // fmt.group_len(128)
    assert clip.shape == (48, groups)
    e_clip = group_error(w, fmt, clip, weight=cw)
    e_one = group_error(w, fmt, 1.0, weight=cw)
    assert (e_clip <= e_one).all()
    assert e_clip.sum() < 0.97 * e_one.sum()
    # Not a tautology: a grid without 1.0 (here, only a far too tight clip) makes groups worse.
    worse = group_error(w, fmt, mse_clip(w, fmt, weight=cw, grid=(0.1,)), weight=cw) > e_one
    assert worse.any()


def test_mse_clip_matches_per_group_brute_force():
    w = _heavy_tailed(out=6, inp=64)
    fmt = QuantFormat(3, 16)
    cw = _channel_weight(64)
    grid = (1.0, 0.9, 0.8, 0.7, 0.6)
    clip = mse_clip(w, fmt, weight=cw, grid=grid)
    for r in range(6):
        for gi in range(4):
            cols = slice(16 * gi, 16 * gi + 16)
            errs = []
            for c in grid:
                q = rtn(w[r:r + 1, cols], QuantFormat(3, None), clip=c).dequantize()
                errs.append(float(((q - w[r:r + 1, cols]) ** 2 * cw[cols]).sum()))
            best = min(range(len(grid)), key=lambda k: (errs[k], k))
            assert clip[r, gi] == pytest.approx(grid[best])


def test_weighted_search_minimizes_the_weighted_error():
    w = _heavy_tailed()
    fmt = QuantFormat(2, 32)
    cw = _channel_weight()
    e_w = group_error(w, fmt, mse_clip(w, fmt, weight=cw), weight=cw)
    e_u = group_error(w, fmt, mse_clip(w, fmt), weight=cw)
    assert (e_w <= e_u).all() and e_w.sum() < e_u.sum()


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_rtn_refined_not_above_rtn(fmt):
    w = _heavy_tailed()
    q0, q1 = rtn(w, fmt), rtn_refined(w, fmt)
    assert q1.codes.shape == q0.codes.shape and q1.scales.dtype == q0.scales.dtype
    e0 = grouped((q0.dequantize() - w) ** 2, fmt).sum(-1)
    e1 = grouped((q1.dequantize() - w) ** 2, fmt).sum(-1)
    assert (e1 <= e0 * (1 + 1e-6)).all() and e1.sum() < e0.sum()
    q2 = rtn_refined(w, fmt, refit_iters=3)
    e2 = grouped((q2.dequantize() - w) ** 2, fmt).sum(-1)
    assert (e2 <= e1 * (1 + 1e-6)).all()


def test_lsq_refit_pays_for_float_zeros():
    w = _heavy_tailed()
    fmt = QuantFormat(2, 32, zero="float16")
    wg = grouped(w, fmt)
    scale, zero = fit(wg, fmt, mse_clip(w, fmt))
    s2, z2 = lsq_refit(w, fmt, scale, zero, iters=4)
    assert s2.shape == scale.shape and z2.shape == zero.shape
    assert torch.equal(s2, s2.half().float()) and torch.equal(z2, z2.half().float())  # storable
    e_before = ((rtn(w, fmt, clip=mse_clip(w, fmt)).dequantize() - w) ** 2).sum()
    q = rtn_refined(w, fmt, refit_iters=4)
    e_after = ((q.dequantize() - w) ** 2).sum()
    assert e_after < 0.97 * e_before
