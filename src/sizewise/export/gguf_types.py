"""GGUF's quantized block types, bit-exact: our codes and scales laid out in ggml's block structs.

Three families:

- **32-weight blocks** (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) *are* our `QuantFormat` with group_size=32 and
  float16 scales (and a float16 min for the `_1` types). `to_ggml_bytes` only moves bits around.
- **k-quants** (Q2_K .. Q6_K): the format, its two-level grid and its fitting are `quant/kquant.py`;
  here `kquant_to_ggml_bytes` packs a `KQuantTensor` into ggml's super-blocks and
  `kquant_from_ggml_bytes` unpacks them, each the exact inverse of the other (every bit of a block
  is a field), so an artifact can store the blocks themselves.
- **IQ4_NL**, **MXFP4**: codes into a fixed table (`quant/codebook.py`), in Q4_0's block layout
  (MXFP4 with a one-byte power-of-two scale); `ggml_block_bytes` / `from_ggml_block_bytes` cover
  them and the k-quants alike.

A weight's value is defined once, by `grid.decode` over the *effective* scale and zero of its
group: for k-quants the float32 products `d*ls` and `-(dmin*lm)` (exact: an fp16 times a <=8-bit
integer fits float32's 24-bit mantissa). That is the arithmetic of gguf's numpy dequantizer, in the
same order (`d*q + m`, `(d*sc)*q - dmin*m`, `(d*sc)*(q - 2^(b-1))`, and `a - b` is `a + (-b)` in
IEEE), so `gguf.quants.dequantize` of our bytes equals our decode bit for bit; the tests check it.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import SizewiseError
from ..quant.formats import FloatFormat, QuantFormat, QuantizedTensor
from ..quant.grid import encode, grouped, pack_tensor, rtn
from ..quant.codebook import BLOCK, E8M0_BIAS, CodebookFormat, CodebookTensor
from ..quant.kquant import SUPER, KQuantFormat, KQuantGrid, KQuantTensor

GGML = GGMLQuantizationType
QK = 32  # weights per block of the legacy types

_F16_MAX = 65504.0
_TINY = 2.0 ** -24  # smallest float16 subnormal: a stored scale is never zero

# ---------------------------------------------------------------------------------------------
# 32-weight blocks
#
# Byte layout of one block (ggml's block_q*_*, little-endian); c[i] is our code in [0, 2^bits):
#   Q8_0 34 B: d f16 | 32 x int8 (c[i] - 128)
#   Q4_0 18 B: d f16 | qs[16]: low nibble c[i], high nibble c[i+16]
#   Q4_1 20 B: d f16 | m f16 | qs[16] as Q4_0
#   Q5_0 22 B: d f16 | qh u32: bit i = bit 4 of c[i] | qs[16]: bits 0-3, as Q4_0
#   Q5_1 24 B: d f16 | m f16 | qh u32 | qs[16]
# value: symmetric d*(c - 2^(bits-1)) (our scale*(q - 2^(b-1))); _1 types d*c + m (our scale*q + zero).
# ---------------------------------------------------------------------------------------------

_BLOCK32 = {  # (bits, symmetric) -> type
    (8, True): GGML.Q8_0,
    (4, True): GGML.Q4_0,
    (4, False): GGML.Q4_1,
    (5, True): GGML.Q5_0,
    (5, False): GGML.Q5_1,
}
_FLOAT_TYPES = {"float32": GGML.F32, "float16": GGML.F16, "bfloat16": GGML.BF16}


def ggml_type_for(fmt) -> GGMLQuantizationType | None:
    """The GGUF type that stores `fmt` exactly, or None if none does.

    An integer zero point (`zero="int"`) has no exact home: Q4_1 stores the offset `-scale*z` as a
    float16, which rounds it in general. bfloat16/float32 scales do not fit a float16 `d` either.
    """
    if isinstance(fmt, (KQuantFormat, CodebookFormat)):
        return GGML[fmt.type_name]
    if isinstance(fmt, FloatFormat):
        return _FLOAT_TYPES[fmt.dtype]
    if not isinstance(fmt, QuantFormat) or fmt.group_size != QK or fmt.scale_dtype != "float16":
        return None
    if not fmt.symmetric and fmt.zero != "float16":
        return None
    return _BLOCK32.get((fmt.bits, fmt.symmetric))


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    """A float16 tensor, flattened row-major, as [n, 2] little-endian bytes."""
    a = t.detach().to(torch.float16).cpu().numpy().astype("<f2", copy=False).reshape(-1, 1)
    return a.view(np.uint8)


def _bit_plane(codes: np.ndarray, bit: int) -> np.ndarray:
    """Bit `bit` of each code along the last axis, packed 8 per byte, first code in the lowest bit."""
    return np.packbits((codes >> bit) & 1, axis=-1, bitorder="little")


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0xF) | ((hi & 0xF) << 4)


def to_ggml_bytes(qt: QuantizedTensor, ggml_type: GGMLQuantizationType | None = None) -> np.ndarray:
    """Our [out, in] codes and per-32 scales/mins as ggml blocks: uint8 [out, in/32 * block bytes]."""
    t = ggml_type_for(qt.fmt)
    if t is None:
        raise SizewiseError(
            f"{qt.fmt} has no exact GGUF type: the 32-weight types need group size 32, float16 scales and, "
            f"if asymmetric, a float16 min (zero='float16'), at 4, 5 or 8 bits (8: symmetric only)")
    if ggml_type is not None and GGML(ggml_type) != t:
        raise SizewiseError(f"{qt.fmt} is stored as {t.name}, not {GGML(ggml_type).name}")
    out, inp = qt.shape
    codes = qt.codes.detach().cpu().numpy().astype(np.uint8).reshape(-1, QK)
    parts = [_f16_bytes(qt.scales)]
    if not qt.fmt.symmetric:
        parts.append(_f16_bytes(qt.zeros))
    if qt.fmt.bits == 8:
        parts.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if qt.fmt.bits == 5:
            parts.append(_bit_plane(codes, 4))
        parts.append(_nibbles(codes[:, :QK // 2], codes[:, QK // 2:]))
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == GGML_QUANT_SIZES[t][1]
    return blocks.reshape(out, -1)


def fit_ggml(w: torch.Tensor, fmt: QuantFormat):
    """ggml's own scale for its symmetric blocks (Q4_0/Q5_0 reference): the largest-magnitude weight of
    each group, *with its sign*, maps exactly to the extreme code -2^(b-1): d = max / -2^(b-1).

    The code range [-2^(b-1), 2^(b-1)-1] is lopsided; this gives the extra level to the side the
    largest weight is on, with a step of amax/2^(b-1) instead of grid.fit's 2*amax/(2^b - 1). The scale
    is negative when that weight is positive; `decode` does not care. Returns (scale, None) in float32,
    rounded to float16 like `grid.fit`. For asymmetric formats ggml's Q4_1/Q5_1 choice (min/max) is
    grid.fit's.
    """
    if not fmt.symmetric:
        raise SizewiseError("fit_ggml is for symmetric formats; ggml's asymmetric choice is grid.fit's")
    w = w.float()
    idx = w.abs().argmax(dim=-1, keepdim=True)
    signed_max = w.gather(-1, idx).squeeze(-1)
    scale = (signed_max / -(1 << (fmt.bits - 1))).clamp(-_F16_MAX, _F16_MAX).to(torch.float16).float()
    # never zero, like grid.fit: an all-zero group still decodes to 0 at the middle code
    scale = torch.where(scale == 0, torch.full_like(scale, _TINY), scale)
    return scale, None


def rtn_ggml(w: torch.Tensor, fmt: QuantFormat) -> QuantizedTensor:
    """Round-to-nearest with ggml's scale choice (`fit_ggml`) for symmetric formats, grid.rtn otherwise."""
    if not fmt.symmetric:
        return rtn(w, fmt)
    wg = grouped(w.float(), fmt)
    scale, _ = fit_ggml(wg, fmt)
    codes = encode(wg, scale[..., None], None, fmt).reshape(w.shape)
    return pack_tensor(codes, scale, None, fmt)



