"""Bit packing of b-bit codes into bytes (little-endian bit order, no padding between values).

Written by hand because no packaging library offers arbitrary widths such as 3 or 5 bits. Eight
codes of b bits are exactly b bytes: each group of eight is combined into one little-endian 64-bit
word with shifts, and its first b bytes are kept. Work goes in slices, so that the 64-bit words of
an 8B model's largest weight (59M codes) never exist at once.
"""

from __future__ import annotations

import numpy as np

_SLICE = 1 << 22            # codes per slice (a multiple of 8): 32 MB of 64-bit words


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Flatten `codes` (each < 2^bits) into a uint8 array of ceil(n*bits/8) bytes."""
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if flat.size and int(flat.max()) >> bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    if 8 % bits == 0:           # whole codes per byte (1, 2, 4, 8 bits): shifts on bytes suffice
        per = 8 // bits
        padded = np.zeros(-(-flat.size // per) * per, dtype=np.uint8)
        padded[:flat.size] = flat
        lanes = padded.reshape(-1, per)
        out = lanes[:, 0].copy()
        for k in range(1, per):
            out |= lanes[:, k] << np.uint8(k * bits)
        return out
    out = np.empty(packed_nbytes(flat.size, bits) + bits, dtype=np.uint8)     # + a padded last group
    for start in range(0, flat.size, _SLICE):
        part = flat[start:start + _SLICE]
        groups = np.zeros((-(-part.size // 8), 8), dtype=np.uint64)
        groups.reshape(-1)[:part.size] = part
        words = np.zeros(len(groups), dtype="<u8")
        for k in range(8):
            words |= groups[:, k] << np.uint64(k * bits)
        at = start // 8 * bits
        out[at:at + len(words) * bits] = words.view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
    return out[:packed_nbytes(flat.size, bits)]


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` codes, as uint8."""
    if data.size != packed_nbytes(count, bits):
        raise ValueError(f"expected {packed_nbytes(count, bits)} bytes for {count} {bits}-bit codes, got {data.size}")
    flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if 8 % bits == 0:
        per, mask = 8 // bits, np.uint8((1 << bits) - 1)
        lanes = np.empty((flat.size, per), dtype=np.uint8)
        for k in range(per):
            lanes[:, k] = (flat >> np.uint8(k * bits)) & mask
        return lanes.reshape(-1)[:count].copy() if lanes.size != count else lanes.reshape(-1)
    out = np.empty(count, dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for start in range(0, count, _SLICE):
        n = min(_SLICE, count - start)
        groups = -(-n // 8)
        chunk = flat[start // 8 * bits:(start // 8 + groups) * bits]      # the last group may be short
        words = np.zeros((groups, 8), dtype=np.uint8)
        rows = np.zeros(groups * bits, dtype=np.uint8)
        rows[:chunk.size] = chunk
        words[:, :bits] = rows.reshape(groups, bits)
        words = words.view("<u8").reshape(-1)
        codes = np.empty((groups, 8), dtype=np.uint8)
        for k in range(8):
            codes[:, k] = (words >> np.uint64(k * bits)) & mask
        out[start:start + n] = codes.reshape(-1)[:n]
    return out
