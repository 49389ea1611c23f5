"""Lossless packing as a model-level stage: a whole model (or a sizewise artifact) in one coded file.

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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from sizewise import artifact, builtins
from sizewise.atomic import staged_dir
from sizewise.data import files_sha256, sha256_file
from sizewise.errors import SizewiseError
from sizewise.lossless import codec
from sizewise.lossless.codec import coded_stats, encode_codes, encode_float
from sizewise.lossless.coder import CorruptData, backend, entropy_bits
from sizewise.lossless.container import CODE_DTYPES

FORMAT_NAME, FORMAT_VERSION = "sizewise-lossless", 1
MANIFEST, WEIGHTS, HF = "manifest.json", "weights.swl", "hf"
KIND_MODEL, KIND_ARTIFACT = "model", "artifact"

# Files of a model directory that hold weights: never copied (the packed file replaces them).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_CODED = (torch.bfloat16, torch.float16)
_WIDE = (torch.float32, torch.float64)   # what "a float32 model" is stored in
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _dtype_name(dtype: torch.dtype) -> str:
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
            return _DTYPES[self.dtype]
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


def _byte_view(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (no copy when it is contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(_byte_view(t)).hexdigest()


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


def _check_threads(threads: int | None) -> int:
    if threads is not None and threads < 1:
        raise SizewiseError(f"threads must be at least 1, got {threads}")
    return threads or codec._default_threads()


class _Writer:
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
        self.pending.append((name, fut, dict(dtype=_dtype_name(t.dtype), shape=list(t.shape), encoding=encoding,
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


def _totals(entries: dict[str, TensorEntry], weights_nbytes: int) -> dict:
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


# ---------------------------------------------------------------- atomic output


def _output(out: str | Path, overwrite: bool):
    """The staged directory that replaces `out` only when everything is written."""
    artifact.check_output(Path(out), overwrite)
    return staged_dir(out)


def _write_manifest(tmp: Path, manifest: Manifest) -> dict:
    d = manifest.to_dict()
    (tmp / MANIFEST).write_text(json.dumps(d, indent=1))
    return d


def _codec_info() -> dict:
    from sizewise import __version__
    return {"backend": backend(), "block_values": codec.DEFAULT_BLOCK_VALUES, "sizewise": __version__,
            "torch": torch.__version__}


# ---------------------------------------------------------------- packing a float model


def _resolve_model_dir(spec: str | Path) -> tuple[Path, dict]:
    """The Hugging Face directory holding the source's safetensors, and where it came from."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir() and is_packed_model(path):
        raise SizewiseError(f"{spec} is already lossless-packed (unpack it first)")
    if path.is_dir() and artifact.is_artifact(path):
        raise SizewiseError(f"{spec} is a sizewise artifact: pack it with pack_artifact (`sizewise pack` does this itself)")
    if path.is_dir() and (path / "config.json").is_file():
        return path, {"kind": "hf", "path": str(path.resolve())}
    if path.is_file() and path.suffix.lower() == ".gguf":
        digest = sha256_file(path)
        converted = builtins.cache_dir() / "gguf" / digest[:32]   # the same cache entry sources.load uses
        if not (converted / "config.json").is_file():
            builtins.gguf_to_hf(path, converted)
        return converted, {"kind": "gguf", "path": str(path.resolve()), "gguf_sha256": digest}
    if not path.exists() and builtins.is_builtin_model(spec):
        directory = builtins.fetch_model(spec)
        return directory, {"kind": "builtin", "path": str(directory)}
    if path.exists():
        raise SizewiseError(f"{spec} is neither a Hugging Face model directory (config.json) nor a .gguf file")
    raise SizewiseError(f"no model at {spec}: give a Hugging Face directory, a .gguf file or a built-in name "
                        f"({', '.join(builtins.MODELS)})")


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files that make up the model (the index's when sharded)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise SizewiseError(f"{index} is corrupt: {e}") from None
        files = [directory / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SizewiseError(f"{directory} lacks shards named in its index: {', '.join(missing[:3])}")
        return files
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise SizewiseError(f"{directory} holds only pickled PyTorch weights; convert them to safetensors first")
    raise SizewiseError(f"{directory} holds no model weights (*.safetensors)")


def _side_files(directory: Path) -> list[Path]:
    """Config, tokenizer, generation config, chat template, README...: every top-level non-weight file."""
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in _WEIGHT_SUFFIXES
                  and p.name not in (MANIFEST, WEIGHTS))


def _plan_dtypes(index: dict[str, tuple[torch.dtype, int]], dtype: str | None, allow_lossy: bool, spec) -> torch.dtype | None:
    """Which dtype float tensors are stored in (None: each as it is); refuses silent rounding."""
    target = None
    if dtype is not None:
        if dtype not in ("bfloat16", "float16"):
            raise SizewiseError(f"dtype must be bfloat16 or float16, got {dtype!r}")
        target = _DTYPES[dtype]
    float_bytes = {}
    for dt, nbytes in index.values():
        if dt.is_floating_point:
            float_bytes[dt] = float_bytes.get(dt, 0) + nbytes
    total = sum(float_bytes.values()) or 1
    wide = sum(float_bytes.get(d, 0) for d in _WIDE)
    if target is None:
        # A bf16 model may keep a few float32 tensors (routers, biases): stored raw, still exact.
        # A float32 model is not what lossless packing is for: say so instead of storing it raw.
        if wide * 2 > total:
            raise SizewiseError(
                f"{spec} stores {100 * wide / total:.0f}% of its float weights in float32; lossless packing codes "
                "bfloat16/float16 only. Rounding to bfloat16 is lossy: pass --dtype bfloat16 --allow-lossy to do it")
        return None
    changed = sorted({_dtype_name(d) for d in float_bytes if d != target and (d in _WIDE or d in _CODED)})
    if changed and not allow_lossy:
        raise SizewiseError(f"storing {spec}'s {'/'.join(changed)} weights as {dtype} rounds them (lossy); "
                            "pass --allow-lossy to accept that, or leave out --dtype to pack them exactly")
    return target


def pack_model(model_spec, out, *, dtype: str | None = None, allow_lossy: bool = False, overwrite: bool = False,
               threads: int | None = None) -> dict:
    """Entropy-code a BF16/FP16 model into `out`; returns the manifest.

    Float tensors in bfloat16/float16 are stored bit-exactly; other dtypes (integer buffers, a few
    float32 tensors of a bf16 model) raw. `dtype` rounds every float tensor to bfloat16/float16,
    which is lossy unless they already are, so it needs `allow_lossy`; the manifest records it.
    """
    from safetensors import SafetensorError, safe_open

    threads = _check_threads(threads)
    directory, source = _resolve_model_dir(model_spec)
    files = _weight_files(directory)
    # Pass 1, headers only: dtypes and sizes, so a refused conversion fails before any work.
    index, shards = {}, {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                shards[f.name] = st.metadata() or {}
                for name in st.keys():
                    sl = st.get_slice(name)
                    dt = _ST_DTYPES.get(sl.get_dtype())
                    if dt is None:
                        raise SizewiseError(f"{f.name}: tensor {name} has dtype {sl.get_dtype()}, which sizewise cannot store")
                    if name in index:
                        raise SizewiseError(f"tensor {name} appears in two weight files")
                    index[name] = (dt, int(np.prod(sl.get_shape(), dtype=np.int64)) * dt.itemsize)
    except (SafetensorError, OSError) as e:
        raise SizewiseError(f"cannot read the weights of {model_spec}: {e}") from None
    target = _plan_dtypes(index, dtype, allow_lossy, model_spec)
    source = {"spec": str(model_spec), **source, "weights_sha256": files_sha256(files),
              "dtypes": sorted({_dtype_name(dt) for dt, _ in index.values()}),
              "bytes": sum(f.stat().st_size for f in files)}

    lossy_tensors, max_abs, lossy_from = 0, 0.0, set()
    with _output(out, overwrite) as tmp:
        writer = _Writer(tmp / WEIGHTS, threads)
        try:
            for f in files:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        t = st.get_tensor(name)
                        if target is not None and t.is_floating_point() and t.dtype != target \
                                and (t.dtype in _WIDE or t.dtype in _CODED):
                            r = t.to(target)
                            max_abs = max(max_abs, _rounding_error(name, t, r))
                            lossy_tensors += 1
                            lossy_from.add(_dtype_name(t.dtype))
                            t = r
                        encoding = "float" if t.dtype in _CODED else "raw"
                        writer.add(name, t, encoding, file=f.name)
        finally:
            entries = writer.close()
        lossy = None
        if lossy_tensors:
            lossy = {"what": f"{'/'.join(sorted(lossy_from))} -> {_dtype_name(target)} rounding (round to nearest even)",
                     "tensors": lossy_tensors, "max_abs_error": max_abs}
        copied = []
        for p in _side_files(directory):
            shutil.copy2(p, tmp / p.name)
            copied.append(p.name)
        if lossy:
            _restate_dtype(tmp, target, entries)
        weights_nbytes = (tmp / WEIGHTS).stat().st_size
        manifest = Manifest(kind=KIND_MODEL, tensors=entries, weights_nbytes=weights_nbytes, source=source,
                            lossy=lossy, files=copied, shards=shards, totals=_totals(entries, weights_nbytes),
                            codec=_codec_info())
        d = _write_manifest(tmp, manifest)
    return {**d, "path": str(out)}


def _rounding_error(name: str, t: torch.Tensor, r: torch.Tensor) -> float:
    """Largest |r - t| over finite values; raises if rounding turned a finite value infinite.
    Few passes on purpose: this runs over every weight of the model."""
    work = torch.promote_types(t.dtype, torch.float32)   # where the rounding error is exact
    diff = r.to(work) - t.to(work)
    if diff.numel() == 0:
        return 0.0
    lo, hi = diff.aminmax()
    err = max(-lo.item(), hi.item())
    if math.isfinite(err):
        return err
    finite = torch.isfinite(t)   # slow path: inf/NaN in the source, or an overflow
    if (finite & ~torch.isfinite(r)).any():
        raise SizewiseError(f"{name}: values overflow {_dtype_name(r.dtype)} (largest |w| {t[finite].abs().max().item():.4g})")
    return diff[finite].abs().max().item() if finite.any() else 0.0


def _restate_dtype(tmp: Path, target: torch.dtype, entries: dict[str, TensorEntry]) -> None:
    """After rounding, the copied config and shard index describe the stored weights, not the source's."""
    cfg = tmp / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in c:
                c[key] = _dtype_name(target)
        cfg.write_text(json.dumps(c, indent=2) + "\n")
    index = tmp / "model.safetensors.index.json"
    if index.is_file():
        i = json.loads(index.read_text())
        i.setdefault("metadata", {})["total_size"] = sum(e.raw_nbytes for e in entries.values())
        index.write_text(json.dumps(i, indent=2) + "\n")


# ---------------------------------------------------------------- reading tensors back


class _Reader:
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
            header = codec._float_header(mv)
            if codec._KIND_DTYPES[header.kind] != dtype:
                raise CorruptData(f"payload holds {codec._KIND_DTYPES[header.kind]}, manifest says {dtype}")
            out = torch.empty(shape, dtype=dtype)
            dst = out.reshape(-1).view(torch.int16).numpy().view(np.uint16)
            decode_into = codec._decode_float_into
        elif e.encoding == "codes":
            header = codec._codes_header(mv)
            if CODE_DTYPES[header.dtype] != np.uint8 or dtype != torch.uint8 or header.bits != e.bits:
                raise CorruptData("payload does not hold the uint8 codes the manifest describes")
            out = torch.empty(shape, dtype=torch.uint8)
            dst = out.reshape(-1).numpy()
            decode_into = codec._decode_codes_into
        else:
            raise CorruptData(f"unknown encoding {e.encoding!r}")
        if tuple(header.shape) != shape:
            raise CorruptData(f"payload shape {tuple(header.shape)}, manifest says {shape}")
        # Decode each block straight into the destination tensor: no intermediate copy of the weights.
        for i, at in enumerate(header.block_offsets()):
            start, stop = header.block_range(i)
            decode_into(mv, header, i, at, dst[start:stop])
        return out


def _decode_all(reader: _Reader, names: list[str], threads: int, sink, convert: torch.dtype | None = None) -> None:
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
    with _Reader(path, manifest) as reader:
        _decode_all(reader, list(manifest.tensors), _check_threads(threads), out.__setitem__)
    return {n: out[n] for n in manifest.tensors}, manifest


# ---------------------------------------------------------------- loading a model


def _slots(model) -> tuple[dict[str, int], dict[int, list], dict[int, str]]:
    """Tied weights: name -> group id, group id -> every (module, attribute, is_parameter) holding
    that tensor, and group id -> its first name (the one transformers treats as the source of a tie)."""
    group_of, members, first = {}, {}, {}
    named = [(n, t, True) for n, t in model.named_parameters(remove_duplicate=False)]
    named += [(n, t, False) for n, t in model.named_buffers(remove_duplicate=False)]
    for name, t, is_param in named:
        mod_name, _, leaf = name.rpartition(".")
        key = id(t)
        group_of[name] = key
        first.setdefault(key, name)
        members.setdefault(key, []).append((model.get_submodule(mod_name), leaf, is_param))
    return group_of, members, first


def _build_model(config, dtype: torch.dtype):
    """The model with parameters on the meta device (no memory) and real buffers (rotary tables...)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()   # skipped for meta parameters at construction; _slots needs the ties in place
    return model


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SizewiseError(f"cannot load the tokenizer of {directory}: {first}") from None


def _stored_dtype(manifest: Manifest) -> torch.dtype:
    """The float dtype holding most bytes: what the model is built in."""
    by = {}
    for e in manifest.tensors.values():
        dt = e.torch_dtype
        if dt.is_floating_point:
            by[dt] = by.get(dt, 0) + e.raw_nbytes
    return max(by, key=by.get) if by else torch.float32


def load_packed_model(path: str | Path, threads: int | None = None, *, dtype: torch.dtype | None = None):
    """(model, tokenizer, info) from a packed directory; weights bit-identical to the packed ones.

    The model is built with empty (meta) parameters and each tensor is decoded, verified against
    its sha256 and assigned as it arrives: peak memory is the model plus about one coded tensor
    per thread. `dtype` (e.g. torch.float32) converts each float tensor right after verification;
    None keeps the stored dtype. A packed artifact loads like artifact.load (dense float32).
    """
    from transformers import AutoConfig

    t0 = time.perf_counter()
    path = Path(path)
    manifest = read_manifest(path)
    threads = _check_threads(threads)
    info = {"kind": "lossless", "path": str(path.resolve()),
            "sha256": hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest(),
            "packed_from": manifest.source, "lossy": manifest.lossy, "threads": threads}
    if manifest.kind == KIND_ARTIFACT:
        model, tokenizer = _load_artifact_model(path, threads)
        info["compressed_from"] = (manifest.artifact_manifest or {}).get("source")
        return model, tokenizer, {**info, "load_s": time.perf_counter() - t0}
    if manifest.kind != KIND_MODEL:
        raise CorruptData(f"{path / MANIFEST}: unknown kind {manifest.kind!r}")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise SizewiseError(f"cannot read the model config in {path}: {str(e).strip().splitlines()[0]}") from None
    build_dtype = dtype or _stored_dtype(manifest)
    model = _build_model(config, build_dtype)
    group_of, members, first = _slots(model)
    # Which stored tensor fills each group of tied slots: the group's first name if stored, else any.
    fill: dict[int, str] = {}
    for name in manifest.tensors:
        key = group_of.get(name)
        if key is not None and (key not in fill or name == first[key]):
            fill[key] = name
    unknown = [n for n in manifest.tensors if n not in group_of]
    empty = [n for n, p in model.named_parameters() if p.is_meta and group_of[n] not in fill]
    if unknown or empty:
        raise SizewiseError(f"{path}: the stored tensors do not match the model built from its config "
                            f"(not in the model: {unknown[:2]}, not stored: {empty[:2]}); "
                            "`sizewise unpack` gives a directory transformers can load with its own name mapping")

    t1 = time.perf_counter()

    def assign(name: str, t: torch.Tensor) -> None:
        param = torch.nn.Parameter(t, requires_grad=False)   # one object for all tied slots
        for module, leaf, is_param in members[group_of[name]]:
            if is_param:
                module._parameters[leaf] = param
            else:
                module._buffers[leaf] = t

    with _Reader(path, manifest) as reader:
        _decode_all(reader, list(fill.values()), threads, assign, convert=dtype)
    decode_s = time.perf_counter() - t1
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise SizewiseError(f"{path}: tensors left unset after loading: {meta[:3]}")
    tokenizer = _tokenizer(path)
    decoded = sum(manifest.tensors[n].raw_nbytes for n in fill.values())
    info.update(decode_s=decode_s, decoded_bytes=decoded, load_s=time.perf_counter() - t0)
    return model.eval(), tokenizer, info


# ---------------------------------------------------------------- unpacking


def unpack_model(packed_dir, out, overwrite: bool = False, *, threads: int | None = None) -> dict:
    """Write a packed model back as a plain Hugging Face safetensors directory (same file layout,
    same tensor names, same bytes per tensor). A packed artifact unpacks to its dense float32 model."""
    from safetensors.torch import save_file

    packed_dir = Path(packed_dir)
    manifest = read_manifest(packed_dir)
    threads = _check_threads(threads)
    if manifest.kind == KIND_ARTIFACT:
        model, tokenizer = _load_artifact_model(packed_dir, threads)
        with _output(out, overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        return {"path": str(out), "kind": KIND_ARTIFACT, "tensors": len(manifest.tensors)}
    by_file: dict[str, list[str]] = {}
    for name, e in manifest.tensors.items():
        by_file.setdefault(e.file or "model.safetensors", []).append(name)
    written = 0
    with _output(out, overwrite) as tmp, _Reader(packed_dir, manifest) as reader:
        for fname, names in by_file.items():   # one shard in memory at a time
            tensors = {}
            _decode_all(reader, names, threads, tensors.__setitem__)
            save_file({n: tensors[n] for n in names}, str(tmp / fname), metadata=manifest.shards.get(fname) or None)
            written += sum(manifest.tensors[n].raw_nbytes for n in names)
            del tensors
        for name in manifest.files:
            shutil.copy2(packed_dir / name, tmp / name)
    return {"path": str(out), "kind": KIND_MODEL, "files": sorted(by_file), "tensors": len(manifest.tensors),
            "bytes": written, "lossy": manifest.lossy}


# ---------------------------------------------------------------- quantized artifacts


def _entropy_per_value(values: np.ndarray) -> float:
    """Order-0 entropy of the codes one by one (bits per code), over the whole tensor."""
    flat = values.reshape(-1).astype(np.uint8, copy=False)
    return entropy_bits(flat) / flat.size if flat.size else 0.0


def code_artifact_stats(artifact_dir, *, threads: int | None = None) -> dict:
    """For each quantized tensor of an artifact: its codes entropy-coded, nominal vs coded bits per
    code and the entropy bounds (per-block order-0 on the coded symbols, and of single codes)."""
    from sizewise.quant.uniform import QuantizedTensor

    stored, amanifest = artifact.load_stored(artifact_dir)
    rows, tot = {}, {"codes": 0, "nominal_bits": 0, "coded_bits": 0, "bound_bits": 0.0, "single_bound_bits": 0.0,
                     "zeros_nominal_bits": 0, "zeros_coded_bits": 0, "params": 0, "stored_bits": 0}
    items = [(n, t) for n, t in stored.items() if isinstance(t, QuantizedTensor)]

    def one(item):
        name, qt = item
        codes = qt.codes.numpy()
        bits = qt.fmt.bits
        s = coded_stats(encode_codes(codes, bits, threads=1))
        row = {"shape": list(codes.shape), "bits": bits, "codes": s["numel"],
               "nominal_bits_per_code": float(bits), "coded_bits_per_code": s["bits_per_value"],
               "entropy_bound_bits_per_code": s["entropy_bound_bits_per_value"],
               "single_code_entropy": _entropy_per_value(codes),
               "coded_bits": s["coded_bits"], "bound_bits": s["entropy_bound_bits"],
               "stored_bits": amanifest["tensors"][name]["stored_bits"]}
        if qt.zeros is not None and qt.fmt.zero == "int":
            z = coded_stats(encode_codes(qt.zeros.numpy(), bits, threads=1))
            row["zeros_nominal_bits"], row["zeros_coded_bits"] = z["raw_bits"], z["coded_bits"]
        return name, row

    with ThreadPoolExecutor(_check_threads(threads)) as pool:
        for name, row in pool.map(one, items):
            rows[name] = row
            tot["codes"] += row["codes"]
            tot["nominal_bits"] += row["codes"] * row["bits"]
            tot["coded_bits"] += row["coded_bits"]
            tot["bound_bits"] += row["bound_bits"]
            tot["single_bound_bits"] += row["single_code_entropy"] * row["codes"]
            tot["zeros_nominal_bits"] += row.get("zeros_nominal_bits", 0)
            tot["zeros_coded_bits"] += row.get("zeros_coded_bits", 0)
            tot["params"] += row["codes"]
            tot["stored_bits"] += row["stored_bits"]
    n = tot["codes"] or 1
    saved = (tot["nominal_bits"] - tot["coded_bits"]) + (tot["zeros_nominal_bits"] - tot["zeros_coded_bits"])
    totals = {**tot,
              "nominal_bits_per_code": tot["nominal_bits"] / n, "coded_bits_per_code": tot["coded_bits"] / n,
              "entropy_bound_bits_per_code": tot["bound_bits"] / n,
              "single_code_entropy_bits_per_code": tot["single_bound_bits"] / n,
              # everything stored for the quantized weights (codes, scales, zeros), before and after coding
              "bits_per_weight_nominal": tot["stored_bits"] / n,
              "bits_per_weight_coded": (tot["stored_bits"] - saved) / n}
    return {"artifact": str(artifact_dir), "tensors": rows, "totals": totals}


def pack_artifact(artifact_dir, out, *, overwrite: bool = False, threads: int | None = None) -> dict:
    """A sizewise artifact with its integer codes (and integer zeros) entropy-coded, bf16/fp16 scales
    and float tensors coded as floats, the rest raw; the dense hf/ copy is dropped (it is rebuilt)."""
    from sizewise.quant.codebook import CodebookTensor
    from sizewise.quant.uniform import QuantizedTensor
    from sizewise.quant.kquant import KQuantTensor

    artifact_dir = Path(artifact_dir)
    threads = _check_threads(threads)
    stored, amanifest = artifact.load_stored(artifact_dir)
    with _output(out, overwrite) as tmp:
        writer = _Writer(tmp / WEIGHTS, threads)

        def add_float(name, t):
            writer.add(name, t, "float" if t.dtype in _CODED else "raw")

        try:
            for name, t in stored.items():
                if isinstance(t, QuantizedTensor):
                    writer.add(f"{name}:codes", t.codes.contiguous(), "codes", bits=t.fmt.bits)
                    add_float(f"{name}:scales", t.scales)
                    if t.zeros is not None:
                        if t.fmt.zero == "int":
                            writer.add(f"{name}:zeros", t.zeros.contiguous(), "codes", bits=t.fmt.bits)
                        else:
                            add_float(f"{name}:zeros", t.zeros)
                elif isinstance(t, (KQuantTensor, CodebookTensor)):   # ggml's blocks, as the artifact stores them
                    writer.add(f"{name}:ggml", torch.from_numpy(t.fmt.ggml_blocks(t)), "raw")
                else:
                    add_float(name, t)
        finally:
            entries = writer.close()
        copied = []
        dense = artifact_dir / artifact.DENSE
        if dense.is_dir():
            (tmp / HF).mkdir()
            for p in _side_files(dense):
                shutil.copy2(p, tmp / HF / p.name)
                copied.append(f"{HF}/{p.name}")
        weights_nbytes = (tmp / WEIGHTS).stat().st_size
        source = {"spec": str(artifact_dir), "kind": "artifact", "path": str(artifact_dir.resolve()),
                  "manifest_sha256": hashlib.sha256((artifact_dir / artifact.MANIFEST).read_bytes()).hexdigest(),
                  "packed_bytes": (artifact_dir / artifact.PACKED).stat().st_size}
        manifest = Manifest(kind=KIND_ARTIFACT, tensors=entries, weights_nbytes=weights_nbytes, source=source,
                            files=copied, artifact_manifest=amanifest, totals=_totals(entries, weights_nbytes),
                            codec=_codec_info())
        d = _write_manifest(tmp, manifest)
    return {**d, "path": str(out)}


def load_packed_stored(path, *, threads: int | None = None) -> tuple[dict, dict]:
    """Like artifact.load_stored for a packed artifact: (QuantizedTensor or tensor per name, artifact manifest)."""
    from sizewise.quant.registry import format_from_dict
    from sizewise.quant.uniform import QuantizedTensor

    tensors, manifest = load_packed_tensors(path, threads=threads)
    if manifest.kind != KIND_ARTIFACT or manifest.artifact_manifest is None:
        raise SizewiseError(f"{path} is a packed model, not a packed artifact")
    amanifest = manifest.artifact_manifest
    stored = {}
    try:
        for name, entry in amanifest["tensors"].items():
            if entry["format"]["kind"] == "quant":
                stored[name] = QuantizedTensor(format_from_dict(entry["format"]), tensors[f"{name}:codes"],
                                               tensors[f"{name}:scales"], tensors.get(f"{name}:zeros"))
            elif entry["format"]["kind"] in ("kquant", "codebook"):
                stored[name] = format_from_dict(entry["format"]).from_parts({"ggml": tensors[f"{name}:ggml"]},
                                                                            artifact.stored_shape(entry))
            else:
                stored[name] = tensors[name]
    except KeyError as e:
        raise CorruptData(f"{path}: packed artifact lacks tensor {e}") from None
    return stored, amanifest


def load_packed_artifact(path, *, threads: int | None = None) -> dict[str, torch.Tensor]:
    """The dense state dict (float32, model layout), equal to artifact.load_weights of the source artifact."""
    return artifact.dense_state(*load_packed_stored(path, threads=threads))


def _load_artifact_model(path: Path, threads: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path / HF)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_packed_artifact(path, threads=threads), strict=False)
    if missing or unexpected:
        raise SizewiseError(f"{path} does not match its model config (missing {missing[:2]}, unexpected {unexpected[:2]})")
    return model.eval(), _tokenizer(path / HF)
