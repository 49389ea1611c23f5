"""Lossless packing of float tensors and integer codes: the public functions.

Each block is encoded and decoded independently (its own Huffman tables, its own CRC), so blocks
run on a thread pool (the coder and numpy release the GIL) and any block can be decoded alone.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from sizewise.errors import SizewiseError
from sizewise.lossless import coder, planes
from sizewise.lossless.coder import CorruptData
from sizewise.lossless.container import (
    CODE_DTYPES, KIND_BF16, KIND_CODES, KIND_FP16, BlockEntry, Header, n_blocks, read_header,
)

# 1M values: 2 MB of bf16 per block, big enough that per-call overhead vanishes, small enough that
# a 7B model still has thousands of blocks to spread over threads.
DEFAULT_BLOCK_VALUES = 1 << 20

_FLOAT_KINDS = {torch.bfloat16: KIND_BF16, torch.float16: KIND_FP16}
_KIND_DTYPES = {KIND_BF16: torch.bfloat16, KIND_FP16: torch.float16}
_SPLIT = {KIND_BF16: planes.split_bf16, KIND_FP16: planes.split_fp16}
_MERGE = {KIND_BF16: planes.merge_bf16, KIND_FP16: planes.merge_fp16}


def default_threads() -> int:
    """The threads used when none are given: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _map(fn, items: list, threads: int | None) -> list:
    threads = min(threads or default_threads(), len(items))
    if threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def _check_block_values(block_values: int, multiple: int) -> None:
    if block_values <= 0 or block_values % multiple or block_values >= 1 << 32:
        raise SizewiseError(f"block_values must be a positive multiple of {multiple} below 2^32, got {block_values}")


def _assemble(kind, bits, group, dtype, block_values, numel, shape, encoded) -> bytes:
    header = Header(
        kind=kind, bits=bits, group=group, dtype=dtype, block_values=block_values, numel=numel,
        entropy_bound=float(sum(e[3] for e in encoded)), shape=tuple(int(s) for s in shape),
        blocks=tuple(e[0] for e in encoded),
    )
    return b"".join([header.to_bytes(), *(part for e in encoded for part in e[1:3])])


# ---------------------------------------------------------------- floats


def encode_float(t: torch.Tensor, *, block_values: int = DEFAULT_BLOCK_VALUES, threads: int | None = None) -> bytes:
    """bfloat16 / float16 tensor -> self-describing packed bytes (decode_float inverts it bit for bit)."""
    if t.dtype not in _FLOAT_KINDS:
        raise SizewiseError(f"encode_float takes bfloat16 or float16 tensors, got {t.dtype}")
    _check_block_values(block_values, 1)
    kind = _FLOAT_KINDS[t.dtype]
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    u = flat.view(torch.int16).numpy().view(np.uint16)
    split = _SPLIT[kind]

    def encode_block(i: int):
        block = u[i * block_values: (i + 1) * block_values]
        symbols, raw = split(block)
        mode, coded = coder.encode_symbols(symbols, 8)
        raw_bytes = raw.tobytes()
        entry = BlockEntry(mode, len(coded), len(raw_bytes), coder.crc32(block.astype("<u2", copy=False)))
        return entry, coded, raw_bytes, coder.entropy_bits(symbols)

    encoded = _map(encode_block, list(range(n_blocks(u.size, block_values))), threads)
    return _assemble(kind, 16, 1, 0, block_values, u.size, t.shape, encoded)


def _decode_float_block_into(mv: memoryview, header: Header, i: int, offset: int, dst: np.ndarray) -> None:
    """Decode block i (its bytes start at `offset`) into `dst`, a uint16 array of the block's length."""
    entry = header.blocks[i]
    n = dst.size
    if entry.raw_nbytes != n:
        raise CorruptData(f"block {i}: raw plane of {entry.raw_nbytes} bytes for {n} values")
    symbols = coder.decode_symbols(entry.mode, mv[offset: offset + entry.coded_nbytes], n, 8)
    at = offset + entry.coded_nbytes
    _MERGE[header.kind](symbols, np.frombuffer(mv[at: at + n], dtype=np.uint8), dst)
    if coder.crc32(dst) != entry.crc32:
        raise CorruptData(f"block {i}: checksum mismatch")


