"""Weight files are data from a stranger: their headers are checked against the file's size before
anything is allocated from them or a model config is built from them.

`check_gguf` walks a GGUF header and tensor table with every count and length bounded by the bytes
left in the file, then asks that the metadata describe a model no larger than its tensors (a tiny
file naming `general.architecture=llama` and nothing else would otherwise become transformers'
default 7B Llama). Only then does anything hand the file to `gguf.GGUFReader` or transformers.
`check_safetensors` lets the safetensors library validate a header (it checks offsets against the
file size) and turns its complaint into one line.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

from .errors import SizewiseError

GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4                          # ggml tensors have at most 4 dimensions
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# keys transformers' GGUF loader would otherwise fill with a default-size model's values
_REQUIRED = ("block_count", "embedding_length", "feed_forward_length")


class _Cursor:
    """Reads a file front to back; every read is checked against the bytes that remain."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    @property
    def left(self) -> int:
        return self.size - self.f.tell()

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left:
            raise SizewiseError(f"{self.path} is not a valid GGUF file: {what} needs {n:,} bytes, "
                                f"{self.left:,} remain (truncated or corrupt)")

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        return self.f.read(n)

    def scalar(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.read(self.scalar("Q", what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SizewiseError(f"{self.path} is not a valid GGUF file: {what} is not UTF-8") from None

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, os.SEEK_CUR)


def _value(c: _Cursor, vtype: int, key: str):
    """One metadata value; arrays are skipped (kept: their length only), their sizes bounded first."""
    if vtype in _SCALARS:
        return c.scalar(_SCALARS[vtype], f"value of {key}")
    if vtype == _STRING:
        return c.string(f"string value of {key}")
    if vtype != _ARRAY:
        raise SizewiseError(f"{c.path} is not a valid GGUF file: {key} has unknown value type {vtype}")
    etype, count = c.scalar("I", f"array type of {key}"), c.scalar("Q", f"array length of {key}")
    if etype in _SCALARS:
        c.skip(count * struct.calcsize(_SCALARS[etype]), f"array {key}")
    elif etype == _STRING:
        c.need(count * 8, f"array {key}")          # each string has at least its 8-byte length
        for _ in range(count):
            c.skip(c.scalar("Q", f"string in {key}"), f"string in {key}")
    else:                                          # nested arrays: no model file needs them
        raise SizewiseError(f"{c.path} is not a valid GGUF file: array {key} holds type {etype}")
    return count


def read_gguf_header(path: str | Path) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]]]:
    """(metadata: key -> scalar or string, arrays as their length; tensors: (name, dims, type, bytes)),
    every count, length, dimension and tensor extent checked against the file's size."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise SizewiseError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        c = _Cursor(f, size, path)
        if c.left < 24 or c.read(4, "magic") != GGUF_MAGIC:
            raise SizewiseError(f"{path} is not a GGUF file (no GGUF header)")
        version = c.scalar("I", "version")
        if version not in (2, 3):
            raise SizewiseError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = c.scalar("Q", "tensor count"), c.scalar("Q", "metadata count")
        c.need(n_kv * 13, f"{n_kv:,} metadata entries")       # key length 8 + 1 byte + type 4
        meta = {}
        for _ in range(n_kv):
            key = c.string("metadata key")
            meta[key] = _value(c, c.scalar("I", f"type of {key}"), key)
        c.need(n_tensors * 25, f"{n_tensors:,} tensor entries")  # name 8+1, dims 4, type 4, offset 8
        infos = []
        for _ in range(n_tensors):
            name = c.string("tensor name")
            n_dims = c.scalar("I", f"dimension count of {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise SizewiseError(f"{path} is not a valid GGUF file: tensor {name} has {n_dims} dimensions")
            dims = tuple(c.scalar("Q", f"dimensions of {name}") for _ in range(n_dims))
            ttype, offset = c.scalar("I", f"type of {name}"), c.scalar("Q", f"offset of {name}")
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise SizewiseError(f"{path}: tensor {name} has unknown ggml type {ttype}") from None
            numel = math.prod(dims)
            if numel == 0 or dims[0] % block:
                raise SizewiseError(f"{path} is not a valid GGUF file: tensor {name} has shape {list(dims)}")
            infos.append((name, dims, ttype, offset, numel // block * block_bytes))
        alignment = meta.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise SizewiseError(f"{path} is not a valid GGUF file: general.alignment {alignment!r}")
        start = -(-f.tell() // alignment) * alignment
    tensors = []
    for name, dims, ttype, offset, nbytes in infos:
        if start + offset + nbytes > size:
            raise SizewiseError(f"{path} is not a valid GGUF file: tensor {name} ({nbytes:,} bytes at offset "
                                f"{offset:,}) runs past the end of the file (truncated or corrupt)")
        tensors.append((name, dims, ttype, nbytes))
    return meta, tensors


def check_gguf(path: str | Path) -> dict:
    """Fail with one line unless `path` is a GGUF model whose header and tensor table fit in the file
    and whose metadata describes a model no larger than its tensors; returns the metadata."""
    meta, tensors = read_gguf_header(path)
    if not tensors:
        raise SizewiseError(f"{path} holds no tensors: not a model")
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise SizewiseError(f"{path}: GGUF metadata lacks general.architecture")
    dims = {}
    for key in _REQUIRED:
        v = meta.get(f"{arch}.{key}")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SizewiseError(f"{path}: GGUF metadata lacks a positive {arch}.{key} (got {v!r})")
        dims[key] = v
    # a lower bound of what transformers would allocate: per layer at least the query and output
    # projections (hidden²) and an up and a down one (hidden x feed-forward), plus the embedding
    # (its default vocabulary, 32000, when the file names none)
    hidden, vocab = dims["embedding_length"], meta.get(f"{arch}.vocab_size", meta.get("tokenizer.ggml.tokens", 32000))
    if not isinstance(vocab, int) or vocab < 1:
        raise SizewiseError(f"{path}: GGUF metadata has vocabulary size {vocab!r}")
    described = dims["block_count"] * 2 * hidden * (hidden + dims["feed_forward_length"]) + vocab * hidden
    held = sum(math.prod(d) for _, d, _, _ in tensors)
    if described > held:
        raise SizewiseError(f"{path}: its metadata describes a model of at least {described:,} weights, "
                            f"but its tensors hold {held:,}")
    return meta


def check_safetensors(path: str | Path) -> None:
    """One line unless the safetensors library accepts `path`'s header (offsets within the file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SizewiseError(f"{path} is not a valid safetensors file: {first}") from None