# ---------------------------------------------------------------------------------------------
# k-quants
#
# Fields of one super-block in byte order (ggml's block_qN_K, little-endian), sizes in bytes; what
# each holds is in `KQuantFormat`'s docstring and in the (un)packers below.
# ---------------------------------------------------------------------------------------------

_KLAYOUT = {
    "Q2_K": (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2)),
    "Q3_K": (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2)),
    "Q4_K": (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)),
    "Q5_K": (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)),
    "Q6_K": (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)),
}


def _f16_values(b: np.ndarray) -> torch.Tensor:
    """Inverse of `_f16_bytes`: [n, 2] little-endian bytes as a float16 tensor [n]."""
    return torch.from_numpy(np.ascontiguousarray(b).view("<f2").astype(np.float16).reshape(-1))


def _split_nibbles(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return b & 0xF, b >> 4


def _scales_6bit_8(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes holding 8 six-bit scales and 8 six-bit mins ([nb, 8] each):
    bytes 0-3: sc[j] | (sc[j+4] >> 4) << 6; bytes 4-7: mn[j] | (mn[j+4] >> 4) << 6;
    bytes 8-11: (sc[j+4] & 15) | (mn[j+4] & 15) << 4."""
    lo_sc, hi_sc, lo_mn, hi_mn = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    return np.concatenate([
        lo_sc | ((hi_sc >> 4) << 6),
        lo_mn | ((hi_mn >> 4) << 6),
        (hi_sc & 0xF) | ((hi_mn & 0xF) << 4),
    ], axis=1).astype(np.uint8)


def _unscales_6bit_8(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, m, low = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([a & 63, (low & 0xF) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([m & 63, (low >> 4) | ((m >> 6) << 4)], axis=1)
    return sc, mn


def _scales_6bit_16(s: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes holding 16 six-bit values ([nb, 16], already offset by 32):
    bytes 0-7: low nibble s[k], high nibble s[k+8]; bytes 8-11: byte 8+m holds bits 4-5 of
    s[m], s[m+4], s[m+8], s[m+12] at bit 0, 2, 4, 6."""
    low = _nibbles(s[:, :8], s[:, 8:])
    top = (s >> 4) & 3
    high = top[:, 0:4] | (top[:, 4:8] << 2) | (top[:, 8:12] << 4) | (top[:, 12:16] << 6)
    return np.concatenate([low, high], axis=1).astype(np.uint8)


def _unscales_6bit_16(b: np.ndarray) -> np.ndarray:
    lo, hi = _split_nibbles(b[:, :8])
    top = np.concatenate([(b[:, 8:12] >> (2 * i)) & 3 for i in range(4)], axis=1)
    return np.concatenate([lo, hi], axis=1) | (top << 4)


def _crumbs(c: np.ndarray) -> np.ndarray:
    """2-bit fields of [nb, 256] as ggml's qs[64]: half h, field j, position l -> byte 32h+l, bits 2j."""
    c = c.reshape(-1, 2, 4, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(-1, 64)


def _uncrumbs(b: np.ndarray) -> np.ndarray:
    b = b.reshape(-1, 2, 1, 32)
    return ((b >> (2 * np.arange(4, dtype=np.uint8)[:, None])) & 3).reshape(-1, 256)


def _quads(c: np.ndarray) -> np.ndarray:
    """4-bit fields of [nb, 256] as Q4_K/Q5_K's qs[128]: chunk k of 64 -> bytes 32k..32k+31,
    low nibble the chunk's first 32, high nibble its last 32."""
    c = c.reshape(-1, 4, 2, 32)
    return _nibbles(c[:, :, 0], c[:, :, 1]).reshape(-1, 128)


def _unquads(b: np.ndarray) -> np.ndarray:
    return np.stack(_split_nibbles(b.reshape(-1, 4, 32)), axis=2).reshape(-1, 256)


def _high_bits(codes: np.ndarray, bit: int) -> np.ndarray:
    """Q3_K's hmask / Q5_K's qh [nb, 32]: bit `bit` of code 32j+l is bit j of byte l."""
    return _bit_plane(codes.reshape(-1, 8, 32).transpose(0, 2, 1), bit).reshape(-1, 32)


def _unhigh_bits(b: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(b[:, :, None], axis=-1, bitorder="little")          # [nb, 32, 8]
    return bits.transpose(0, 2, 1).reshape(-1, 256)


def _pack_kquant(codes: np.ndarray, d, dmin, ls, lm, fmt: KQuantFormat) -> np.ndarray:
    """Blocks [nb, block bytes] from codes [nb, 256], d/dmin [nb] float16 tensors, ls/lm [nb, J] int."""
    name = fmt.type_name
    f = {"d": _f16_bytes(d)}
    if dmin is not None:
        f["dmin"] = _f16_bytes(dmin)
    if name == "Q2_K":
        f.update(scales=(ls | (lm << 4)).astype(np.uint8), qs=_crumbs(codes))
    elif name == "Q3_K":
        f.update(hmask=_high_bits(codes, 2), qs=_crumbs(codes & 3), scales=_scales_6bit_16((ls + 32).astype(np.uint8)))
    elif name == "Q4_K":
        f.update(scales=_scales_6bit_8(ls, lm), qs=_quads(codes))
    elif name == "Q5_K":
        f.update(scales=_scales_6bit_8(ls, lm), qh=_high_bits(codes, 4), qs=_quads(codes & 0xF))
    elif name == "Q6_K":
        low = (codes & 0xF).reshape(-1, 2, 2, 64)
        f.update(ql=_nibbles(low[:, :, 0], low[:, :, 1]).reshape(-1, 128), qh=_crumbs(codes >> 4),
                 scales=ls.astype(np.int8).view(np.uint8))
    else:  # pragma: no cover - KQuantFormat validates the name
        raise AssertionError(name)
    return np.concatenate([f[k] for k, _ in _KLAYOUT[name]], axis=1)


def _unpack_kquant(blocks: np.ndarray, fmt: KQuantFormat):
    """Inverse of `_pack_kquant`: (codes [nb, 256] uint8, d, dmin [nb] float16 tensors, ls, lm [nb, J])."""
    name = fmt.type_name
    sizes = [n for _, n in _KLAYOUT[name]]
    f = dict(zip((k for k, _ in _KLAYOUT[name]), np.split(blocks, np.cumsum(sizes)[:-1], axis=1)))
    d = _f16_values(f["d"])
    dmin = _f16_values(f["dmin"]) if "dmin" in f else None
    lm = None
    if name == "Q2_K":
        (ls, lm), codes = _split_nibbles(f["scales"]), _uncrumbs(f["qs"])
    elif name == "Q3_K":
        ls = _unscales_6bit_16(f["scales"]).astype(np.int16) - 32
        codes = _uncrumbs(f["qs"]) | (_unhigh_bits(f["hmask"]) << 2)
    elif name == "Q4_K":
        (ls, lm), codes = _unscales_6bit_8(f["scales"]), _unquads(f["qs"])
    elif name == "Q5_K":
        (ls, lm), codes = _unscales_6bit_8(f["scales"]), _unquads(f["qs"]) | (_unhigh_bits(f["qh"]) << 4)
    elif name == "Q6_K":
        low = np.stack(_split_nibbles(f["ql"].reshape(-1, 2, 64)), axis=2).reshape(-1, 256)
        codes = low | (_uncrumbs(f["qh"]) << 4)
        ls = np.ascontiguousarray(f["scales"]).view(np.int8)
    else:  # pragma: no cover - KQuantFormat validates the name
        raise AssertionError(name)
    return codes, d, dmin, ls, lm


def kquant_to_ggml_bytes(kt: KQuantTensor) -> np.ndarray:
    """The ggml blocks of a k-quant weight: uint8 [out, in/256 * block bytes]."""
    fmt, g = kt.fmt, kt.grid
    out, inp = kt.shape
    fmt.check(inp)
    J = SUPER // fmt.sub_size
    codes = kt.codes.detach().cpu().numpy().astype(np.uint8).reshape(-1, SUPER)
    if int(codes.max(initial=0)) > fmt.qmax:
        raise SizewiseError(f"a code exceeds {fmt.qmax} for {fmt.type_name}")
    ls = g.scales.detach().cpu().numpy().astype(np.int16).reshape(-1, J)
    lo, hi = fmt.ls_range
    lo = lo if fmt.symmetric else 0  # a file may hold ls = 0 (it decodes to zeros); we never write one
    if ls.min() < lo or ls.max() > hi:
        raise SizewiseError(f"a sub-block scale is outside {fmt.type_name}'s range [{lo}, {hi}]")
    lm = None
    if not fmt.symmetric:
        lm = g.mins.detach().cpu().numpy().astype(np.int16).reshape(-1, J)
        if lm.min() < 0 or lm.max() > hi:
            raise SizewiseError(f"a sub-block min is outside {fmt.type_name}'s range [0, {hi}]")
        ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    blocks = _pack_kquant(codes, g.d.reshape(-1), None if g.dmin is None else g.dmin.reshape(-1), ls, lm, fmt)
    assert blocks.shape[1] == fmt.block_bytes == GGML_QUANT_SIZES[GGML[fmt.type_name]][1]
    return blocks.reshape(out, -1)


def kquant_from_ggml_bytes(data: np.ndarray, fmt: KQuantFormat, shape: tuple[int, int]) -> KQuantTensor:
    """Inverse of `kquant_to_ggml_bytes`: the grid and codes of an [out, in] weight from its blocks
    (uint8, any shape holding them in row order). Packing the result gives back `data` byte for byte."""
    out, inp = shape
    fmt.check(inp)
    nb, J = out * inp // SUPER, SUPER // fmt.sub_size
    if data.dtype != np.uint8 or data.size != nb * fmt.block_bytes:
        raise SizewiseError(f"{data.size} {data.dtype} values are not the {nb * fmt.block_bytes} bytes of an "
                            f"{out}x{inp} {fmt.type_name} weight")
    codes, d, dmin, ls, lm = _unpack_kquant(np.ascontiguousarray(data).reshape(nb, fmt.block_bytes), fmt)
    sup = inp // SUPER
    grid = KQuantGrid(
        fmt,
        d=d.reshape(out, sup),
        dmin=None if dmin is None else dmin.reshape(out, sup),
        scales=torch.from_numpy(ls.astype(np.int16)).reshape(out, sup * J),
        mins=None if lm is None else torch.from_numpy(lm.astype(np.int16)).reshape(out, sup * J),
    )
    return KQuantTensor(grid, torch.from_numpy(codes.astype(np.uint8)).reshape(out, inp))


def codebook_to_ggml_bytes(ct: CodebookTensor) -> np.ndarray:
    """IQ4_NL / MXFP4 blocks of an [out, in] weight: d f16 (MXFP4: one E8M0 byte) | 16 bytes of
    nibbles (c[i], c[i+16]), as Q4_0; codes become ggml's nibbles (`CodebookFormat.ggml_codes`)."""
    out, inp = ct.shape
    fmt = ct.fmt
    fmt.check(inp)
    codes = ct.codes.detach().cpu().numpy().astype(np.uint8).reshape(-1, BLOCK)
    if int(codes.max(initial=0)) >= len(fmt.ggml_codes):
        raise SizewiseError(f"a code exceeds {len(fmt.ggml_codes) - 1} for {fmt.type_name}")
    codes = np.asarray(fmt.ggml_codes, dtype=np.uint8)[codes]
    if fmt.scale == "e8m0":
        mant, exp = np.frexp(ct.d.detach().cpu().numpy().astype(np.float32).reshape(-1, 1))
        e = exp.astype(np.int64) - 1 + E8M0_BIAS                       # d = 0.5 * 2^exp
        if not (np.all(mant == 0.5) and np.all((e >= 0) & (e <= 254))):
            raise SizewiseError(f"an {fmt.type_name} scale is not a power of two in E8M0's range")
        scale = e.astype(np.uint8)
    else:
        scale = _f16_bytes(ct.d)
    blocks = np.concatenate([scale, _nibbles(codes[:, :BLOCK // 2], codes[:, BLOCK // 2:])], axis=1)
    assert blocks.shape[1] == ct.fmt.block_bytes == GGML_QUANT_SIZES[GGML[ct.fmt.type_name]][1]
    return blocks.reshape(out, -1)


def codebook_from_ggml_bytes(data: np.ndarray, fmt: CodebookFormat, shape: tuple[int, int]) -> CodebookTensor:
    """Inverse of `codebook_to_ggml_bytes`."""
    out, inp = shape
    fmt.check(inp)
    nb = out * inp // BLOCK
    if data.dtype != np.uint8 or data.size != nb * fmt.block_bytes:
        raise SizewiseError(f"{data.size} {data.dtype} values are not the {nb * fmt.block_bytes} bytes of an "
                            f"{out}x{inp} {fmt.type_name} weight")
    blocks = np.ascontiguousarray(data).reshape(nb, fmt.block_bytes)
    if fmt.scale == "e8m0":
        e = blocks[:, :1].astype(np.int64)
        d = torch.from_numpy(np.ldexp(np.float32(1), e - E8M0_BIAS).astype(np.float32)).reshape(out, inp // BLOCK)
        qs = blocks[:, 1:]
    else:
        d = torch.from_numpy(blocks[:, :2].copy().view("<f2").astype(np.float16)).reshape(out, inp // BLOCK)
        qs = blocks[:, 2:]
    nibbles = np.concatenate([qs & 0xF, qs >> 4], axis=1)
    ours = np.full(16, -1, dtype=np.int64)                  # ggml nibble -> our code (MXFP4's -0 reads as 0)
    for code, nib in enumerate(fmt.ggml_codes):
        ours[nib] = code
    if fmt.type_name == "MXFP4":
        ours[8] = fmt.ggml_codes.index(0)
    codes = ours[nibbles]
    if (codes < 0).any():
        raise SizewiseError(f"an {fmt.type_name} block holds a nibble with no level")
    return CodebookTensor(fmt, d, torch.from_numpy(codes.astype(np.uint8)).reshape(out, inp))


def ggml_block_bytes(value: KQuantTensor | CodebookTensor) -> np.ndarray:
    """The ggml blocks of a weight whose format is a ggml type of its own (k-quant, IQ4_NL), which is
    how artifacts store them."""
    if isinstance(value, KQuantTensor):
        return kquant_to_ggml_bytes(value)
    if isinstance(value, CodebookTensor):
        return codebook_to_ggml_bytes(value)
    raise SizewiseError(f"not a k-quant or codebook tensor: {type(value).__name__}")


def from_ggml_block_bytes(data: np.ndarray, fmt, shape: tuple[int, int]) -> KQuantTensor | CodebookTensor:
    """Inverse of `ggml_block_bytes`, for the format `fmt`."""
    if isinstance(fmt, KQuantFormat):
        return kquant_from_ggml_bytes(data, fmt, shape)
    if isinstance(fmt, CodebookFormat):
        return codebook_from_ggml_bytes(data, fmt, shape)
    raise SizewiseError(f"{fmt} is not stored as ggml blocks")


def ggml_bytes(value) -> tuple[np.ndarray, GGMLQuantizationType]:
    """(uint8 [out, row bytes], type) for a QuantizedTensor, KQuantTensor or CodebookTensor."""
    if isinstance(value, (KQuantTensor, CodebookTensor)):
        return ggml_block_bytes(value), ggml_type_for(value.fmt)
    if isinstance(value, QuantizedTensor):
        return to_ggml_bytes(value), ggml_type_for(value.fmt)
    raise SizewiseError(f"not a quantized tensor: {type(value).__name__}")
