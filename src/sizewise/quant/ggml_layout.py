"""ggml's block layouts as pure byte math: where each bit of a block goes, and back.

Written by hand: these are ggml's C structs (block_q4_0, block_q4_K, ...); the gguf package only
dequantizes them (numpy), it has no packer for sizewise's codes and scales. The formats
(`uniform`, `kquant`, `codebook`) own which fields they fill; this module only moves bits, and each
unpacker is the exact inverse of its packer (every bit of a block is a field). The tests check the
bytes against `gguf.quants.dequantize`.
"""

from __future__ import annotations

import numpy as np
import torch

QK = 32      # weights per block of the 32-weight types (Q4_0 .. Q8_0, IQ4_NL, MXFP4)
SUPER = 256  # weights per k-quant super-block (ggml's QK_K)


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


def f16_bytes(t: torch.Tensor) -> np.ndarray:
    """A float16 tensor, flattened row-major, as [n, 2] little-endian bytes."""
    a = t.detach().to(torch.float16).cpu().numpy().astype("<f2", copy=False).reshape(-1, 1)
    return a.view(np.uint8)


def _bit_plane(codes: np.ndarray, bit: int) -> np.ndarray:
    """Bit `bit` of each code along the last axis, packed 8 per byte, first code in the lowest bit."""
    return np.packbits((codes >> bit) & 1, axis=-1, bitorder="little")


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0xF) | ((hi & 0xF) << 4)


def legacy_blocks(codes: np.ndarray, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int) -> np.ndarray:
    """32-weight blocks [nb, block bytes] from codes [nb*32] (row order) and per-block float16
    scales (and mins, for the `_1` types)."""
    codes = codes.astype(np.uint8).reshape(-1, QK)
    parts = [f16_bytes(scales)]
    if zeros is not None:
        parts.append(f16_bytes(zeros))
    if bits == 8:
        parts.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if bits == 5:
            parts.append(_bit_plane(codes, 4))
        parts.append(_nibbles(codes[:, :QK // 2], codes[:, QK // 2:]))
    return np.concatenate(parts, axis=1)


def codebook_blocks(nibbles: np.ndarray, scale_bytes: np.ndarray) -> np.ndarray:
    """IQ4_NL / MXFP4 blocks [nb, 1 or 2 + 16]: the scale's bytes | 16 bytes of nibbles (c[i], c[i+16]), as Q4_0."""
    nibbles = nibbles.reshape(-1, QK)
    return np.concatenate([scale_bytes, _nibbles(nibbles[:, :QK // 2], nibbles[:, QK // 2:])], axis=1)


def codebook_unblocks(blocks: np.ndarray, scale_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `codebook_blocks`: (scale bytes [nb, scale_bytes], nibbles [nb, 32])."""
    qs = blocks[:, scale_bytes:]
    return blocks[:, :scale_bytes], np.concatenate([qs & 0xF, qs >> 4], axis=1)


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


def f16_values(b: np.ndarray) -> torch.Tensor:
    """Inverse of `f16_bytes`: [n, 2] little-endian bytes as a float16 tensor [n]."""
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


def kquant_blocks(codes: np.ndarray, d, dmin, ls, lm, name: str) -> np.ndarray:
    """Blocks [nb, block bytes] from codes [nb, 256], d/dmin [nb] float16 tensors, ls/lm [nb, J] int."""
    f = {"d": f16_bytes(d)}
    if dmin is not None:
        f["dmin"] = f16_bytes(dmin)
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


def kquant_unblocks(blocks: np.ndarray, name: str):
    """Inverse of `kquant_blocks`: (codes [nb, 256] uint8, d, dmin [nb] float16 tensors, ls, lm [nb, J])."""
    sizes = [n for _, n in _KLAYOUT[name]]
    f = dict(zip((k for k, _ in _KLAYOUT[name]), np.split(blocks, np.cumsum(sizes)[:-1], axis=1)))
    d = f16_values(f["d"])
    dmin = f16_values(f["dmin"]) if "dmin" in f else None
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
