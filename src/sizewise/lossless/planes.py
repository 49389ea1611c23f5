"""Splitting values into the symbols that get entropy-coded and the bytes stored as they are.

bfloat16 (s eeeeeeee mmmmmmm): the 8 exponent bits are the symbol; sign and 7 mantissa bits make
the raw byte (s << 7 | m). Exponents of trained weights carry ~2.6 bits, the rest is near-uniform.

float16 (s eeeee mmmmmmmmmm): the high byte (sign, 5 exponent bits, top 2 mantissa bits) is the
symbol and the low 8 mantissa bits the raw byte. Coding the 3 extra bits costs nothing measurable
(on Gaussian weights it is 0.08 bits/value *smaller* than coding the exponent alone, as the top
mantissa bits are not uniform within a binade) and avoids packing 11-bit remainders.

Integer codes of b <= 4 bits are grouped k = 8 // b to a byte symbol (little end first): Huffman
spends at least one bit per symbol, so coding 2-bit codes one by one could never go below 1 bit.
"""

from __future__ import annotations

import functools

import numpy as np


def split_bf16(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint16 bit patterns -> (exponent symbols, raw sign|mantissa bytes), both uint8."""
    exponent = (u >> 7).astype(np.uint8)  # the cast drops the sign bit
    raw = (u >> 8).astype(np.uint8)
    raw &= 0x80
    raw |= u.astype(np.uint8) & 0x7F
    return exponent, raw


def merge_bf16(exponent: np.ndarray, raw: np.ndarray, out: np.ndarray) -> None:
    """Inverse of split_bf16, written into `out` (uint16)."""
    np.left_shift(exponent, 7, out=out, dtype=np.uint16)
    # Sign-extending the raw byte to 16 bits puts its sign at bit 15; 0x807F keeps sign and mantissa.
    rest = raw.view(np.int8).astype(np.int16).view(np.uint16)
    rest &= 0x807F
    out |= rest


def split_fp16(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint16 bit patterns -> (high byte symbols, low byte raw), both uint8."""
    return (u >> 8).astype(np.uint8), u.astype(np.uint8)


def merge_fp16(high: np.ndarray, low: np.ndarray, out: np.ndarray) -> None:
    np.left_shift(high, 8, out=out, dtype=np.uint16)
    out |= low


def code_group(bits: int) -> int:
    """How many b-bit codes share one byte symbol."""
    return 8 // bits if bits <= 4 else 1


def group_codes(codes: np.ndarray, bits: int, group: int) -> np.ndarray:
    """1-D uint8 codes -> ceil(n / group) symbols; code j of a group sits at bit bits * j."""
    if group == 1:
        return codes
    n = codes.size
    # Pad with the last code, not zero: a constant block stays constant and its entropy unchanged.
    padded = np.full(-(-n // group) * group, codes[-1] if n else 0, dtype=np.uint8)
    padded[:n] = codes
    cols = padded.reshape(-1, group)
    symbols = cols[:, 0].copy()
    for j in range(1, group):
        symbols |= cols[:, j] << np.uint8(bits * j)
    return symbols


def ungroup_codes(symbols: np.ndarray, bits: int, group: int, n: int) -> np.ndarray:
    """Inverse of group_codes: the first n codes, uint8."""
    out = np.empty(n, dtype=np.uint8)
    ungroup_codes_into(symbols, bits, group, out)
    return out


_WORDS = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


@functools.lru_cache(maxsize=None)
def _ungroup_table(bits: int, group: int) -> np.ndarray:
    """symbol -> its `group` codes as one little-endian word, so one gather ungroups a block."""
    s = np.arange(256, dtype=np.uint64)
    word = np.zeros(256, dtype=np.uint64)
    for j in range(group):
        word |= ((s >> np.uint64(bits * j)) & np.uint64((1 << bits) - 1)) << np.uint64(8 * j)
    return word.astype(_WORDS[group])


def ungroup_codes_into(symbols: np.ndarray, bits: int, group: int, out: np.ndarray) -> None:
    """Write the first out.size codes held by `symbols` into `out` (uint8, contiguous)."""
    n = out.size
    if group == 1:
        out[:] = symbols[:n]
        return
    table = _ungroup_table(bits, group)
    whole = n // group
    np.take(table, symbols[:whole], out=out[: whole * group].view(table.dtype))
    if whole * group < n:  # a partial last group: only in the last block
        out[whole * group:] = table[symbols[whole: whole + 1]].view(np.uint8)[: n - whole * group]
