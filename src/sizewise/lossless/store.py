"""The packed store: one directory holding a whole model (or artifact) in one coded file.

    DIR/manifest.json   format "sizewise-lossless": one entry per tensor (dtype, shape, where its bytes
                        are, raw and coded size, entropy bound, sha256 of the raw tensor bytes)
    DIR/weights.swl     every tensor's payload back to back: an encode_float / encode_codes blob
                        (self-describing, crc-checked blocks) or the raw bytes for other dtypes
    DIR/config.json ... the source's config, tokenizer and generation files, copied unchanged
    DIR/hf/             (packed artifacts only) the artifact's config and tokenizer files

Why one coded file with an offset index rather than one file per tensor: a 70B checkpoint has
~1000 tensors, and one file is one thing to copy, checksum and open; each tensor is still read
alone (one pread at its offset) and each payload still carries its own header and CRCs, so
nothing is lost in random access or in locating damage.

Bit-exactness is checked, not assumed: each decoded tensor's sha256 must equal the manifest's,
so a load either gives the packed weights exactly or raises (CorruptData / SizewiseError).
The directory is written beside its final path and renamed into place, so one that exists is complete.

This module holds the format (TensorEntry, Manifest), the Writer and Reader of weights.swl and
what every packing shares (threads, totals, the staged output); float_model.py packs models,
artifacts.py packs artifacts.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from sizewise import artifact
from sizewise.atomic import staged_dir
from sizewise.data import tensor_bytes, tensor_sha256
from sizewise.errors import SizewiseError
from sizewise.paths import inside
from sizewise.lossless import codec
from sizewise.lossless.codec import coded_stats, encode_codes, encode_float
from sizewise.lossless.coder import CorruptData, backend
from sizewise.lossless.container import CODE_DTYPES

FORMAT_NAME, FORMAT_VERSION = "sizewise-lossless", 1
MANIFEST, WEIGHTS, HF = "manifest.json", "weights.swl", "hf"
KIND_MODEL, KIND_ARTIFACT = "model", "artifact"

# Files of a model directory that hold weights: never copied (the packed file replaces them).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
CODED = (torch.bfloat16, torch.float16)   # float dtypes stored entropy-coded ("float"); others raw
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- the format


@dataclass
class TensorEntry:
    """One tensor in weights.swl. `encoding`: "float" (encode_float), "codes" (encode_codes) or "raw"."""

    dtype: str
    shape: list[int]
    encoding: str
    offset: int
    nbytes: int                  # bytes in weights.swl
    raw_nbytes: int              # bytes of the tensor stored plainly (numel * element size)
    entropy_bound_bits: float    # Shannon bound of the coded symbols + bits stored plainly; raw: 8 * nbytes
    sha256: str                  # of the raw tensor bytes (little-endian, row-major): equal hash = bit-exact
    bits: int | None = None      # codes only: bits per code
    file: str | None = None      # models only: the source safetensors file it came from (unpack writes it back)

    @classmethod
    def from_dict(cls, d: dict) -> TensorEntry:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise CorruptData(f"unknown tensor dtype {self.dtype!r} in the manifest") from None


@dataclass
class Manifest:
    kind: str                                    # "model" or "artifact"
    tensors: dict[str, TensorEntry]              # in weights.swl order
    weights_nbytes: int
    source: dict = field(default_factory=dict)
    lossy: dict | None = None                    # None: the packed weights equal the source's bit for bit
    files: list[str] = field(default_factory=list)            # copied alongside (relative paths)
    shards: dict[str, dict] = field(default_factory=dict)     # models: source safetensors file -> its metadata
    artifact_manifest: dict | None = None        # artifacts: the source artifact's manifest, verbatim
    totals: dict = field(default_factory=dict)
    codec: dict = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensors"] = {k: {a: b for a, b in asdict(v).items() if b is not None} for k, v in self.tensors.items()}
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["tensors"] = {k: TensorEntry.from_dict(v) for k, v in d["tensors"].items()}
        return cls(**d)


def _read_manifest_dict(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_packed_model(path: str | Path) -> bool:
    """A directory written by pack_model or pack_artifact (its manifest names the format)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return False
    m = _read_manifest_dict(path)
    return isinstance(m, dict) and m.get("format") == FORMAT_NAME


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise SizewiseError(f"{path} is not a lossless-packed model (no {MANIFEST})")
    m = _read_manifest_dict(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise SizewiseError(f"{path / MANIFEST} is not a {FORMAT_NAME} manifest (or is corrupt)")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise SizewiseError(f"{path} was packed by a newer sizewise (format version {m['format_version']})")
    try:
        manifest = Manifest.from_dict(m)
    except (KeyError, TypeError) as e:
        raise CorruptData(f"{path / MANIFEST} is corrupt: {type(e).__name__}: {e}") from None
    # Every file name it holds is joined to this directory (reading) and to an output (unpacking).
    for name in [*manifest.files, *manifest.shards, *{e.file for e in manifest.tensors.values() if e.file is not None}]:
        inside(path, name, f"{path / MANIFEST}")
    # The index must tile the file exactly: a gap or overlap means a tampered or mismatched manifest.
    at = 0
    for name, e in manifest.tensors.items():
        if e.offset != at or e.nbytes < 0:
            raise CorruptData(f"{path / MANIFEST}: tensor {name} is not where the index says (offset {e.offset}, expected {at})")
        at += e.nbytes
    if at != manifest.weights_nbytes:
        raise CorruptData(f"{path / MANIFEST}: tensors cover {at} bytes, manifest says {manifest.weights_nbytes}")
    return manifest


# ---------------------------------------------------------------- bytes and hashes


_byte_view, _sha256 = tensor_bytes, tensor_sha256


def _encode(t: torch.Tensor, encoding: str, bits: int | None = None) -> tuple[bytes, float, str]:
    """Payload bytes, entropy bound (bits) and sha256 of one tensor. One thread per tensor rather
    than the codec's threads per block: most tensors of a model are a single block."""
    digest = _sha256(t)
    if encoding == "float":
        data = encode_float(t, threads=1)
    elif encoding == "codes":
        data = encode_codes(t.numpy(), bits, threads=1)
    else:
        data = _byte_view(t).tobytes()
        return data, 8.0 * len(data), digest
    s = coded_stats(data)
    return data, s["entropy_bound_bits"] + s["plain_bits"], digest


def check_threads(threads: int | None) -> int:
    if threads is not None and threads < 1:
        raise SizewiseError(f"threads must be at least 1, got {threads}")
    return threads or codec.default_threads()


class Writer:
    """Appends payloads to weights.swl, encoding up to 2 * threads tensors at a time in order."""

    def __init__(self, path: Path, threads: int):
        self.f = open(path, "wb")
        self.pool = ThreadPoolExecutor(threads)
        self.pending: deque = deque()
        self.limit = 2 * threads   # bounds the tensors held in memory at once
        self.entries: dict[str, TensorEntry] = {}
        self.at = 0

    def add(self, name: str, t: torch.Tensor, encoding: str, *, bits: int | None = None, file: str | None = None) -> None:
        fut = self.pool.submit(_encode, t, encoding, bits)
        self.pending.append((name, fut, dict(dtype=dtype_name(t.dtype), shape=list(t.shape), encoding=encoding,
                                             raw_nbytes=t.numel() * t.element_size(), bits=bits, file=file)))
        while len(self.pending) >= self.limit:
            self._flush_one()

    def _flush_one(self) -> None:
        name, fut, meta = self.pending.popleft()
        data, bound, digest = fut.result()
        self.f.write(data)
        self.entries[name] = TensorEntry(offset=self.at, nbytes=len(data), entropy_bound_bits=bound, sha256=digest, **meta)
        self.at += len(data)

    def close(self) -> dict[str, TensorEntry]:
        try:
            while self.pending:
                self._flush_one()
            self.f.flush()
            os.fsync(self.f.fileno())
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.f.close()
        return self.entries


def totals(entries: dict[str, TensorEntry], weights_nbytes: int) -> dict:
    """Sizes over the whole file and over the entropy-coded float tensors alone."""
    def side(es):
        raw = sum(e.raw_nbytes for e in es)
        coded = sum(e.nbytes for e in es)
        bound = sum(e.entropy_bound_bits for e in es) / 8
        return {"tensors": len(es), "params": sum(e.numel for e in es), "raw_bytes": raw, "coded_bytes": coded,
                "entropy_bound_bytes": bound, "ratio": coded / raw if raw else 1.0,
                "bound_ratio": bound / raw if raw else 1.0}

    es = list(entries.values())
    out = side(es)
    out["file_bytes"] = weights_nbytes
    out["bits_per_param"] = 8 * weights_nbytes / out["params"] if out["params"] else 0.0
    for enc in ("float", "codes", "raw"):
        sub = [e for e in es if e.encoding == enc]
        if sub:
            out[enc] = side(sub)
    return out


# ---------------------------------------------------------------- atomic output and side files


def staged_output(out: str | Path, overwrite: bool):
    """The staged directory that replaces `out` only when everything is written."""
    artifact.check_output(Path(out), overwrite)
    return staged_dir(out, overwrite=overwrite)


def write_manifest(tmp: Path, manifest: Manifest) -> dict:
    d = manifest.to_dict()
    (tmp / MANIFEST).write_text(json.dumps(d, indent=1))
    return d


def codec_info() -> dict:
    from sizewise import __version__
    return {"backend": backend(), "block_values": codec.DEFAULT_BLOCK_VALUES, "sizewise": __version__,
            "torch": torch.__version__}


def side_files(directory: Path) -> list[Path]:
    """Config, tokenizer, generation config, chat template, README...: every top-level non-weight file."""
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in _WEIGHT_SUFFIXES
                  and p.name not in (MANIFEST, WEIGHTS))