def float_header(data) -> Header:
    """The header of encode_float bytes; CorruptData if they do not hold a float tensor."""
    header = read_header(data)
    if header.kind not in _KIND_DTYPES or header.bits != 16 or header.group != 1:
        raise CorruptData("packed data does not hold a float tensor (use decode_codes?)")
    return header


def float_dtype(header: Header) -> torch.dtype:
    """The dtype of the tensor a float header (from float_header) describes."""
    return _KIND_DTYPES[header.kind]


def decode_float_into(data, header: Header, dst: np.ndarray) -> None:
    """Decode every block of encode_float bytes, in order on this thread, straight into `dst`
    (uint16, flat, header.numel values): no intermediate copy. `header` is float_header(data)."""
    mv = memoryview(data).cast("B")
    for i, at in enumerate(header.block_offsets()):
        start, stop = header.block_range(i)
        _decode_float_block_into(mv, header, i, at, dst[start:stop])


def decode_float(data, *, threads: int | None = None) -> torch.Tensor:
    """Packed bytes from encode_float -> the tensor, bit-identical; CorruptData if any check fails."""
    header = float_header(data)
    mv = memoryview(data).cast("B")
    out = np.empty(header.numel, dtype="<u2")
    offsets = header.block_offsets()

    def decode_block(i: int) -> None:
        start, stop = header.block_range(i)
        _decode_float_block_into(mv, header, i, offsets[i], out[start:stop])

    _map(decode_block, list(range(len(header.blocks))), threads)
    return torch.from_numpy(out.view(np.int16)).view(_KIND_DTYPES[header.kind]).reshape(header.shape)


def decode_float_block(data, index: int) -> torch.Tensor:
    """The values of block `index` alone (1-D, flat order), without touching the other blocks."""
    header = float_header(data)
    if not 0 <= index < len(header.blocks):
        raise IndexError(f"block {index} of {len(header.blocks)}")
    start, stop = header.block_range(index)
    out = np.empty(stop - start, dtype="<u2")
    _decode_float_block_into(memoryview(data).cast("B"), header, index, header.block_offsets()[index], out)
    return torch.from_numpy(out.view(np.int16)).view(_KIND_DTYPES[header.kind])


# ---------------------------------------------------------------- integer codes


def encode_codes(codes: np.ndarray, bits: int, *, block_values: int = DEFAULT_BLOCK_VALUES,
                 threads: int | None = None) -> bytes:
    """Integer codes, each in [0, 2^bits), any shape -> packed bytes (decode_codes restores them)."""
    codes = np.asarray(codes)
    if codes.dtype not in CODE_DTYPES:
        raise SizewiseError(f"encode_codes takes an integer array ({', '.join(map(str, CODE_DTYPES))}), got {codes.dtype}")
    if not 1 <= bits <= 8:
        raise SizewiseError(f"bits must be 1..8, got {bits}")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >> bits):
        raise SizewiseError(f"codes must lie in [0, {1 << bits}), got [{int(codes.min())}, {int(codes.max())}]")
    group = planes.code_group(bits)
    _check_block_values(block_values, 8)  # a multiple of every group size
    flat = np.ascontiguousarray(codes).reshape(-1).astype(np.uint8)
    sym_bits = bits * group

    def encode_block(i: int):
        block = flat[i * block_values: (i + 1) * block_values]
        symbols = planes.group_codes(block, bits, group)
        mode, coded = coder.encode_symbols(symbols, sym_bits)
        return BlockEntry(mode, len(coded), 0, coder.crc32(block)), coded, b"", coder.entropy_bits(symbols)

    encoded = _map(encode_block, list(range(n_blocks(flat.size, block_values))), threads)
    dtype = CODE_DTYPES.index(codes.dtype)
    return _assemble(KIND_CODES, bits, group, dtype, block_values, flat.size, codes.shape, encoded)


def codes_header(data) -> Header:
    """The header of encode_codes bytes; CorruptData if they do not hold integer codes."""
    header = read_header(data)
    if header.kind != KIND_CODES or not 1 <= header.bits <= 8 or header.group != planes.code_group(header.bits) \
            or header.dtype >= len(CODE_DTYPES) or header.block_values % header.group:
        raise CorruptData("packed data does not hold integer codes (use decode_float?)")
    return header


