"""What an artifact (or a lossless-packed directory) stores: `info`."""

from __future__ import annotations

from pathlib import Path

from .. import artifact


def info(path: str | Path) -> dict:
    """What an artifact stores: per-layer format and bits, totals, provenance. Lossless-packed
    directories too: a packed artifact as its artifact plus the coded sizes ("lossless"), a packed
    float model per tensor with its coded bits per parameter."""
    from ..lossless import is_packed_model
    from ..lossless import read_manifest as read_packed

    if is_packed_model(path):
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
        return {**res, "kind": "packed", "disk_bytes": disk_bytes(path)}
    return {**_artifact_info(artifact.read_manifest(path), path), "kind": "artifact", "disk_bytes": disk_bytes(path)}


def disk_bytes(path: str | Path) -> int:
    """Bytes of every file under `path` (or of the file itself)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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
