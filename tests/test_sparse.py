"""Pruning: SparseGPT against a slow float64 reference, N:M and per-row counts, Wanda's choice, SparseGPT
beating magnitude, and the sparse format's exact stored bits and bit-exact round trips."""

import math

import pytest
import torch

from sizewise.artifact import part_tensor, part_value
from sizewise.errors import SizewiseError
from sizewise.quant.formats import FloatFormat
from sizewise.quant.grid import decode, encode, fit, grouped
from sizewise.quant.registry import format_from_dict
from sizewise.quant.sparse import SparseFormat, parse_pattern
from sizewise.quant.sparsegpt import sparsegpt
from sizewise.quant.uniform import QuantFormat
from sizewise.quant.sparse import keep_mask, prune_by_score
from sizewise.quant.wanda import magnitude, wanda
from test_gptq import _data as gptq_data


def _data(out=32, inp=96, tokens=400, seed=1):
    return gptq_data(out, inp, tokens, seed)


def _reference(w, h, keep, fmt=None):
    """Column by column in float64 with an explicit inverse Hessian (no Cholesky, no blocks), pruning
    exactly `keep`'s zeros and rounding the kept weights to `fmt`'s per-channel grid if given."""
    inp = w.shape[1]
    hd = h.double().clone()
    hd.diagonal().add_(0.01 * hd.diagonal().mean())
    hinv = torch.linalg.inv(hd)
    cur = w.double().clone()
    out = torch.zeros_like(cur)
    if fmt is not None:
        scale, zero = fit(grouped(w, fmt), fmt)
        scale, zero = scale[:, 0], None if zero is None else zero[:, 0]
    for j in range(inp):
        q = cur[:, j].clone()
        if fmt is not None:
            q = decode(encode(q.float(), scale, zero, fmt), scale, zero, fmt).double()
        q = torch.where(keep[:, j], q, 0.0)
        out[:, j] = q
        err = (cur[:, j] - q) / hinv[j, j]
        cur[:, j + 1:] -= err[:, None] * hinv[j, j + 1:]
        hinv[j + 1:, j + 1:] -= torch.outer(hinv[j + 1:, j], hinv[j, j + 1:]) / hinv[j, j]
    return out


@pytest.mark.parametrize("pattern,block", [("2:4", 16), ("4:8", 128), ("50%", 20), ("50%", 128)])
def test_sparsegpt_matches_slow_reference(pattern, block):
    w, x = _data()
    h = x.T @ x
    st = sparsegpt(w, h, SparseFormat(FloatFormat("float32"), pattern), block_size=block)
    ref = _reference(w, h, st.keep)
    assert torch.allclose(st.dequantize().double(), ref, atol=1e-5, rtol=1e-4)


def test_sparsegpt_joint_matches_reference():
    """Pruned and quantized in one pass (per-channel grid fitted up front): the codes GPTQ's loop chose."""
    w, x = _data()
    h = x.T @ x
    fmt = QuantFormat(4, None)
    st = sparsegpt(w, h, SparseFormat(fmt, "2:4"), block_size=32)
    ref = _reference(w, h, st.keep, fmt)
    close = (st.dequantize().double() - ref).abs() < 1e-5
    assert close.float().mean() > 0.995


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "50%", "30%"])
def test_masks_keep_the_pattern(pattern):
    w, x = _data()
    sp = parse_pattern(pattern)
    for st in (sparsegpt(w, x.T @ x, SparseFormat(FloatFormat(), pattern), block_size=32),
               magnitude(w, SparseFormat(FloatFormat(), pattern))):
        keep = st.keep
        if sp.nm:
            assert (keep.reshape(32, -1, sp.m).sum(-1) == sp.n).all()
        else:
            assert (keep.sum(1) == 96 - round(96 * sp.fraction)).all()
        assert (st.dequantize()[~keep] == 0).all()


def test_wanda_prunes_the_smallest_weight_times_norm():
    w, x = _data()
    from sizewise.observers import LinearStats, SqSum
    stats = LinearStats.empty(96, "cpu", (SqSum(),))
    stats.add(x)
    st = wanda(w, stats, SparseFormat(FloatFormat("float32"), "2:4"))
    score = w.abs() * x.norm(dim=0)
    g = score.reshape(32, -1, 4)
    kept = g.topk(2, dim=-1).values.min(-1).values
    pruned = g.masked_fill(st.keep.reshape(32, -1, 4), float("-inf")).max(-1).values
    assert (pruned <= kept).all()
    # Wanda is not magnitude: some choice differs when the channel norms are uneven
    assert not torch.equal(st.keep, magnitude(w, SparseFormat(FloatFormat("float32"), "2:4")).keep)
    assert torch.equal(st.dequantize()[st.keep], w[st.keep])


