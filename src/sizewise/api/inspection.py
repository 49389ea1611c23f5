"""What a model stores: `info` on any model spec (an artifact, a lossless-packed directory, a GGUF
file, a Hugging Face directory, a built-in name), read from headers and manifests only: no weights
are loaded and nothing is converted."""

from __future__ import annotations

import json
from pathlib import Path

from .. import artifact, builtins
from ..errors import SizewiseError

# bits per element of safetensors' dtypes
_ST_BITS = {"F64": 64, "I64": 64, "U64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16, "BF16": 16, "I16": 16,
            "U16": 16, "I8": 8, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}


def info(path: str | Path) -> dict:
    """What a model stores: per tensor its format and bits, totals, size on disk ("disk_bytes"), and
    "kind" (artifact, packed, gguf, hf, builtin). An artifact also gives its provenance and bits per
    weight over the compressed linear layers; a packed artifact is its artifact plus the coded sizes
    ("lossless"), a packed float model is listed per tensor with its coded bits per parameter."""
    from ..lossless import is_packed_model

    spec, p = str(path), Path(path)
    if p.is_dir() and is_packed_model(p):
        return {**_packed_info(p), "kind": "packed", "disk_bytes": disk_bytes(p)}
    if p.is_dir() and artifact.is_artifact(p):
        return {**_artifact_info(artifact.read_manifest(p), p), "kind": "artifact", "disk_bytes": disk_bytes(p)}
    if p.is_file() and p.suffix.lower() == ".gguf":
        return _gguf_info(p)
    if p.is_dir() and (p / "config.json").is_file():
        return _hf_info(p, "hf", spec)
    if not p.exists() and builtins.is_builtin_model(spec):
        return _hf_info(builtins.fetch_model(spec), "builtin", spec)
    if p.exists():
        raise SizewiseError(f"{spec} is not a model: give a sizewise artifact, a lossless-packed directory, a .gguf "
                            "file or a Hugging Face directory (config.json)")
    raise SizewiseError(f"no model at {spec}: give a path or a built-in name ({', '.join(builtins.MODELS)})")


def disk_bytes(path: str | Path) -> int:
    """Bytes of every file under `path` (or of the file itself)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _packed_info(path: Path) -> dict:
    from ..lossless import read_manifest as read_packed

    pm = read_packed(path)
    if pm.kind == "artifact":
        res = _artifact_info(pm.artifact_manifest, path)
    else:
        layers = [{"name": n, "method": "float", "shape": e.shape, "format": f"{e.dtype}, {e.encoding}",
                   "bits_per_weight": 8 * e.nbytes / max(e.numel, 1), "bytes": e.nbytes, "linear": False}
                  for n, e in pm.tensors.items()]
        res = {"path": str(path), "linear_params": 0, "bits_per_weight": None,
               "model_params": pm.totals["params"], "bits_per_weight_model": pm.totals["bits_per_param"],
               "source": pm.source, "method": {"name": "lossless packing"}, "calibration": None,
               "timing": {}, "layers": layers, "lossy": pm.lossy}
    res["file_bytes"] = pm.totals["file_bytes"]
    res["lossless"] = pm.totals
    return res


def _artifact_info(m: dict, path: str | Path) -> dict:
    from ..quant.registry import format_from_dict
    layers = []
    for name, e in m["tensors"].items():
        fmt = e["format"]
        layers.append({"name": name, "method": e["method"], "shape": e["shape"],
                       "format": format_from_dict(fmt).label if fmt["kind"] != "raw" else fmt["dtype"],
                       "bits_per_weight": e["stored_bits"] / max(e["params"], 1),
                       "bytes": e["stored_bits"] / 8, "linear": e["linear"]})
    t = m["totals"]
    return {"path": str(path), **t, "source": m["source"], "method": m["method"],
            "calibration": m["calibration"], "timing": m["timing"], "layers": layers}


def _plain(path: Path, kind: str, spec: str, architecture: str | None, layers: list[dict], file_bytes: int,
           extra: dict | None = None) -> dict:
    """The `info` of a model that is not an artifact: its tensors as stored, no provenance."""
    params = sum(r["params"] for r in layers)
    bits = sum(8 * r["bytes"] for r in layers)
    return {"path": str(path), "kind": kind, "architecture": architecture,
            "source": {"spec": spec, "kind": kind, "model_type": architecture, "parameters": params},
            "method": {"name": "none (as stored)"}, "calibration": None, "timing": {}, "layers": layers,
            "linear_params": 0, "bits_per_weight": None, "model_params": params,
            "bits_per_weight_model": bits / params if params else None, "file_bytes": file_bytes,
            "disk_bytes": disk_bytes(path), **(extra or {})}


def _gguf_info(path: Path) -> dict:
    import gguf

    from ..filecheck import check_gguf

    check_gguf(path)   # header and tensor table against the file size, before gguf's reader maps it
    try:
        reader = gguf.GGUFReader(path)
        field = reader.get_field("general.architecture")
        arch = None if field is None else field.contents()
        layers = []
        for t in reader.tensors:
            n = int(t.n_elements)
            layers.append({"name": t.name, "method": "stored", "shape": [int(s) for s in reversed(t.shape.tolist())],
                           "format": gguf.GGMLQuantizationType(t.tensor_type).name, "params": n,
                           "bits_per_weight": 8 * int(t.n_bytes) / max(n, 1), "bytes": int(t.n_bytes), "linear": False})
    except Exception as e:      # a malformed file fails anywhere in the reader, with any exception type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SizewiseError(f"{path} is not a readable GGUF file: {first}") from None
    return _plain(path, "gguf", str(path), arch, layers, path.stat().st_size)


def _hf_info(directory: Path, kind: str, spec: str) -> dict:
    from safetensors import SafetensorError, safe_open

    from ..filecheck import check_safetensors

    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SizewiseError(f"{directory / 'config.json'} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise SizewiseError(f"{directory / 'config.json'} is not a model config")
    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        check_safetensors(f)
    if not files:
        pickled = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
        raise SizewiseError(f"{directory} holds " + ("only pickled PyTorch weights, which info does not read"
                                                    if pickled else "no model weights (*.safetensors)"))
    layers = []
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as st:     # headers only; checked against the file size
                for name in st.keys():
                    sl = st.get_slice(name)
                    shape, dtype = list(sl.get_shape()), sl.get_dtype()
                    n = 1
                    for s in shape:
                        n *= s
                    bits = _ST_BITS.get(dtype, 0)
                    layers.append({"name": name, "method": "stored", "shape": shape, "format": dtype.lower(),
                                   "params": n, "bits_per_weight": float(bits), "bytes": n * bits / 8,
                                   "linear": False})
    except (SafetensorError, OSError, ValueError) as e:
        raise SizewiseError(f"{f} is not a readable safetensors file: {e}") from None
    arch = config.get("model_type")
    quant = config.get("quantization_config")
    extra = {"architectures": config.get("architectures"),
             "quantization": quant.get("quant_method") if isinstance(quant, dict) else None}
    return _plain(directory, kind, spec, arch, layers, sum(f.stat().st_size for f in files), extra)
