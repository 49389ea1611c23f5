"""Lossless entropy packing (DFloat11 style) of float weights and quantized integer codes.

bf16 exponents (fp16 high bytes; grouped b-bit codes) are Huffman-coded per block, the remaining
bits are stored as they are. The output is self-describing bytes: see container.py for the layout.

    data = encode_float(w)            # bf16/fp16 tensor -> bytes (~66% of raw for Gaussian weights)
    w2 = decode_float(data)           # bit-identical, NaN payloads and -0.0 included
    data = encode_codes(codes, 4)     # uint8 codes < 2^bits -> bytes
    codes2 = decode_codes(data)
    coded_stats(data)                 # raw / coded / entropy-bound bits, from the header alone

Whole models and artifacts, packed into one directory (store.py holds its format):

    pack_model(src, out)              # a BF16/FP16 model, bit-exact (float_model.py)
    load_packed_model(out)            # (model, tokenizer, info); unpack_model writes safetensors back
    pack_artifact(art, out)           # a sizewise artifact's codes entropy-coded (artifacts.py)
    is_packed_model(path), read_manifest(path)
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
from sizewise.lossless.artifacts import code_artifact_stats, load_packed_artifact, load_packed_stored, pack_artifact
from sizewise.lossless.coder import CorruptData, backend
from sizewise.lossless.container import Header, read_header
from sizewise.lossless.float_model import load_packed_model, pack_model, unpack_model
from sizewise.lossless.store import (
    FORMAT_NAME, FORMAT_VERSION, HF, KIND_ARTIFACT, KIND_MODEL, MANIFEST, WEIGHTS, Manifest, TensorEntry,
    is_packed_model, load_packed_tensors, read_manifest,
)

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
    # packed directories
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HF",
    "KIND_ARTIFACT",
    "KIND_MODEL",
    "MANIFEST",
    "WEIGHTS",
    "Manifest",
    "TensorEntry",
    "code_artifact_stats",
    "is_packed_model",
    "load_packed_artifact",
    "load_packed_model",
    "load_packed_stored",
    "load_packed_tensors",
    "pack_artifact",
    "pack_model",
    "read_manifest",
    "unpack_model",
]