def _decode_codes_block_into(mv: memoryview, header: Header, i: int, offset: int, dst: np.ndarray) -> None:
    """Decode block i (its bytes start at `offset`) into `dst`, a uint8 array of the block's length."""
    entry = header.blocks[i]
    n = dst.size
    if entry.raw_nbytes:
        raise CorruptData(f"block {i}: codes have no raw plane")
    n_sym = -(-n // header.group)
    symbols = coder.decode_symbols(entry.mode, mv[offset: offset + entry.coded_nbytes], n_sym, header.bits * header.group)
    planes.ungroup_codes_into(symbols, header.bits, header.group, dst)
    if coder.crc32(dst) != entry.crc32:
        raise CorruptData(f"block {i}: checksum mismatch")


def decode_codes_into(data, header: Header, dst: np.ndarray) -> None:
    """Decode every block of encode_codes bytes, in order on this thread, straight into `dst`
    (uint8, flat, header.numel values). `header` is codes_header(data)."""
    mv = memoryview(data).cast("B")
    for i, at in enumerate(header.block_offsets()):
        start, stop = header.block_range(i)
        _decode_codes_block_into(mv, header, i, at, dst[start:stop])


def decode_codes(data, *, threads: int | None = None) -> np.ndarray:
    """Packed bytes from encode_codes -> the codes with their shape and dtype; CorruptData on any failure."""
    header = codes_header(data)
    mv = memoryview(data).cast("B")
    out = np.empty(header.numel, dtype=np.uint8)
    offsets = header.block_offsets()

    def decode_block(i: int) -> None:
        start, stop = header.block_range(i)
        _decode_codes_block_into(mv, header, i, offsets[i], out[start:stop])

    _map(decode_block, list(range(len(header.blocks))), threads)
    return out.astype(CODE_DTYPES[header.dtype], copy=False).reshape(header.shape)


def decode_codes_block(data, index: int) -> np.ndarray:
    """The codes of block `index` alone (1-D uint8, flat order)."""
    header = codes_header(data)
    if not 0 <= index < len(header.blocks):
        raise IndexError(f"block {index} of {len(header.blocks)}")
    start, stop = header.block_range(index)
    out = np.empty(stop - start, dtype=np.uint8)
    _decode_codes_block_into(memoryview(data).cast("B"), header, index, header.block_offsets()[index], out)
    return out


# ---------------------------------------------------------------- sizes


def coded_stats(data) -> dict:
    """Where the bits went, read from the header alone (no decoding).

    raw_bits: the values stored plainly (16 per float, b per code). coded_bits: every byte of
    `data`, header included. symbol_bits: the entropy-coded streams; entropy_bound_bits: the
    Shannon bound for those same symbols with per-block order-0 frequencies. plain_bits: bytes
    stored as-is (sign and mantissa of floats). bound_bits_per_value = (bound + plain) / numel.
    """
    header = read_header(data)
    numel = header.numel
    symbol_bits = 8 * sum(b.coded_nbytes for b in header.blocks)
    plain_bits = 8 * sum(b.raw_nbytes for b in header.blocks)
    coded_bits = 8 * len(memoryview(data).cast("B"))
    raw_bits = numel * header.bits
    modes = [b.mode for b in header.blocks]
    kind = {KIND_BF16: "bfloat16", KIND_FP16: "float16", KIND_CODES: "codes"}[header.kind]
    per = (lambda x: x / numel) if numel else (lambda x: 0.0)
    return {
        "kind": kind,
        "shape": list(header.shape),
        "numel": numel,
        "bits": header.bits,
        "values_per_symbol": header.group,
        "n_blocks": len(header.blocks),
        "block_modes": {"huffman": modes.count(coder.MODE_HUFFMAN), "raw": modes.count(coder.MODE_RAW),
                        "constant": modes.count(coder.MODE_CONST)},
        "raw_bits": raw_bits,
        "coded_bits": coded_bits,
        "header_bits": 8 * header.nbytes,
        "symbol_bits": symbol_bits,
        "plain_bits": plain_bits,
        "entropy_bound_bits": header.entropy_bound,
        "bits_per_value": per(coded_bits),
        "symbol_bits_per_value": per(symbol_bits),
        "entropy_bound_bits_per_value": per(header.entropy_bound),
        "bound_bits_per_value": per(header.entropy_bound + plain_bits),
        "ratio": coded_bits / raw_bits if raw_bits else 1.0,
    }
