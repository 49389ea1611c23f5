"""Packed float models: pack a BF16/FP16 Hugging Face model bit-exactly, load it back as a
transformers model (built on the meta device, each tensor decoded and verified into place), or
unpack it to a plain safetensors directory. A packed artifact loads and unpacks as its dense model.

The packed directory's format is store.py's; artifacts are packed by artifacts.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from sizewise import artifact, builtins, locate
from sizewise.data import files_sha256
from sizewise.errors import SizewiseError
from sizewise.lossless.artifacts import load_packed_artifact
from sizewise.lossless.coder import CorruptData
from sizewise.lossless.store import (
    CODED, DTYPES, HF, KIND_ARTIFACT, KIND_MODEL, MANIFEST, WEIGHTS, Manifest, Reader, TensorEntry, Writer,
    check_threads, codec_info, decode_all, dtype_name, is_packed_model, read_manifest, side_files, staged_output,
    totals, write_manifest,
)

_WIDE = (torch.float32, torch.float64)   # what "a float32 model" is stored in
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# ---------------------------------------------------------------- packing a float model


def _resolve_model_dir(spec: str | Path) -> tuple[Path, dict]:
    """The Hugging Face directory holding the source's safetensors, and where it came from."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir() and is_packed_model(path):
        raise SizewiseError(f"{spec} is already lossless-packed (unpack it first)")
    if path.is_dir() and artifact.is_artifact(path):
        raise SizewiseError(f"{spec} is a sizewise artifact: pack it with pack_artifact (`sizewise pack` does this itself)")
    found = locate.model_dir(spec)   # the same directory (and GGUF cache entry) sources.load uses
    if found is not None:
        return found
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



def _plan_dtypes(index: dict[str, tuple[torch.dtype, int]], dtype: str | None, allow_lossy: bool, spec) -> torch.dtype | None:
    """Which dtype float tensors are stored in (None: each as it is); refuses silent rounding."""
    target = None
    if dtype is not None:
        if dtype not in ("bfloat16", "float16"):
            raise SizewiseError(f"dtype must be bfloat16 or float16, got {dtype!r}")
        target = DTYPES[dtype]
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
    changed = sorted({dtype_name(d) for d in float_bytes if d != target and (d in _WIDE or d in CODED)})
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

    threads = check_threads(threads)
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
              "dtypes": sorted({dtype_name(dt) for dt, _ in index.values()}),
              "bytes": sum(f.stat().st_size for f in files)}

    lossy_tensors, max_abs, lossy_from = 0, 0.0, set()
    with staged_output(out, overwrite) as tmp:
        writer = Writer(tmp / WEIGHTS, threads)
        try:
            for f in files:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        t = st.get_tensor(name)
                        if target is not None and t.is_floating_point() and t.dtype != target \
                                and (t.dtype in _WIDE or t.dtype in CODED):
                            r = t.to(target)
                            max_abs = max(max_abs, _rounding_error(name, t, r))
                            lossy_tensors += 1
                            lossy_from.add(dtype_name(t.dtype))
                            t = r
                        encoding = "float" if t.dtype in CODED else "raw"
                        writer.add(name, t, encoding, file=f.name)
        finally:
            entries = writer.close()
        lossy = None
        if lossy_tensors:
            lossy = {"what": f"{'/'.join(sorted(lossy_from))} -> {dtype_name(target)} rounding (round to nearest even)",
                     "tensors": lossy_tensors, "max_abs_error": max_abs}
        copied = []
        for p in side_files(directory):
            shutil.copy2(p, tmp / p.name)
            copied.append(p.name)
        if lossy:
            _restate_dtype(tmp, target, entries)
        weights_nbytes = (tmp / WEIGHTS).stat().st_size
        manifest = Manifest(kind=KIND_MODEL, tensors=entries, weights_nbytes=weights_nbytes, source=source,
                            lossy=lossy, files=copied, shards=shards, totals=totals(entries, weights_nbytes),
                            codec=codec_info())
        d = write_manifest(tmp, manifest)
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
        raise SizewiseError(f"{name}: values overflow {dtype_name(r.dtype)} (largest |w| {t[finite].abs().max().item():.4g})")
    return diff[finite].abs().max().item() if finite.any() else 0.0


def _restate_dtype(tmp: Path, target: torch.dtype, entries: dict[str, TensorEntry]) -> None:
    """After rounding, the copied config and shard index describe the stored weights, not the source's."""
    cfg = tmp / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in c:
                c[key] = dtype_name(target)
        cfg.write_text(json.dumps(c, indent=2) + "\n")
    index = tmp / "model.safetensors.index.json"
    if index.is_file():
        i = json.loads(index.read_text())
        i.setdefault("metadata", {})["total_size"] = sum(e.raw_nbytes for e in entries.values())
        index.write_text(json.dumps(i, indent=2) + "\n")



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
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
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
    threads = check_threads(threads)
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

    with Reader(path, manifest) as reader:
        decode_all(reader, list(fill.values()), threads, assign, convert=dtype)
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
    threads = check_threads(threads)
    if manifest.kind == KIND_ARTIFACT:
        model, tokenizer = _load_artifact_model(packed_dir, threads)
        with staged_output(out, overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        return {"path": str(out), "kind": KIND_ARTIFACT, "tensors": len(manifest.tensors)}
    by_file: dict[str, list[str]] = {}
    for name, e in manifest.tensors.items():
        by_file.setdefault(e.file or "model.safetensors", []).append(name)
    written = 0
    with staged_output(out, overwrite) as tmp, Reader(packed_dir, manifest) as reader:
        for fname, names in by_file.items():   # one shard in memory at a time
            tensors = {}
            decode_all(reader, names, threads, tensors.__setitem__)
            save_file({n: tensors[n] for n in names}, str(tmp / fname), metadata=manifest.shards.get(fname) or None)
            written += sum(manifest.tensors[n].raw_nbytes for n in names)
            del tensors
        for name in manifest.files:
            shutil.copy2(packed_dir / name, tmp / name)
    return {"path": str(out), "kind": KIND_MODEL, "files": sorted(by_file), "tensors": len(manifest.tensors),
            "bytes": written, "lossy": manifest.lossy}


# ---------------------------------------------------------------- a packed artifact as a model


def _load_artifact_model(path: Path, threads: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path / HF, trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    missing, unexpected = model.load_state_dict(load_packed_artifact(path, threads=threads), strict=False)
    if missing or unexpected:
        raise SizewiseError(f"{path} does not match its model config (missing {missing[:2]}, unexpected {unexpected[:2]})")
    return model.eval(), _tokenizer(path / HF)
