"""Bit packing of b-bit codes into bytes (little-endian bit order, no padding between values).

numpy's packbits/unpackbits do the work; the only thing written here is the reshaping, because
no packaging library offers arbitrary widths such as 3 or 5 bits.
"""

from __future__ import annotations

import numpy as np


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Flatten `codes` (each < 2^bits) into a uint8 array of ceil(n*bits/8) bytes."""
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if flat.size and int(flat.max()) >> bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` codes, as uint8."""
    if data.size != packed_nbytes(count, bits):
        raise ValueError(f"expected {packed_nbytes(count, bits)} bytes for {count} {bits}-bit codes, got {data.size}")
    planes = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)
