"""Packed sizewise artifacts: the stored tensors of an artifact with their integer codes (and
integer zeros) entropy-coded, bf16/fp16 scales and float tensors coded as floats, the rest raw.

What each stored format is packed as comes from the format protocol (`Format.parts`), in two
functions, _stored_parts (a stored tensor -> the parts written to weights.swl) and _from_parts
(the parts -> the stored tensor); everything else here is format-blind. The packed directory's
format is store.py's.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sizewise import artifact
from sizewise.errors import SizewiseError
from sizewise.quant.registry import format_from_dict
from sizewise.lossless.codec import coded_stats, encode_codes
from sizewise.lossless.coder import CorruptData, entropy_bits
from sizewise.lossless.store import (
    CODED, HF, KIND_ARTIFACT, WEIGHTS, Manifest, Writer, check_threads, codec_info, load_packed_tensors, side_files,
    staged_output, totals, write_manifest,
)

# ---------------------------------------------------------------- the per-format parts


def _stored_parts(name: str, t) -> Iterator[tuple[str, torch.Tensor, str, int | None]]:
    """The parts one stored tensor of an artifact is packed as, in weights.swl order: (part name,
    tensor, encoding, bits per code or None), through its format's parts (`Format.parts`): integer
    codes are entropy-coded ("codes"), bf16/fp16 tensors coded as floats, anything else raw; a float
    tensor is its own single part."""
    def as_float(part: str, x: torch.Tensor):
        return part, x, "float" if x.dtype in CODED else "raw", None

    if isinstance(t, torch.Tensor):
        yield as_float(name, t)
        return
    values = t.fmt.to_parts(t)
    for p in t.fmt.parts(*t.shape):
        if p.code_bits is not None:
            yield p.key(name), values[p.suffix].contiguous(), "codes", p.code_bits
        else:
            yield as_float(p.key(name), values[p.suffix])


def _has_codes(t) -> bool:
    """Whether a stored tensor holds integer codes (declared by its format, nothing computed)."""
    return not isinstance(t, torch.Tensor) and any(p.code_bits for p in t.fmt.parts(*t.shape))


def _from_parts(name: str, entry: dict, tensors: dict[str, torch.Tensor]):
    """The stored tensor `name` (its artifact manifest entry) rebuilt from its packed parts, as
    artifact.load_stored gives it; KeyError when a part is missing."""
    if entry["format"]["kind"] in ("raw", "float"):
        return tensors[name]
    fmt = format_from_dict(entry["format"])
    shape = artifact.stored_shape(entry)
    return fmt.from_parts({p.suffix: tensors[p.key(name)] for p in fmt.parts(*shape)}, shape)


# ---------------------------------------------------------------- statistics


def _entropy_per_value(values: np.ndarray) -> float:
    """Order-0 entropy of the codes one by one (bits per code), over the whole tensor."""
    flat = values.reshape(-1).astype(np.uint8, copy=False)
    return entropy_bits(flat) / flat.size if flat.size else 0.0


def code_artifact_stats(artifact_dir, *, threads: int | None = None) -> dict:
    """For each quantized tensor of an artifact: its codes entropy-coded, nominal vs coded bits per
    code and the entropy bounds (per-block order-0 on the coded symbols, and of single codes)."""
    stored, amanifest = artifact.load_stored(artifact_dir)
    rows, tot = {}, {"codes": 0, "nominal_bits": 0, "coded_bits": 0, "bound_bits": 0.0, "single_bound_bits": 0.0,
                     "zeros_nominal_bits": 0, "zeros_coded_bits": 0, "params": 0, "stored_bits": 0}

    def one(item):
        name, t = item
        if not _has_codes(t):
            return name, None
        coded = [(x, bits) for _, x, encoding, bits in _stored_parts(name, t) if encoding == "codes"]
        if not coded:   # not a tensor of integer codes
            return name, None
        (codes, bits), *zeros = coded   # the codes, then the integer zeros if the format has them
        codes = codes.numpy()
        s = coded_stats(encode_codes(codes, bits, threads=1))
        row = {"shape": list(codes.shape), "bits": bits, "codes": s["numel"],
               "nominal_bits_per_code": float(bits), "coded_bits_per_code": s["bits_per_value"],
               "entropy_bound_bits_per_code": s["entropy_bound_bits_per_value"],
               "single_code_entropy": _entropy_per_value(codes),
               "coded_bits": s["coded_bits"], "bound_bits": s["entropy_bound_bits"],
               "stored_bits": amanifest["tensors"][name]["stored_bits"]}
        for z, zbits in zeros:
            z = coded_stats(encode_codes(z.numpy(), zbits, threads=1))
            row["zeros_nominal_bits"], row["zeros_coded_bits"] = z["raw_bits"], z["coded_bits"]
        return name, row

    with ThreadPoolExecutor(check_threads(threads)) as pool:
        for name, row in pool.map(one, stored.items()):
            if row is None:
                continue
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
    summary = {**tot,
               "nominal_bits_per_code": tot["nominal_bits"] / n, "coded_bits_per_code": tot["coded_bits"] / n,
               "entropy_bound_bits_per_code": tot["bound_bits"] / n,
               "single_code_entropy_bits_per_code": tot["single_bound_bits"] / n,
               # everything stored for the quantized weights (codes, scales, zeros), before and after coding
               "bits_per_weight_nominal": tot["stored_bits"] / n,
               "bits_per_weight_coded": (tot["stored_bits"] - saved) / n}
    return {"artifact": str(artifact_dir), "tensors": rows, "totals": summary}


# ---------------------------------------------------------------- packing and loading


def pack_artifact(artifact_dir, out, *, overwrite: bool = False, threads: int | None = None) -> dict:
    """A sizewise artifact with its integer codes (and integer zeros) entropy-coded, bf16/fp16 scales
    and float tensors coded as floats, the rest raw; the config and tokenizer files in hf/ are copied."""
    artifact_dir = Path(artifact_dir)
    threads = check_threads(threads)
    stored, amanifest = artifact.load_stored(artifact_dir)
    with staged_output(out, overwrite) as tmp:
        writer = Writer(tmp / WEIGHTS, threads)
        try:
            for name, t in stored.items():
                for part, x, encoding, bits in _stored_parts(name, t):
                    writer.add(part, x, encoding, bits=bits)
        finally:
            entries = writer.close()
        copied = []
        dense = artifact_dir / artifact.MODEL_FILES
        if dense.is_dir():
            (tmp / HF).mkdir()
            for p in side_files(dense):
                shutil.copy2(p, tmp / HF / p.name)
                copied.append(f"{HF}/{p.name}")
        weights_nbytes = (tmp / WEIGHTS).stat().st_size
        source = {"spec": str(artifact_dir), "kind": "artifact", "path": str(artifact_dir.resolve()),
                  "manifest_sha256": hashlib.sha256((artifact_dir / artifact.MANIFEST).read_bytes()).hexdigest(),
                  "packed_bytes": (artifact_dir / artifact.PACKED).stat().st_size}
        manifest = Manifest(kind=KIND_ARTIFACT, tensors=entries, weights_nbytes=weights_nbytes, source=source,
                            files=copied, artifact_manifest=amanifest, totals=totals(entries, weights_nbytes),
                            codec=codec_info())
        d = write_manifest(tmp, manifest)
    return {**d, "path": str(out)}


def load_packed_stored(path, *, threads: int | None = None) -> tuple[dict, dict]:
    """Like artifact.load_stored for a packed artifact: (QuantizedTensor or tensor per name, artifact manifest)."""
    tensors, manifest = load_packed_tensors(path, threads=threads)
    if manifest.kind != KIND_ARTIFACT or manifest.artifact_manifest is None:
        raise SizewiseError(f"{path} is a packed model, not a packed artifact")
    amanifest = manifest.artifact_manifest
    stored = {}
    try:
        for name, entry in amanifest["tensors"].items():
            stored[name] = _from_parts(name, entry, tensors)
    except KeyError as e:
        raise CorruptData(f"{path}: packed artifact lacks tensor {e}") from None
    return stored, amanifest


def load_packed_artifact(path, *, threads: int | None = None) -> dict[str, torch.Tensor]:
    """The dense state dict (float32, model layout), equal to artifact.load_weights of the source artifact."""
    return artifact.dense_state(*load_packed_stored(path, threads=threads))
