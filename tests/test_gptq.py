"""GPTQ: beats round-to-nearest on correlated inputs, matches a slow reference, stays on the grid."""

import pytest
import torch

from sizewise.errors import SizewiseError
from sizewise.quant.uniform import QuantFormat
from sizewise.quant.gptq import gptq, hessian_factor
from sizewise.quant.grid import decode, encode, fit, grouped
from sizewise.quant.uniform import rtn
from sizewise.quant.codebook import CodebookFormat
from sizewise.quant.kquant import KQuantFormat


def _data(out=64, inp=128, tokens=512, seed=0):
    """Weights and inputs X = Z @ A: a random mixing A makes the input channels correlated,
    and per-channel gains make diag(XᵀX) uneven (as in real activations)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(inp, inp, generator=g) / inp ** 0.5 + 0.3 * torch.eye(inp)
    x = (torch.randn(tokens, inp, generator=g) @ a) * torch.exp(0.5 * torch.randn(inp, generator=g))
    w = 0.02 * torch.randn(out, inp, generator=g)
    return w, x


def _out_err(w, q, x):
    return float((x @ (w - q.dequantize()).T).norm())


FORMATS = [QuantFormat(b, gs, sym) for b in (2, 3, 4) for gs in (None, 32) for sym in (False, True)]
FORMATS.append(QuantFormat(3, 32, zero="float16"))


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_not_above_rtn(fmt, act_order):
    w, x = _data()
    e_gptq = _out_err(w, gptq(w, x.T @ x, fmt, act_order=act_order), x)
    e_rtn = _out_err(w, rtn(w, fmt), x)
    assert e_gptq <= e_rtn
    if act_order and fmt.bits >= 3:
        assert e_gptq < 0.95 * e_rtn  # a clear gain, not a tie


@pytest.mark.parametrize("fmt", [QuantFormat(2, 32), QuantFormat(4, None, symmetric=True)], ids=str)
def test_clip_search_helps_gptq(fmt):
    w, x = _data()
    w[0, 5] *= 12                                       # outliers make clipping worthwhile
    w[7, 40] *= -12
    e_plain = _out_err(w, gptq(w, x.T @ x, fmt), x)
    e_clip = _out_err(w, gptq(w, x.T @ x, fmt, clip_search=True), x)
    assert e_clip <= e_plain


def _reference_gptq(w, h, fmt, act_order):
    """Column by column in float64, removing each column from H⁻¹ explicitly (no Cholesky, no
    blocks); group grids as `gptq` defines them."""
    inp = w.shape[1]
    g = fmt.group_len(inp)
    hd = h.double().clone()
    hd.diagonal().add_(0.01 * hd.diagonal().mean())
    perm = torch.sort(h.diagonal(), descending=True, stable=True).indices if act_order else torch.arange(inp)
    hinv = torch.linalg.inv(hd)[perm][:, perm]
    cur = w.double()[:, perm].clone()
    static = act_order or g == inp
    if static:
        scale, zero = fit(grouped(w, fmt), fmt)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for j in range(inp):
        col = int(perm[j])
        if static:
            s, z = scale[:, col // g], None if zero is None else zero[:, col // g]
        elif j % g == 0:
            s, z = fit(cur[:, j:j + g].float(), fmt)
        codes[:, col] = encode(cur[:, j].float(), s, z, fmt)
        err = (cur[:, j] - decode(codes[:, col], s, z, fmt).double()) / hinv[j, j]
        cur[:, j + 1:] -= err[:, None] * hinv[j, j + 1:]
        hinv[j + 1:, j + 1:] -= torch.outer(hinv[j + 1:, j], hinv[j, j + 1:]) / hinv[j, j]
    return codes


@pytest.mark.parametrize("fmt,act_order,block_size", [
    (QuantFormat(3, 32), False, 20),       # groups straddle blocks: pending updates must be applied
    (QuantFormat(3, 32), False, 128),
    (QuantFormat(2, 16, symmetric=True), True, 24),
    (QuantFormat(4, None), True, 128),
])
def test_matches_slow_reference(fmt, act_order, block_size):
    w, x = _data(out=32, inp=96, tokens=400, seed=1)
    h = x.T @ x
    q = gptq(w, h, fmt, act_order=act_order, block_size=block_size)
    ref = _reference_gptq(w, h, fmt, act_order)
    assert (q.codes == ref).float().mean() > 0.995


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("fmt", [QuantFormat(3, 16), QuantFormat(4, None, symmetric=True)], ids=str)
def test_diagonal_hessian_is_rtn(fmt, act_order):
    """Uncorrelated inputs leave nothing to compensate: codes and grids must be RTN's exactly,
    in original column order even though act_order processes them in a shuffled order."""
    w, _ = _data(out=16, inp=64)
    diag = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.1
    q = gptq(w, torch.diag(diag), fmt, act_order=act_order, block_size=24)
    r = rtn(w, fmt)
    assert torch.equal(q.codes, r.codes)
    assert torch.equal(q.scales, r.scales)
    assert (q.zeros is None) == (r.zeros is None) and (q.zeros is None or torch.equal(q.zeros, r.zeros))


@pytest.mark.parametrize("fmt", [QuantFormat(2, 32), QuantFormat(3, None, symmetric=True),
                                 QuantFormat(4, 16, zero="float16", scale_dtype="bfloat16")], ids=str)
def test_layouts_and_grid(fmt):
    w, x = _data()
    h = x.T @ x
    a, b = gptq(w, h, fmt, act_order=True), gptq(w, h, fmt, act_order=False)
    groups = 128 // fmt.group_len(128)
    for q in (a, b):
        assert q.codes.shape == (64, 128) and q.codes.dtype == torch.uint8
        assert q.scales.shape == (64, groups) and q.scales.dtype == r_dtype(fmt)
        if fmt.symmetric:
            assert q.zeros is None
        else:
            assert q.zeros.shape == (64, groups)
            assert q.zeros.dtype == (torch.uint8 if fmt.zero == "int" else torch.float16)
        assert int(q.codes.max()) <= fmt.qmax
        deq = grouped(q.dequantize(), fmt)
        for row in range(0, 64, 9):
            for grp in range(groups):
                assert deq[row, grp].unique().numel() <= 2 ** fmt.bits
    # The two orders quantize differently, but into the same storage.
    assert not torch.equal(a.codes, b.codes)


def r_dtype(fmt):
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[fmt.scale_dtype]


def test_dead_input_channels():
    w, x = _data()
    dead = [0, 17, 18, 127]
    x[:, dead] = 0
    h = x.T @ x
    for fmt in (QuantFormat(3, 32), QuantFormat(4, None, symmetric=True)):
        for act_order in (True, False):
            q = gptq(w, h, fmt, act_order=act_order)
            deq = q.dequantize()
            assert torch.isfinite(deq).all()
            assert (deq[:, dead] == 0).all()          # zero lies on these grids
            assert _out_err(w, q, x) <= _out_err(w, rtn(w, fmt), x)


def test_rank_deficient_and_zero_hessian():
    w, x = _data(tokens=12)                           # 12 tokens for 128 inputs: rank 12
    h = x.T @ x
    for act_order in (True, False):
        q = gptq(w, h, QuantFormat(3, 32), act_order=act_order)
        assert torch.isfinite(q.dequantize()).all()
        assert _out_err(w, q, x) <= _out_err(w, rtn(w, QuantFormat(3, 32)), x)
    # Singular without damping: the retry must add damping rather than divide by ~0.
    f = hessian_factor(h.double().float(), damp=0.0)
    assert f.damp > 0 and torch.isfinite(f.u).all()
    assert torch.isfinite(gptq(w, h, QuantFormat(3, 32), damp=0.0).dequantize()).all()
    # No input ever fired: every channel is dead, the weight quantizes to zero.
    q = gptq(w, torch.zeros(128, 128), QuantFormat(4, 32))
    assert (q.dequantize() == 0).all()


def test_bad_inputs_raise():
    w, x = _data()
    h = x.T @ x
    h[3, 3] = float("nan")
    with pytest.raises(SizewiseError):
        gptq(w, h, QuantFormat(4, 32))
    with pytest.raises(SizewiseError):
        gptq(w, torch.eye(64), QuantFormat(4, 32))                  # wrong width
    with pytest.raises(SizewiseError):
        gptq(w, torch.eye(128), QuantFormat(4, 48))                 # group does not tile 128


def test_shared_factor_gives_same_result():
    w, x = _data()
    h = x.T @ x
    fmt = QuantFormat(3, 32)
    f = hessian_factor(h, act_order=True)
    assert torch.equal(gptq(w, h, fmt, factor=f).codes, gptq(w, h, fmt).codes)
    with pytest.raises(SizewiseError):
        gptq(w, h, fmt, act_order=False, factor=f)


def test_input_dtype_and_no_mutation():
    w, x = _data()
    h = x.T @ x
    w16, h0, w0 = w.to(torch.bfloat16), h.clone(), w.clone()
    q = gptq(w16, h, QuantFormat(4, 32))
    assert torch.isfinite(q.dequantize()).all()
    gptq(w, h, QuantFormat(4, 32))
    assert torch.equal(h, h0) and torch.equal(w, w0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w, x = _data()
    h = x.T @ x
    fmt = QuantFormat(3, 32)
    for act_order in (True, False):
        qc = gptq(w.cuda(), h.cuda(), fmt, act_order=act_order, clip_search=True)
        assert qc.codes.is_cuda and qc.scales.is_cuda
        q = gptq(w, h, fmt, act_order=act_order, clip_search=True)
        assert (qc.codes.cpu() == q.codes).float().mean() > 0.99


def _reference_fixed_grid(w, h, fmt):
    """GPTQ on a format's fixed grid (k-quants, IQ4_NL, MXFP4), column by column in float64 with
    H⁻¹ updated explicitly (no Cholesky, no lazy blocks), act_order; the grid is the one the format
    fits up front from diag(XᵀX)."""
    inp = w.shape[1]
    hd = h.double().clone()
    hd.diagonal().add_(0.01 * hd.diagonal().mean())
    perm = torch.sort(h.diagonal(), descending=True, stable=True).indices
    hinv = torch.linalg.inv(hd)[perm][:, perm]
    grid = fmt.fixed_grid(w, h.diagonal())
    cur = w.double()[:, perm].clone()
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for j in range(inp):
        col = int(perm[j])
        s, z = grid.scale[:, col], None if grid.zero is None else grid.zero[:, col]
        codes[:, col] = grid.encode(cur[:, j].float(), s, z)
        err = (cur[:, j] - grid.decode(codes[:, col], s, z).double()) / hinv[j, j]
        cur[:, j + 1:] -= err[:, None] * hinv[j, j + 1:]
        hinv[j + 1:, j + 1:] -= torch.outer(hinv[j + 1:, j], hinv[j, j + 1:]) / hinv[j, j]
    return codes


@pytest.mark.parametrize("fmt", [KQuantFormat(t) for t in ("Q2_K", "Q3_K", "Q4_K", "Q6_K")]
                         + [CodebookFormat("IQ4_NL"), CodebookFormat("MXFP4")], ids=lambda f: f.label)
def test_fixed_grids_match_slow_reference_across_blocks(fmt):
    """512 input columns: four of GPTQ's default 128-column blocks, so every column's error reaches
    columns of later blocks only through the lazy block update."""
    w, x = _data(out=16, inp=512, tokens=1024, seed=2)
    h = x.T @ x
    q = gptq(w, h, fmt)                               # default block size
    ref = _reference_fixed_grid(w, h, fmt)
    assert (q.codes == ref).float().mean() > 0.995
    e_q, e_rtn = _out_err(w, q, x), _out_err(w, fmt.round(w, h.diagonal()), x)
    assert e_q < 0.95 * e_rtn


@pytest.mark.parametrize("act_order", [True, False])
def test_factor_is_the_upper_cholesky_of_the_damped_inverse(act_order):
    """U (computed in place, from H index-reversed, several blocks deep) satisfies UᵀU = (H + λI)⁻¹
    in processing order, with dead channels pinned."""
    torch.manual_seed(3)
    n = 300                                          # > 2 leaves of the block recursion
    x = torch.randn(900, n, dtype=torch.float64) * torch.rand(n, dtype=torch.float64) * 3
    x[:, [4, 77]] = 0
    xtx = (x.t() @ x).float()
    f = hessian_factor(xtx, damp=0.01, act_order=act_order)
    h = xtx.double()
    h[f.dead, :] = 0
    h[:, f.dead] = 0
    h.diagonal()[f.dead] = 1
    h = h[f.perm][:, f.perm]
    h.diagonal().add_(f.damp * float(h.diagonal().mean()))
    u = f.u.double()
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    assert torch.allclose(u.t() @ u, torch.linalg.inv(h), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_reverse_in_place_is_flip_both_ways(n):
    from sizewise.quant.gptq import _reverse_in_place

    m = torch.randn(n, n, dtype=torch.float64)
    want = m.flip(0, 1)
    _reverse_in_place(m, chunk=3)          # chunks smaller than the matrix: the seams are exercised
    assert torch.equal(m, want)
