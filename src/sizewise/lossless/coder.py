"""Entropy coding of a stream of byte symbols, one block at a time.

The coder is canonical Huffman as written by DEFLATE with the Huffman-only strategy: no string
matching, just one Huffman table per ~32K symbols (zlib's literal buffer at memLevel 9). That is
exactly the coder DFloat11 uses, and it lets two mature libraries do the bit-level work:
stdlib zlib encodes, and ISA-L (the `isal` wheel) decodes at ~0.7-1.1 G symbols/s per core,
releasing the GIL so blocks decode in parallel. Without `isal` the stdlib decoder reads the same
streams, about 3x slower. Measured alternatives are listed in bench/lossless_codec.py.

A block is stored in one of three modes, whichever is smallest: Huffman, raw (symbols packed at
their bit width: incompressible data never grows by more than the block entry), or constant (one
byte: Huffman cannot go below 1 bit per symbol, a constant block needs 0).
"""

from __future__ import annotations

import zlib

import numpy as np

from sizewise.errors import SizewiseError
from sizewise.quant.pack import pack_bits, packed_nbytes, unpack_bits

try:  # ISA-L: same streams, same CRC-32 polynomial, several times faster than stdlib zlib
    from isal import isal_zlib as _fast_zlib
except ImportError:  # pragma: no cover - depends on the environment
    _fast_zlib = None

MODE_RAW = 0
MODE_CONST = 1
MODE_HUFFMAN = 2
MODES = (MODE_RAW, MODE_CONST, MODE_HUFFMAN)

_RAW_DEFLATE = -15  # negative wbits: raw deflate, no zlib header or adler32 (we keep our own CRC)
_MEM_LEVEL = 9      # largest literal buffer: fewest Huffman tables per block


class CorruptData(SizewiseError):
    """Packed bytes that fail a structural or checksum test; no value is returned from them."""


def backend() -> str:
    """Which library decodes Huffman streams in this process."""
    return "isal" if _fast_zlib is not None else "zlib"


def crc32(buf) -> int:
    """Standard CRC-32 (the zlib polynomial) of a buffer; ISA-L's is much faster when present."""
    return (_fast_zlib or zlib).crc32(buf) & 0xFFFFFFFF


def entropy_bits(symbols: np.ndarray) -> float:
    """Shannon bound in bits for coding `symbols` (uint8) with their own order-0 frequencies."""
    n = symbols.size
    if n == 0:
        return 0.0
    counts = np.bincount(symbols, minlength=256)
    counts = counts[counts > 0].astype(np.float64)
    return float(n * np.log2(n) - (counts * np.log2(counts)).sum())


def _huffman_encode(symbols: np.ndarray) -> bytes:
    # Level is irrelevant under Z_HUFFMAN_ONLY; memLevel sets how many symbols share a table.
    c = zlib.compressobj(9, zlib.DEFLATED, _RAW_DEFLATE, _MEM_LEVEL, zlib.Z_HUFFMAN_ONLY)
    return c.compress(symbols) + c.flush()


def _huffman_decode(payload, n: int) -> np.ndarray:
    lib = _fast_zlib or zlib
    d = lib.decompressobj(_RAW_DEFLATE)
    try:
        # max_length bounds the output, so corrupted streams cannot expand without limit.
        out = d.decompress(payload, n)
    except Exception as exc:  # zlib.error / IsalError: the stream itself is invalid
        raise CorruptData(f"entropy-coded stream is invalid: {exc}") from None
    if len(out) != n or not d.eof or d.unused_data or d.unconsumed_tail:
        raise CorruptData(f"entropy-coded stream does not hold exactly {n} symbols")
    return np.frombuffer(out, dtype=np.uint8)


def _raw_nbytes(n: int, sym_bits: int) -> int:
    return packed_nbytes(n, sym_bits)


def encode_symbols(symbols: np.ndarray, sym_bits: int) -> tuple[int, bytes]:
    """Code a 1-D uint8 array of symbols (each < 2^sym_bits); returns (mode, payload)."""
    symbols = np.ascontiguousarray(symbols, dtype=np.uint8).reshape(-1)
    n = symbols.size
    if n == 0:
        return MODE_RAW, b""
    first = symbols[0]
    if not np.any(symbols != first):
        return MODE_CONST, bytes([int(first)])
    coded = _huffman_encode(symbols)
    if len(coded) < _raw_nbytes(n, sym_bits):
        return MODE_HUFFMAN, coded
    raw = symbols.tobytes() if sym_bits == 8 else pack_bits(symbols, sym_bits).tobytes()
    return MODE_RAW, raw


def decode_symbols(mode: int, payload, n: int, sym_bits: int) -> np.ndarray:
    """Inverse of `encode_symbols`: n uint8 symbols (read-only when they alias `payload`)."""
    if mode == MODE_HUFFMAN:
        return _huffman_decode(payload, n)
    if mode == MODE_CONST:
        if len(payload) != 1 or (n and payload[0] >> sym_bits):
            raise CorruptData("constant block must hold one in-range symbol")
        return np.full(n, payload[0], dtype=np.uint8)
    if mode == MODE_RAW:
        if len(payload) != _raw_nbytes(n, sym_bits):
            raise CorruptData(f"raw block holds {len(payload)} bytes, expected {_raw_nbytes(n, sym_bits)}")
        buf = np.frombuffer(payload, dtype=np.uint8)
        return buf if sym_bits == 8 else unpack_bits(buf, sym_bits, n)
    raise CorruptData(f"unknown block mode {mode}")
