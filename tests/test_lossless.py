"""Lossless packing: exact round trips, adversarial values, corruption detection, sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sizewise.errors import SizewiseError
from sizewise.lossless import (
    CorruptData, coded_stats, decode_codes, decode_codes_block, decode_float, decode_float_block,
    encode_codes, encode_float, read_header,
)
from sizewise.lossless import coder
from sizewise.lossless.container import MAGIC


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits_of(a), bits_of(b))


def from_bits(u: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(u, dtype=np.uint16).view(np.int16)).view(dtype)


def gaussian(n: int, dtype: torch.dtype, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * std).to(dtype)


FLOATS = [torch.bfloat16, torch.float16]


def roundtrip_float(t: torch.Tensor, **kw) -> bytes:
    data = encode_float(t, **kw)
    out = decode_float(data)
    assert_bit_identical(out, t)
    if t.numel() and not t.isnan().any():
        assert torch.equal(out, t)
    return data


# ---------------------------------------------------------------- float round trips


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1000,), (37, 53), (2, 3, 4, 5), (4099,)])
def test_random_float_roundtrip(dtype, shape):
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    roundtrip_float(t, block_values=1000)  # several blocks, the last one partial


@pytest.mark.parametrize("dtype", FLOATS)
def test_every_bit_pattern(dtype):
    # All 65536 patterns: every exponent, NaN payloads, infinities, subnormals, both zeros.
    u = np.random.default_rng(0).permutation(np.arange(1 << 16)).astype(np.uint16)
    data = roundtrip_float(from_bits(u, dtype), block_values=4096)
    assert coded_stats(data)["ratio"] < 1.01  # incompressible exponents fall back to raw, no growth


@pytest.mark.parametrize("dtype", FLOATS)
def test_special_values(dtype):
    nan_bits = [0x7FC0, 0x7F81, 0xFFC1, 0x7FFF, 0xFF80 | 0x55] if dtype == torch.bfloat16 else \
               [0x7E00, 0x7C01, 0xFE01, 0x7FFF, 0xFD55]
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, -1e-40, 6e-8, -6e-8], dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    subnormals = (torch.arange(1, 200, dtype=torch.float32) * tiny / 256).to(dtype)
    t = torch.cat([specials, from_bits(np.array(nan_bits), dtype), subnormals, -subnormals, gaussian(300, dtype)])
    assert (bits_of(t) == bits_of(torch.tensor(-0.0, dtype=dtype))).any()
    roundtrip_float(t, block_values=64)


@pytest.mark.parametrize("dtype", FLOATS)
def test_all_exponents_equal_is_constant_block(dtype):
    t = (1 + torch.rand(5000, generator=torch.Generator().manual_seed(2))).to(dtype)  # all in [1, 2)
    t = torch.where(t >= 2, torch.ones_like(t), t)
    data = roundtrip_float(t, block_values=2048)
    if dtype == torch.bfloat16:
        stats = coded_stats(data)
        assert stats["block_modes"]["constant"] == 3
        assert stats["symbol_bits"] == 3 * 8 and stats["entropy_bound_bits"] == 0


def test_all_256_bf16_exponents_present():
    e = np.arange(256, dtype=np.uint16).repeat(40)
    mant = np.random.default_rng(3).integers(0, 1 << 8, e.size, dtype=np.uint16)
    u = (e << 7) | (mant & 0x7F) | ((mant & 0x80) << 8)
    roundtrip_float(from_bits(u, torch.bfloat16), block_values=1 << 12)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (1,), (), (1, 1)])
def test_empty_single_and_scalar(dtype, shape):
    t = torch.full(shape, -0.0, dtype=dtype) if shape != (1,) else torch.tensor([3.5], dtype=dtype)
    data = roundtrip_float(t)
    assert read_header(data).shape == tuple(shape)


def test_noncontiguous_and_grad_inputs():
    w = gaussian(600, torch.bfloat16).reshape(20, 30).t()  # transposed view
    assert_bit_identical(decode_float(encode_float(w)), w.contiguous())
    g = gaussian(50, torch.float16).requires_grad_()
    assert_bit_identical(decode_float(encode_float(g)), g.detach())


def test_threads_and_determinism():
    t = gaussian(10_000, torch.bfloat16)
    a = encode_float(t, block_values=1024, threads=1)
    assert a == encode_float(t, block_values=1024, threads=2)
    assert_bit_identical(decode_float(a, threads=1), decode_float(a, threads=3))


def test_single_block_decodes_alone():
    t = gaussian(10_000, torch.float16).reshape(100, 100)
    data = encode_float(t, block_values=3000)
    assert read_header(data).block_offsets()[0] == read_header(data).nbytes
    for i, (start, stop) in enumerate([(0, 3000), (3000, 6000), (6000, 9000), (9000, 10000)]):
        assert_bit_identical(decode_float_block(data, i), t.reshape(-1)[start:stop])
    with pytest.raises(IndexError):
        decode_float_block(data, 4)


def test_stdlib_decoder_reads_the_same_streams(monkeypatch):
    t = gaussian(5000, torch.bfloat16)
    data = encode_float(t, block_values=2000)
    monkeypatch.setattr(coder, "_fast_zlib", None)
    assert coder.backend() == "zlib"
    assert_bit_identical(decode_float(data), t)
    bad = bytearray(data)
    bad[read_header(data).nbytes + 10] ^= 0xFF
    with pytest.raises(CorruptData):
        decode_float(bytes(bad))


def test_rejects_other_dtypes():
    with pytest.raises(SizewiseError):
        encode_float(torch.zeros(4))
    with pytest.raises(SizewiseError):
        encode_float(torch.zeros(4, dtype=torch.bfloat16), block_values=0)


# ---------------------------------------------------------------- sizes


def test_gaussian_bf16_packs_below_75_percent():
    t = gaussian(1 << 18, torch.bfloat16)
    data = encode_float(t, block_values=1 << 16)
    s = coded_stats(data)
    assert s["coded_bits"] == 8 * len(data) and s["raw_bits"] == 16 * t.numel()
    assert s["ratio"] < 0.75
    assert s["plain_bits"] == 8 * t.numel()
    # Exponents carry ~2.5 bits; Huffman stays within a few percent of the Shannon bound.
    assert 2.0 < s["entropy_bound_bits_per_value"] < 3.0
    assert s["entropy_bound_bits"] <= s["symbol_bits"] <= 1.05 * s["entropy_bound_bits"]
    assert s["bound_bits_per_value"] <= s["bits_per_value"]


def test_gaussian_fp16_compresses():
    s = coded_stats(encode_float(gaussian(1 << 16, torch.float16)))
    assert s["ratio"] < 0.87


# ---------------------------------------------------------------- codes


def roundtrip_codes(codes: np.ndarray, bits: int, **kw) -> bytes:
    data = encode_codes(codes, bits, **kw)
    out = decode_codes(data)
    assert out.dtype == codes.dtype and out.shape == codes.shape
    assert np.array_equal(out, codes)
    return data


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 1001])
def test_codes_random_roundtrip(bits, n):
    rng = np.random.default_rng(bits * 100 + n)
    roundtrip_codes(rng.integers(0, 1 << bits, n, dtype=np.uint8), bits, block_values=256)


@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_constant_and_uniform(bits):
    top = (1 << bits) - 1
    const = np.full((33, 17), top, dtype=np.uint8)
    s = coded_stats(roundtrip_codes(const, bits, block_values=128))
    assert s["block_modes"]["constant"] == s["n_blocks"] and s["symbol_bits"] == 8 * s["n_blocks"]
    uniform = np.random.default_rng(bits).integers(0, 1 << bits, 5000, dtype=np.uint8)
    s = coded_stats(roundtrip_codes(uniform, bits))
    assert s["symbol_bits"] <= bits * 5000 + 8  # raw fallback: never more than plain packing


@pytest.mark.parametrize("dtype", ["u1", "i1", "<u2", "<i2", "<i4", "<i8", "<u8"])
def test_codes_dtype_and_shape_restored(dtype):
    codes = np.random.default_rng(0).integers(0, 8, (3, 5, 7)).astype(dtype)
    roundtrip_codes(codes, 3)


def test_codes_block_decodes_alone():
    codes = np.random.default_rng(1).integers(0, 4, 1000, dtype=np.uint8)
    data = encode_codes(codes, 2, block_values=256)
    assert np.array_equal(decode_codes_block(data, 3), codes[768:])


def test_codes_below_their_bit_width():
    # 4-bit RTN codes of Gaussian weights: entropy well under 4 bits, and the coder gets close.
    w = np.random.default_rng(0).standard_normal(1 << 16)
    scale = np.abs(w).max() / 7.5
    codes = np.clip(np.round(w / scale + 7.5), 0, 15).astype(np.uint8)
    s = coded_stats(roundtrip_codes(codes, 4))
    assert s["entropy_bound_bits_per_value"] < 3.5
    assert s["symbol_bits_per_value"] < s["entropy_bound_bits_per_value"] + 0.05
    # 2-bit codes with 1.5 bits of entropy: grouping 4 codes per symbol beats 1 bit/symbol Huffman.
    skewed = np.random.default_rng(1).choice(4, 1 << 15, p=[0.5, 0.25, 0.125, 0.125]).astype(np.uint8)
    s = coded_stats(roundtrip_codes(skewed, 2))
    assert s["values_per_symbol"] == 4 and s["symbol_bits_per_value"] < 1.8


def test_codes_out_of_range_rejected():
    with pytest.raises(SizewiseError):
        encode_codes(np.array([0, 4], dtype=np.uint8), 2)
    with pytest.raises(SizewiseError):
        encode_codes(np.array([-1, 0], dtype=np.int8), 2)
    with pytest.raises(SizewiseError):
        encode_codes(np.array([0.5]), 2)
    with pytest.raises(SizewiseError):
        encode_codes(np.array([1], dtype=np.uint8), 9)


# ---------------------------------------------------------------- corruption


def decodes_exactly_or_raises(data: bytes, decode, expected) -> bool:
    """True if decoding raised CorruptData, False if it returned the original values exactly."""
    try:
        out = decode(data)
    except CorruptData:
        return True
    if isinstance(expected, torch.Tensor):
        assert_bit_identical(out, expected)
    else:
        assert np.array_equal(out, expected) and out.dtype == expected.dtype
    return False


@pytest.mark.parametrize("dtype", FLOATS)
def test_every_single_byte_flip_is_caught(dtype):
    # Every byte of a small multi-block stream: header, coded symbols and raw plane.
    t = torch.cat([gaussian(700, dtype), torch.tensor([float("nan"), -0.0], dtype=dtype)])
    data = encode_float(t, block_values=256)
    raised = 0
    for pos in range(len(data)):
        for mask in (0x01, 0x80):
            bad = bytearray(data)
            bad[pos] ^= mask
            raised += decodes_exactly_or_raises(bytes(bad), lambda d: decode_float(d, threads=1), t)
    # Only flips in the unused padding bits ending a Huffman stream may leave the values intact.
    assert raised >= 2 * len(data) - 2 * 3 * 2


def test_codes_byte_flips_are_caught():
    codes = np.random.default_rng(5).choice(16, 900, p=np.r_[[0.3, 0.2], np.full(14, 0.5 / 14)]).astype(np.uint8)
    data = encode_codes(codes, 4, block_values=512)
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        decodes_exactly_or_raises(bytes(bad), decode_codes, codes)


@pytest.mark.parametrize("kind", ["float", "codes"])
def test_truncated_extended_and_bad_magic(kind):
    if kind == "float":
        original, data, decode = gaussian(3000, torch.bfloat16), None, decode_float
        data = encode_float(original, block_values=1024)
    else:
        original, decode = np.random.default_rng(0).integers(0, 8, 3000, dtype=np.uint8), decode_codes
        data = encode_codes(original, 3, block_values=1024)
    for cut in [0, 3, 10, 31, read_header(data).nbytes - 1, read_header(data).nbytes, len(data) // 2, len(data) - 1]:
        with pytest.raises(CorruptData):
            decode(data[:cut])
    with pytest.raises(CorruptData):
        decode(data + b"\0")
    with pytest.raises(CorruptData):
        decode(b"XXXX" + data[len(MAGIC):])
    with pytest.raises(CorruptData):
        coded_stats(data[:-1])
    # A float stream is not codes and vice versa.
    with pytest.raises(CorruptData):
        (decode_codes if kind == "float" else decode_float)(data)


def test_corrupt_data_is_a_sizewise_error():
    assert issubclass(CorruptData, SizewiseError)
