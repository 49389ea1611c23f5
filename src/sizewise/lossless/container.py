"""The blockwise byte format: a self-describing header, then each block's bytes back to back.

All integers little-endian. Byte offsets:

    0   4  magic              b"SZWL"
    4   1  version            1
    5   1  kind               1 = bfloat16, 2 = float16, 3 = integer codes
    6   1  bits               bits per value when stored plainly (16 for floats, b for codes)
    7   1  group              values per coded symbol (1 for floats; 8 // b for codes of b <= 4)
    8   1  ndim
    9   1  dtype              codes only: index into CODE_DTYPES (0 for floats)
    10  2  reserved           zero
    12  4  block_values       values per block; the last block holds the rest
    16  8  numel
    24  8  entropy_bound      float64: sum over blocks of n_symbols * H(block symbols), in bits
    32  8*ndim               shape, one uint64 per dimension
    ..  16*n_blocks          block table, n_blocks = ceil(numel / block_values), one entry each:
            +0  1  mode          coder.MODE_RAW / MODE_CONST / MODE_HUFFMAN
            +1  3  reserved      zero
            +4  4  coded_nbytes  bytes of entropy-coded symbols
            +8  4  raw_nbytes    bytes of the raw plane (floats: 1 per value; codes: 0)
            +12 4  crc32         CRC-32 of the block's decoded values (little-endian bytes)
    ..  4                    CRC-32 of every header byte before it
    then, for each block in order: coded_nbytes of symbols, then raw_nbytes of the raw plane.

Block offsets are prefix sums of the table, so any block can be located and decoded alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from sizewise.lossless.coder import MODES, CorruptData, crc32

MAGIC = b"SZWL"
VERSION = 1
KIND_BF16 = 1
KIND_FP16 = 2
KIND_CODES = 3
KINDS = (KIND_BF16, KIND_FP16, KIND_CODES)
# dtypes that encode_codes accepts and decode_codes restores; the index is stored in the header.
CODE_DTYPES = tuple(np.dtype(d) for d in ("u1", "i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8"))

_FIXED = struct.Struct("<4sBBBBBBHIQd")  # up to and including entropy_bound: 32 bytes
_ENTRY = struct.Struct("<B3xIII")        # 16 bytes
_CRC = struct.Struct("<I")
assert _FIXED.size == 32 and _ENTRY.size == 16


@dataclass(frozen=True)
class BlockEntry:
    mode: int
    coded_nbytes: int
    raw_nbytes: int
    crc32: int


@dataclass(frozen=True)
class Header:
    kind: int
    bits: int
    group: int
    dtype: int
    block_values: int
    numel: int
    entropy_bound: float
    shape: tuple[int, ...]
    blocks: tuple[BlockEntry, ...]

    @property
    def nbytes(self) -> int:
        """Size of the header itself; the first block's bytes start here."""
        return _FIXED.size + 8 * len(self.shape) + _ENTRY.size * len(self.blocks) + _CRC.size

    @property
    def payload_nbytes(self) -> int:
        return sum(b.coded_nbytes + b.raw_nbytes for b in self.blocks)

    def block_range(self, i: int) -> tuple[int, int]:
        """[start, stop) of block i in value (flat index) space."""
        start = i * self.block_values
        return start, min(start + self.block_values, self.numel)

    def block_offsets(self) -> list[int]:
        """Byte offset of each block's coded symbols from the start of the packed data."""
        offsets, at = [], self.nbytes
        for b in self.blocks:
            offsets.append(at)
            at += b.coded_nbytes + b.raw_nbytes
        return offsets

    def to_bytes(self) -> bytes:
        parts = [
            _FIXED.pack(MAGIC, VERSION, self.kind, self.bits, self.group, len(self.shape), self.dtype, 0,
                        self.block_values, self.numel, self.entropy_bound),
            struct.pack(f"<{len(self.shape)}Q", *self.shape),
            b"".join(_ENTRY.pack(b.mode, b.coded_nbytes, b.raw_nbytes, b.crc32) for b in self.blocks),
        ]
        head = b"".join(parts)
        return head + _CRC.pack(crc32(head))


def n_blocks(numel: int, block_values: int) -> int:
    return -(-numel // block_values) if numel else 0


def read_header(data) -> Header:
    """Parse and validate the header of packed bytes; raises CorruptData, never guesses."""
    mv = memoryview(data).cast("B")
    if len(mv) < _FIXED.size:
        raise CorruptData(f"packed data is {len(mv)} bytes, shorter than the {_FIXED.size}-byte header")
    magic, version, kind, bits, group, ndim, dtype, reserved, block_values, numel, bound = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptData(f"bad magic {bytes(magic)!r}: not sizewise lossless data")
    if version != VERSION:
        raise CorruptData(f"unsupported lossless format version {version}")
    if block_values <= 0:
        raise CorruptData("block size of zero")
    nb = n_blocks(numel, block_values)
    size = _FIXED.size + 8 * ndim + _ENTRY.size * nb + _CRC.size
    if len(mv) < size:
        raise CorruptData(f"header truncated: needs {size} bytes, data has {len(mv)}")
    (stored,) = _CRC.unpack_from(mv, size - _CRC.size)
    if crc32(mv[: size - _CRC.size]) != stored:
        raise CorruptData("header checksum mismatch")
    # Past the CRC the fields are as written; what follows catches writer bugs, not bit flips.
    if kind not in KINDS or reserved:
        raise CorruptData(f"unknown kind {kind}")
    shape = struct.unpack_from(f"<{ndim}Q", mv, _FIXED.size)
    if int(np.prod(shape, dtype=object)) != numel:
        raise CorruptData(f"shape {shape} does not hold {numel} values")
    at = _FIXED.size + 8 * ndim
    blocks = []
    for _ in range(nb):
        mode, coded, raw, crc = _ENTRY.unpack_from(mv, at)
        if mode not in MODES:
            raise CorruptData(f"unknown block mode {mode}")
        blocks.append(BlockEntry(mode, coded, raw, crc))
        at += _ENTRY.size
    header = Header(kind, bits, group, dtype, block_values, numel, bound, tuple(shape), tuple(blocks))
    if len(mv) != size + header.payload_nbytes:
        raise CorruptData(f"packed data is {len(mv)} bytes, header says {size + header.payload_nbytes}")
    return header
