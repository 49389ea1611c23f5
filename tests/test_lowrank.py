"""Low-rank factors: the whitened correction lowers the output error more than the plain SVD, the pure
factorization likewise; exact stored bits counted from the parts; bit-exact round trips."""

import pytest
import torch

from sizewise.artifact import part_tensor, part_value
from sizewise.errors import SizewiseError
from sizewise.observers import Gram, LinearStats
from sizewise.quant import methods
from sizewise.quant.formats import FloatFormat
from sizewise.quant.lowrank import LowRankFormat, whitened_factors
from sizewise.quant.registry import format_from_dict
from sizewise.quant.sparse import SparseFormat
from sizewise.quant.uniform import QuantFormat
from test_gptq import _data


def _stats(x):
    s = LinearStats.empty(x.shape[1], "cpu", (Gram(),))
    s.add(x)
    return s


def _out_err(w, wq, h):
    d = (w - wq).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_whitened_correction_beats_plain_svd(method):
    w, x = _data(seed=2)
    h = x.T @ x
    base = QuantFormat(3, 32)
    q = methods.solve(method, w, _stats(x), base)
    lr = methods.solve(method, w, _stats(x), LowRankFormat(base, 8))
    assert torch.equal(lr.base.codes, q.codes)               # the base is the method's own result
    r = w - q.dequantize()
    a, b = whitened_factors(r, 8, None)
    e_base, e_plain, e_white = (_out_err(w, q.dequantize(), h), _out_err(w, q.dequantize() + b @ a, h),
                                _out_err(w, lr.dequantize(), h))
    assert e_white < 0.9 * e_plain < 0.9 * e_base


def test_whitened_factors_are_the_optimum():
    """No rank-r matrix does better on ‖(R − BA)Xᵀ‖ than the whitened SVD; compare with random perturbations
    and with the exact rank-r solution via the SVD of X Rᵀ (X of full column rank)."""
    g = torch.Generator().manual_seed(0)
    r, x = torch.randn(16, 24, generator=g), torch.randn(200, 24, generator=g) @ torch.randn(24, 24, generator=g)
    h = x.T @ x
    a, b = whitened_factors(r, 4, h, damp=0.0)
    best = _out_err(r, b @ a, h)
    for _ in range(5):
        da = 1e-2 * torch.randn(a.shape, generator=g)
        assert _out_err(r, b @ (a + da), h) >= best - 1e-6
    u, s, vh = torch.linalg.svd((x @ r.T).double(), full_matrices=False)
    exact = float((s[4:] ** 2).sum())          # the error of the best rank-4 approximation of X Rᵀ
    assert best == pytest.approx(exact, rel=1e-3)


def test_pure_factorization_whitened_beats_plain():
    w, x = _data(seed=4)
    h = x.T @ x
    fmt = LowRankFormat(None, 16)
    white = methods.solve("svd", w, _stats(x), fmt)
    plain = fmt.round(w)
    assert white.base is None and _out_err(w, white.dequantize(), h) < _out_err(w, plain.dequantize(), h)
    with pytest.raises(SizewiseError, match="--lowrank"):
        methods.solve("svd", w, _stats(x), QuantFormat(4, 32))


@pytest.mark.parametrize("fmt", [LowRankFormat(QuantFormat(3, 32), 8), LowRankFormat(None, 5, "bfloat16"),
                                 LowRankFormat(SparseFormat(QuantFormat(4, 32, symmetric=True), "2:4"), 4),
                                 LowRankFormat(QuantFormat(4, 32, symmetric=True), 3, "float32")], ids=str)
def test_stored_bits_count_the_parts_and_round_trip(fmt):
    w, x = _data()
    method = "svd" if fmt.base is None else ("sparsegpt+gptq" if "sparse" in fmt.label else "gptq")
    st = methods.solve(method, w, _stats(x), fmt)
    parts = fmt.parts(*st.shape)
    values = fmt.to_parts(st)
    assert sum(part_tensor(p, values[p.suffix]).numel() * 8 if p.code_bits else p.numel * p.bits_per_value
               for p in parts) >= st.stored_bits()
    assert sum(p.numel * p.bits_per_value for p in parts) == st.stored_bits() == fmt.stored_bits(*st.shape)
    back = fmt.from_parts({p.suffix: part_value(p, part_tensor(p, values[p.suffix])) for p in parts}, st.shape)
    assert torch.equal(back.dequantize(), st.dequantize())
    assert format_from_dict(fmt.to_dict()) == fmt
    assert fmt.ggml_type == (None if fmt.base is None else fmt.base.ggml_type)


def test_bad_factor_formats_are_one_line_errors():
    for bad in (lambda: LowRankFormat(FloatFormat(), 4), lambda: LowRankFormat(None, 0),
                lambda: LowRankFormat(None, 4, "int3"), lambda: LowRankFormat(None, 100).check(64),
                lambda: format_from_dict({"kind": "lowrank", "base": {"kind": "nope"}, "rank": 2})):
        with pytest.raises(SizewiseError):
            bad()
    fmt = LowRankFormat(None, 4)
    with pytest.raises(SizewiseError, match="do not fit"):
        fmt.from_parts({"lora_a": torch.zeros(4, 8, dtype=torch.float16),
                        "lora_b": torch.zeros(3, 2, dtype=torch.float16)}, (3, 8))
