"""A sizewise artifact as a compressed-tensors checkpoint (llm-compressor's format, "pack-quantized"):
transformers (with `compressed-tensors` installed) and vLLM load it as a quantized model.

Each distinct integer grid of the plan (bits, group size) becomes one config group that targets its
layers by name; the package's own compressor packs the codes (and checks here that it packed ours).

Every group is symmetric: transformers (5.x with compressed-tensors 0.20) cannot load asymmetric
pack-quantized checkpoints (it shapes the packed zero points as unpacked: llm-compressor#1618), so a
b-bit grid with integer zero points is written as the (b+1)-bit symmetric grid of `codes - zeros`,
which holds it exactly (|q - z| < 2^b) and stores no zero points. What the format cannot hold is
written dense in the export dtype and listed: k-quants, codebooks, float minimums (Q4_1 style
zeros), 8-bit grids with zero points, scales in a dtype other than the export dtype (the loader
casts scales to the model's dtype, which would change them), GPT-2's Conv1D layers (not a Linear), token
tables (embeddings, an untied head).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import artifact
from ..atomic import staged_dir
from ..errors import SizewiseError
from ..quant.formats import TORCH_DTYPES

NOTE = "sizewise_export.json"


def _require():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise SizewiseError("compressed-tensors export needs the compressed-tensors package: "
                            "pip install 'sizewise[deploy]' (or compressed-tensors)") from None


def _scheme(key: tuple[int, int | None], dtype: torch.dtype, targets: list[str]):
    """The config group of grid `key` = (bits, group size or None per channel), symmetric."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits, group_size = key
    return QuantizationScheme(targets=targets, weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, strategy="channel" if group_size is None else "group",
        group_size=group_size, scale_dtype=dtype))


def _symmetric(grid) -> tuple[int, torch.Tensor]:
    """(bits, signed codes) of the symmetric grid that holds `grid` exactly: itself, or for a b-bit grid
    with zero points the (b+1)-bit one of codes - zeros."""
    if grid.zero_points is None:
        return grid.bits, grid.codes
    g = grid.codes.shape[1] if grid.group_size is None else grid.group_size
    diff = grid.codes.to(torch.int16) - grid.zero_points.to(torch.int16).repeat_interleave(g, dim=1)
    return grid.bits + 1, diff.to(torch.int8)


def _why_dense(entry: dict, stored, grid, dtype: torch.dtype) -> str | None:
    """Why a quantized linear weight cannot be a config group here (None: it can)."""
    if not entry["linear"]:
        return "a token table, not a decoder linear layer"
    if entry["transposed"]:
        return "Conv1D layer (compressed-tensors quantizes Linear layers)"
    if grid is None:
        return f"{stored.fmt.label} is not an integer grid with integer zero points"
    if grid.zero_points is not None and grid.bits >= 8:
        return f"{stored.fmt.label}: codes minus zeros need 9 bits"
    if grid.scales.dtype != dtype:
        return f"{str(grid.scales.dtype).removeprefix('torch.')} scales are not {str(dtype).removeprefix('torch.')}"
    return None


def write_compressed_tensors(art: str | Path, out: str | Path, *, dtype: str = "float16",
                             overwrite: bool = False) -> dict:
    """Write artifact `art` as a compressed-tensors checkpoint directory `out`.

    Returns {"path", "bytes", "groups": {group: [layers]}, "dense": {layer: why}}.
    """
    _require()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor, pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    if dtype not in TORCH_DTYPES:
        raise SizewiseError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    tdtype = TORCH_DTYPES[dtype]
    art, out = Path(art), Path(out)
    artifact.check_output(out, overwrite)
    stored, manifest = artifact.load_stored(art)
    files = art / artifact.MODEL_FILES
    try:
        config = AutoConfig.from_pretrained(files, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(files, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise SizewiseError(f"cannot read the config and tokenizer of {art}: {str(e).strip().splitlines()[0]}") from None

    tensors, schemes, dense = {}, {}, {}
    for name, t in stored.items():
        entry = manifest["tensors"][name]
        if isinstance(t, torch.Tensor):          # stored in float (or raw integers): as it is, floats in dtype
            tensors[name] = t.to(tdtype) if t.is_floating_point() else t
            continue
        grid = t.fmt.int_grid(t)
        why = _why_dense(entry, t, grid, tdtype)
        if why is not None:
            w = t.dequantize()
            tensors[name] = (w.t() if entry["transposed"] else w).to(tdtype).contiguous()
            dense[name.removesuffix(".weight")] = why
            continue
        module = name.removesuffix(".weight")
        bits, codes = _symmetric(grid)
        key = (bits, grid.group_size)
        schemes.setdefault(key, []).append(module)
        # float32 weights: scale * code is exact there, so the compressor's w / scale rounds back to the code
        packed = PackedQuantizationCompressor.compress({"weight": t.dequantize(), "weight_scale": grid.scales},
                                                       _scheme(key, tdtype, [module]))
        if not torch.equal(packed["weight_packed"], pack_to_int32(codes, bits)):
            raise SizewiseError(f"{name}: compressed-tensors re-rounded the codes differently (a sizewise bug)")
        for k, v in packed.items():
            tensors[f"{module}.{k}"] = v.contiguous()

    ordered = sorted(schemes.items(), key=lambda kv: str(kv[0]))
    groups = {f"group_{i}": _scheme(key, tdtype, mods) for i, (key, mods) in enumerate(ordered)}
    qconfig = QuantizationConfig(config_groups=groups, format="pack-quantized",
                                 quantization_status=QuantizationStatus.COMPRESSED,
                                 ignore=sorted(dense))
    with staged_dir(out) as tmp:
        config.dtype = tdtype
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (files / "generation_config.json").is_file():
            shutil.copy2(files / "generation_config.json", tmp / "generation_config.json")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        note = {"source": str(art), "dtype": dtype,
                "groups": {g: mods for g, (_, mods) in zip(groups, ordered)},
                "dense": dense}
        (tmp / NOTE).write_text(json.dumps(note, indent=1))
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"path": str(out), "bytes": size, "groups": note["groups"], "dense": dense}

