"""A safetensors file written one tensor at a time, in any order, byte for byte what
`safetensors.torch.save_file` writes for the same tensors.

safetensors itself only serializes a dict of tensors held at once. Its layout is simple and fixed:
8 bytes of header length, a compact JSON header (metadata first, then the tensors sorted by dtype,
largest first in safetensors' own order, then by name) padded with spaces to a multiple of 8, then
each tensor's bytes at its offsets. With every name, dtype and shape known up front, the header is
written first and each tensor goes to its offsets as it is computed, so none has to be kept.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save

from .errors import SizewiseError

# safetensors' dtype names (the header's "dtype" field)
ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
             torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
             torch.float64: "F64"}


@functools.cache
def _dtype_rank() -> dict[torch.dtype, int]:
    """Where each dtype sorts in safetensors' header, asked of safetensors itself (empty tensors)."""
    dtypes = list(ST_DTYPES)
    blob = save({f"t{i}": torch.empty(0, dtype=d) for i, d in enumerate(dtypes)})
    n = struct.unpack("<Q", blob[:8])[0]
    order = [k for k in json.loads(blob[8:8 + n]) if k != "__metadata__"]
    return {dtypes[int(k[1:])]: rank for rank, k in enumerate(order)}


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def header(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
           metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(the file's bytes before the data, name -> (start, end) of its data relative to the data's start)."""
    rank = _dtype_rank()
    order = sorted(tensors, key=lambda k: (rank[tensors[k][0]], k))
    offsets, at = {}, 0
    table: dict = {"__metadata__": metadata} if metadata else {}
    for k in order:
        dtype, shape = tensors[k]
        offsets[k] = (at, at + _nbytes(dtype, shape))
        table[k] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": list(offsets[k])}
        at = offsets[k][1]
    text = json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class StreamedFile:
    """`path` laid out for `tensors` (name -> (dtype, shape)); `write(name, t)` puts one tensor's bytes
    in place, `close()` checks that every tensor was written. Bytes not yet written read as zeros."""

    def __init__(self, path: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path, self.tensors = Path(path), dict(tensors)
        head, self.offsets = header(self.tensors, metadata)
        self.start = len(head)
        self.missing = set(self.tensors)
        self._fd = os.open(self.path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            os.pwrite(self._fd, head, 0)
            os.ftruncate(self._fd, self.start + max((e for _, e in self.offsets.values()), default=0))
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, t: torch.Tensor) -> None:
        if name not in self.tensors:
            raise SizewiseError(f"{self.path.name} has no place for tensor {name!r}")
        dtype, shape = self.tensors[name]
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise SizewiseError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}; {self.path.name} was laid out "
                                f"for {dtype} {tuple(shape)}")
        start, end = self.offsets[name]
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        at = self.start + start
        view = memoryview(data)
        while view.nbytes:       # pwrite may write less than asked
            n = os.pwrite(self._fd, view, at)
            view, at = view[n:], at + n
        self.missing.discard(name)

    def close(self) -> None:
        if self.missing:
            first = sorted(self.missing)[0]
            self.abort()
            raise SizewiseError(f"{self.path.name}: {len(self.missing)} tensor(s) never written, first {first!r}")
        os.close(self._fd)
        self._fd = None

    def abort(self) -> None:
        """Close without the check (the file is in a staging area that goes with it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
