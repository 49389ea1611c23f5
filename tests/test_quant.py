import numpy as np
import pytest
import torch

from sizewise.errors import SizewiseError
from sizewise.quant.formats import FloatFormat
from sizewise.quant.registry import format_from_dict
from sizewise.quant.uniform import QuantFormat
from sizewise.quant.grid import decode
from sizewise.quant.uniform import rtn
from sizewise.quant.pack import pack_bits, packed_nbytes, unpack_bits

FORMATS = [QuantFormat(b, g, s, zero=z) for b in (2, 3, 4, 8) for g in (None, 32)
           for s, z in ((False, "int"), (True, "int"), (False, "float16"))]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_rtn_error_at_most_half_a_step(fmt):
    torch.manual_seed(0)
    w = torch.randn(16, 96) * torch.rand(16, 1) * 3
    qt = rtn(w, fmt)
    g = fmt.group_len(96)
    step = qt.scales.float().repeat_interleave(g, dim=1)
    err = (qt.dequantize() - w).abs()
    assert (err <= step * 0.5 * (1 + 1e-2) + 1e-6).all(), (err / step).max()


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_codes_fit_the_bit_width(fmt):
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    qt = rtn(w, fmt)
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) < 2 ** fmt.bits
    for row in qt.codes.reshape(8, -1, fmt.group_len(64)).reshape(-1, fmt.group_len(64)):
        assert row.unique().numel() <= 2 ** fmt.bits


def test_more_bits_less_error():
    torch.manual_seed(2)
    w = torch.randn(32, 128)
    errs = [(rtn(w, QuantFormat(b, 32)).dequantize() - w).pow(2).mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_bits_per_weight_arithmetic():
    # 4-bit codes + fp16 scale + 4-bit zero per 64 weights = 4 + 20/64
    assert QuantFormat(4, 64).stored_bits(10, 576) == 10 * 576 * 4 + 10 * 9 * (16 + 4)
    assert QuantFormat(3, None, symmetric=True).stored_bits(7, 100) == 7 * 100 * 3 + 7 * 16
    assert QuantFormat(4, 32, zero="float16").stored_bits(1, 64) == 64 * 4 + 2 * 32
    assert QuantFormat(8, 32, scale_dtype="float32").stored_bits(2, 64) == 2 * 64 * 8 + 4 * (32 + 8)
    assert FloatFormat("float16").stored_bits(3, 5) == 240


def test_group_size_that_does_not_divide_names_the_ones_that_do():
    with pytest.raises(SizewiseError, match="group size 128 does not divide the input dimension 576.*64.*96.*192.*288"):
        QuantFormat(4, 128).check(576)


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(bits=4, group_size=0), dict(bits=4, scale_dtype="int8")])
def test_bad_format_parameters(bad):
    with pytest.raises(SizewiseError):
        QuantFormat(**bad)


def test_format_dict_round_trip():
    for fmt in FORMATS + [FloatFormat("bfloat16")]:
        assert format_from_dict(fmt.to_dict()) == fmt


def test_constant_and_zero_groups_decode_exactly():
    w = torch.zeros(4, 32)
    w[1] = 0.5
    for fmt in (QuantFormat(4, 32), QuantFormat(4, 32, symmetric=True), QuantFormat(4, 32, zero="float16")):
        assert torch.equal(rtn(w, fmt).dequantize()[0], w[0])
    # An asymmetric grid has a point at the group's max; a symmetric one is off by at most half a step.
    assert (rtn(w, QuantFormat(4, 32)).dequantize()[1] - 0.5).abs().max() < 1e-3
    assert (rtn(w, QuantFormat(4, 32, zero="float16")).dequantize()[1] - 0.5).abs().max() < 1e-3
    sym = rtn(w, QuantFormat(4, 32, symmetric=True))
    assert (sym.dequantize()[1] - 0.5).abs().max() <= sym.scales[1].float().max() / 2 + 1e-6


def test_decode_definitions():
    codes = torch.tensor([0, 7, 15], dtype=torch.uint8)
    s = torch.tensor(0.5)
    assert decode(codes, s, None, QuantFormat(4, symmetric=True)).tolist() == [-4.0, -0.5, 3.5]
    assert decode(codes, s, torch.tensor(3.0), QuantFormat(4)).tolist() == [-1.5, 2.0, 6.0]
    assert decode(codes, s, torch.tensor(-1.0), QuantFormat(4, zero="float16")).tolist() == [-1.0, 2.5, 6.5]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 1001])
def test_bit_packing_round_trip(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(0, 2 ** bits, size=count).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.size == packed_nbytes(count, bits)
    assert np.array_equal(unpack_bits(packed, bits, count), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_lays_code_j_bit_i_at_stream_bit_j_times_bits_plus_i(bits, monkeypatch):
    """The documented layout, against a bit-by-bit reference, across slice boundaries."""
    from sizewise.quant import pack

    monkeypatch.setattr(pack, "_SLICE", 16)
    count = 16 * 3 + 5
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=count).astype(np.uint8)
    stream = [(int(c) >> i) & 1 for c in codes for i in range(bits)]
    stream += [0] * (-len(stream) % 8)
    want = [sum(stream[8 * b + i] << i for i in range(8)) for b in range(len(stream) // 8)]
    assert pack_bits(codes, bits).tolist() == want
    assert np.array_equal(unpack_bits(np.array(want, dtype=np.uint8), bits, count), codes)


def test_bit_packing_rejects_overflow_and_wrong_length():
    with pytest.raises(ValueError):
        pack_bits(np.array([4], dtype=np.uint8), 2)
    with pytest.raises(ValueError):
        unpack_bits(np.zeros(3, dtype=np.uint8), 4, 8)