# ---------------------------------------------------------------- reading tensors back


class Reader:
    """Reads and verifies tensors of a packed directory; each read is one pread (releases the GIL)."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path / WEIGHTS
        self.manifest = manifest
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CorruptData(f"{self.path} is missing or unreadable: {e.strerror}") from None
        size = os.fstat(self.fd).st_size
        if size != manifest.weights_nbytes:   # truncation or appended junk: refuse before decoding anything
            os.close(self.fd)
            raise CorruptData(f"{self.path} is {size} bytes, the manifest says {manifest.weights_nbytes} (truncated or replaced?)")

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def read(self, name: str) -> torch.Tensor:
        """The tensor exactly as packed, or CorruptData naming it."""
        e = self.manifest.tensors[name]
        try:
            t = self._decode(e)
        except CorruptData as err:
            raise CorruptData(f"{self.path}: tensor {name}: {err}") from None
        if _sha256(t) != e.sha256:
            raise CorruptData(f"{self.path}: tensor {name}: sha256 mismatch, the decoded bytes differ from the packed ones")
        return t

    def _pread(self, e: TensorEntry, buf) -> None:
        got = os.preadv(self.fd, [buf], e.offset)
        if got != e.nbytes:
            raise CorruptData(f"short read: {got} of {e.nbytes} bytes at offset {e.offset}")

    def _decode(self, e: TensorEntry) -> torch.Tensor:
        dtype, shape = e.torch_dtype, tuple(e.shape)
        if e.encoding == "raw":
            if e.nbytes != e.numel * dtype.itemsize:
                raise CorruptData(f"raw tensor of {e.nbytes} bytes for {e.numel} x {dtype}")
            out = torch.empty(shape, dtype=dtype)
            if e.nbytes:
                self._pread(e, _byte_view(out))   # straight into the tensor's storage
            return out
        data = bytearray(e.nbytes)
        self._pread(e, data)
        mv = memoryview(data)
        if e.encoding == "float":
            header = codec.float_header(mv)
            if codec.float_dtype(header) != dtype:
                raise CorruptData(f"payload holds {codec.float_dtype(header)}, manifest says {dtype}")
            out = torch.empty(shape, dtype=dtype)
            dst = out.reshape(-1).view(torch.int16).numpy().view(np.uint16)
            decode_into = codec.decode_float_into
        elif e.encoding == "codes":
            header = codec.codes_header(mv)
            if CODE_DTYPES[header.dtype] != np.uint8 or dtype != torch.uint8 or header.bits != e.bits:
                raise CorruptData("payload does not hold the uint8 codes the manifest describes")
            out = torch.empty(shape, dtype=torch.uint8)
            dst = out.reshape(-1).numpy()
            decode_into = codec.decode_codes_into
        else:
            raise CorruptData(f"unknown encoding {e.encoding!r}")
        if tuple(header.shape) != shape:
            raise CorruptData(f"payload shape {tuple(header.shape)}, manifest says {shape}")
        # Decode each block straight into the destination tensor: no intermediate copy of the weights.
        decode_into(mv, header, dst)
        return out


def decode_all(reader: Reader, names: list[str], threads: int, sink, convert: torch.dtype | None = None) -> None:
    """Decode `names` on `threads` threads, largest first (balance), and hand each verified tensor to
    sink(name, tensor) on this thread as soon as it is ready, so at most `threads` coded payloads
    are in memory beside the weights. The first failure stops everything and propagates."""
    order = sorted(names, key=lambda n: -reader.manifest.tensors[n].raw_nbytes)

    def job(name):
        t = reader.read(name)
        return t.to(convert) if convert is not None and t.is_floating_point() else t

    pool = ThreadPoolExecutor(max(1, min(threads, len(order))))
    try:
        running = {}
        todo = iter(order)
        for name in todo:   # keep exactly `threads` jobs queued: later ones are not read early
            running[pool.submit(job, name)] = name
            if len(running) >= threads:
                break
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                sink(name, fut.result())
                nxt = next(todo, None)
                if nxt is not None:
                    running[pool.submit(job, nxt)] = nxt
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def load_packed_tensors(path: str | Path, *, threads: int | None = None) -> tuple[dict[str, torch.Tensor], Manifest]:
    """Every tensor of a packed directory, verified, in its stored dtype (name -> tensor)."""
    path = Path(path)
    manifest = read_manifest(path)
    out = {}
    with Reader(path, manifest) as reader:
        decode_all(reader, list(manifest.tensors), check_threads(threads), out.__setitem__)
    return {n: out[n] for n in manifest.tensors}, manifest

