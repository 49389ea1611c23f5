"""Writing an artifact (or any model) in another format: `export` (GGUF, compressed-tensors, a dense HF copy)."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import artifact, lazy
from ..errors import SizewiseError
from ..quant.formats import TORCH_DTYPES, stored_as
from .compression import _source


EXPORT_FORMATS = ("gguf", "compressed-tensors", "hf")


def export(path: str | Path, out: str | Path, *, format: str = "gguf", overwrite: bool = False,
           tokenizer_pre: str | None = None, float_dtype: str | None = None, name: str | None = None,
           metadata: dict | None = None) -> dict:
    """Write an artifact's stored weights in another format, unchanged (no re-rounding).

    format="hf": a dense Hugging Face directory of any model (an artifact's dequantized weights), every
    tensor in `float_dtype` (default bfloat16). format="compressed-tensors": an artifact as a quantized
    checkpoint that transformers and vLLM load (`export.compressed_tensors`; default float16, the
    dtype of sizewise's default scales). Both return {"path", "bytes", ...}.

    GGUF holds our formats exactly when they are one of ggml's block types: 32-weight groups with
    float16 scales, symmetric (Q4_0, Q5_0, Q8_0) or with a float16 minimum (Q4_1, Q5_1), and the
    k-quants (Q2_K .. Q6_K) and IQ4_NL, whose blocks the artifact stores as they are. Sparse weights
    are written dense (pruned entries exact zeros) where their kept format allows it. Low-rank
    corrections go to a LoRA adapter beside the file (`out.lora.gguf`, llama.cpp's `--lora`).

    Any other model (a built-in name, a Hugging Face directory, a GGUF file) is written unquantized,
    every tensor in `float_dtype` (default float32; 1-D tensors always F32), e.g. as the source that
    llama.cpp's own quantizer starts from.

    `name` (`general.name`) and `metadata` (keys written last) are what the file says about itself;
    by default the model's name and `general.source.url` naming the model the artifact was compressed
    from (`export.gguf.gguf_export_args`: the same as `compress --format gguf` writes), or for a model
    that is not an artifact its directory's name and the model itself.
    """
    from collections import Counter

    from transformers import AutoConfig, AutoTokenizer

    from ..export.gguf import gguf_export_args, write_gguf
    from ..export.gguf_lora import lora_path, write_lora_gguf
    from ..lossless import is_packed_model

    if format not in EXPORT_FORMATS:
        raise SizewiseError(f"unknown export format {format!r}; available: {', '.join(EXPORT_FORMATS)}")
    if float_dtype is not None and float_dtype not in TORCH_DTYPES:
        raise SizewiseError(f"float dtype must be one of {sorted(TORCH_DTYPES)}, got {float_dtype!r}")
    if format == "hf":
        from ..export.hf import write_dense

        artifact.check_output(Path(out), overwrite)
        src = _source(path)
        return write_dense(src.model, src.tokenizer, out, dtype=float_dtype or "bfloat16", overwrite=overwrite)
    if format == "compressed-tensors":
        from ..export.compressed_tensors import write_compressed_tensors

        if not (Path(path).is_dir() and artifact.is_artifact(path) and not is_packed_model(path)):
            raise SizewiseError(f"{path} is not a sizewise artifact: compressed-tensors export writes an artifact's "
                                "quantized weights (compress the model first)")
        return write_compressed_tensors(path, out, dtype=float_dtype or "float16", overwrite=overwrite)
    out = Path(out)
    if out.exists() and not overwrite:
        raise SizewiseError(f"output file {out} already exists (use --force to replace it)")
    if not (Path(path).is_dir() and artifact.is_artifact(path) and not is_packed_model(path)):
        return _export_float(path, out, float_dtype or "float32", tokenizer_pre, name, metadata)
    if float_dtype is not None:
        raise SizewiseError("an artifact is exported as stored; --float-dtype applies to unquantized models only")
    # read one tensor at a time, as the file is written: an artifact larger than memory exports
    stored = artifact.StoredTensors(path)
    manifest, described = stored.manifest, {n: stored.described(n) for n in stored}
    bad = [(n, d) for n, d in described.items() if not isinstance(d, torch.Tensor) and d.fmt.ggml_type is None]
    if bad:
        raise SizewiseError(
            f"{len(bad)} tensors are in formats GGUF cannot hold exactly (e.g. {bad[0][0]}: {bad[0][1].fmt.label}); "
            "compress with --group-size 32 and --sym (Q4_0/Q5_0/Q8_0) or --zero float16 (Q4_1/Q5_1)")
    config = AutoConfig.from_pretrained(Path(path) / artifact.MODEL_FILES, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(Path(path) / artifact.MODEL_FILES, trust_remote_code=False)
    # low-rank corrections travel beside the model file, as the LoRA adapter llama.cpp applies (--lora)
    factors = {n: f for n, d in described.items() if not isinstance(d, torch.Tensor) and d.fmt.carries_lora
               if (f := d.fmt.lora(stored[n])) is not None}
    adapter = lora_path(out) if factors else None
    if adapter is not None and adapter.exists() and not overwrite:
        raise SizewiseError(f"output file {adapter} already exists (use --force to replace it)")
    described_args = gguf_export_args(manifest["source"])
    written = write_gguf(out, config, stored, tokenizer, name=name or described_args["name"],
                         tokenizer_pre=tokenizer_pre or described_args["tokenizer_pre"],
                         metadata=described_args["metadata"] if metadata is None else metadata, described=described)
    import gguf
    types = Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(written).tensors)
    res = {"path": str(written), "bytes": written.stat().st_size, "tensor_types": dict(types)}
    if adapter is not None:
        write_lora_gguf(adapter, config, factors, list(stored))
        res["lora"] = {"path": str(adapter), "bytes": adapter.stat().st_size, "tensors": len(factors)}
    return res


def _export_float(model: str | Path, out: Path, float_dtype: str, tokenizer_pre: str | None,
                  name: str | None = None, metadata: dict | None = None) -> dict:
    """`export` for a model that is not an artifact: its float weights, each in `float_dtype`."""
    from collections import Counter

    import gguf

    from ..export.gguf import write_gguf

    src = _source(model)
    # read one tensor at a time, as the file is written (a layer on disk stays there); a tensor the
    # dtype cannot hold fails the export, which then leaves no file (`write_gguf` stages it)
    tensors = lazy.StateTensors(src.model, convert=stored_as(float_dtype))
    if metadata is None:
        metadata = {"general.source.url": f"sizewise {src.info['kind']} {src.info['spec']}"}
    written = write_gguf(out, src.model.config, tensors, src.tokenizer, name=name,
                         tokenizer_pre=tokenizer_pre or src.info.get("tokenizer_pre"), metadata=metadata,
                         described=tensors.described())
    types = Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(written).tensors)
    return {"path": str(written), "bytes": written.stat().st_size, "tensor_types": dict(types)}
