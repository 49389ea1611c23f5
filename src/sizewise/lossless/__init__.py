"""Lossless entropy packing (DFloat11 style) of float weights and quantized integer codes.

bf16 exponents (fp16 high bytes; grouped b-bit codes) are Huffman-coded per block, the remaining
bits are stored as they are. The output is self-describing bytes: see container.py for the layout.

    data = encode_float(w)            # bf16/fp16 tensor -> bytes (~66% of raw for Gaussian weights)
    w2 = decode_float(data)           # bit-identical, NaN payloads and -0.0 included
    data = encode_codes(codes, 4)     # uint8 codes < 2^bits -> bytes
    codes2 = decode_codes(data)
    coded_stats(data)                 # raw / coded / entropy-bound bits, from the header alone
"""

from sizewise.lossless.codec import (
    DEFAULT_BLOCK_VALUES,
    coded_stats,
    decode_codes,
    decode_codes_block,
    decode_float,
    decode_float_block,
    encode_codes,
    encode_float,
)
from sizewise.lossless.coder import CorruptData, backend
from sizewise.lossless.container import Header, read_header

__all__ = [
    "DEFAULT_BLOCK_VALUES",
    "CorruptData",
    "Header",
    "backend",
    "coded_stats",
    "decode_codes",
    "decode_codes_block",
    "decode_float",
    "decode_float_block",
    "encode_codes",
    "encode_float",
    "read_header",
]