def test_sparsegpt_beats_magnitude_and_wanda_on_output_error():
    """tr(ΔW XᵀX ΔWᵀ) with correlated inputs: the OBS update must pay off, at 50% and at 2:4."""
    from sizewise.observers import LinearStats, SqSum
    w, x = _data(out=64, inp=128, tokens=800, seed=3)
    h = x.T @ x
    stats = LinearStats.empty(128, "cpu", (SqSum(),))
    stats.add(x)

    def err(st):
        d = (w - st.dequantize()).double()
        return float(torch.einsum("oi,ij,oj->", d, h.double(), d))

    for pattern in ("50%", "2:4"):
        fmt = SparseFormat(FloatFormat("float32"), pattern)
        e_sgpt, e_wanda, e_mag = err(sparsegpt(w, h, fmt)), err(wanda(w, stats, fmt)), err(magnitude(w, fmt))
        assert e_sgpt < 0.9 * e_wanda and e_wanda < 0.7 * e_mag


def test_nm_needs_natural_order_and_fitting_sizes():
    w, x = _data()
    with pytest.raises(SizewiseError, match="act_order"):
        sparsegpt(w, x.T @ x, SparseFormat(FloatFormat(), "2:4"), act_order=True)
    with pytest.raises(SizewiseError, match="multiple of 8"):
        SparseFormat(FloatFormat(), "4:8").check(100)
    for bad in ("3:2", "0%", "abc", "2:4:8"):
        with pytest.raises(SizewiseError):
            parse_pattern(bad)


FMTS = [SparseFormat(FloatFormat("float16"), "2:4"), SparseFormat(FloatFormat("bfloat16"), "50%"),
        SparseFormat(QuantFormat(4, 32), "2:4"), SparseFormat(QuantFormat(3, None, symmetric=True), "4:8"),
        SparseFormat(QuantFormat(4, 32, zero="float16"), "50%")]


@pytest.mark.parametrize("fmt", FMTS, ids=str)
def test_stored_bits_count_the_parts_and_round_trip(fmt):
    w, x = _data()
    st = sparsegpt(w, x.T @ x, fmt, block_size=32)
    out, inp = st.shape
    parts = fmt.parts(out, inp)
    values = fmt.to_parts(st)
    counted = 0
    for p in parts:
        v = values[p.suffix]
        assert tuple(v.shape) == p.shape
        stored = part_tensor(p, v)
        counted += stored.numel() * stored.element_size() * 8 if p.code_bits is None else p.numel * p.code_bits
        assert (stored.numel() * stored.element_size() == p.nbytes)
    assert counted == fmt.stored_bits(out, inp) == st.stored_bits()
    sp = fmt.spec
    mask_bits = out * inp // sp.m * math.ceil(math.log2(math.comb(sp.m, sp.n))) if sp.nm else out * inp
    assert parts[0].numel * parts[0].code_bits == mask_bits
    # bit-exact back through the packed bytes, and through JSON
    back = fmt.from_parts({p.suffix: part_value(p, part_tensor(p, values[p.suffix])) for p in parts}, (out, inp))
    assert torch.equal(back.dequantize(), st.dequantize()) and torch.equal(back.keep, st.keep)
    assert format_from_dict(fmt.to_dict()) == fmt


def test_corrupt_masks_are_one_line_errors():
    fmt = SparseFormat(FloatFormat(), "2:4")
    w = torch.randn(4, 16)
    st = magnitude(w, fmt)
    parts = fmt.to_parts(st)
    bad = dict(parts, mask=torch.full_like(parts["mask"], 7))
    with pytest.raises(SizewiseError, match="out of range"):
        fmt.from_parts(bad, (4, 16))
    fmt = SparseFormat(FloatFormat(), "50%")
    parts = fmt.to_parts(magnitude(w, fmt))
    with pytest.raises(SizewiseError, match="every row"):
        fmt.from_parts(dict(parts, mask=torch.ones_like(parts["mask"])), (4, 16))


def test_kept_quantized_then_magnitude_keeps_count():
    w = torch.randn(8, 64)
    st = prune_by_score(w, w.abs(), SparseFormat(QuantFormat(4, 32, symmetric=True), "2:4"))
    assert torch.equal(st.keep, keep_mask(w.abs(), parse_pattern("2:4")))
    assert (st.dequantize()[~st.keep] == 0).all()


def test_sparse_keeps_plain_values_only():
    from sizewise.quant.lowrank import LowRankFormat
    for inner in (SparseFormat(FloatFormat(), "2:4"), LowRankFormat(None, 2)):
        with pytest.raises(SizewiseError, match="plain values"):
            SparseFormat(inner, "2:4")
    with pytest.raises(SizewiseError, match="no value per weight"):
        from sizewise.quant.kquant import KQuantFormat
        SparseFormat(KQuantFormat("Q4_K"), "2:4").check(256)
