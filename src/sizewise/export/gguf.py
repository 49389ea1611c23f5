"""Write a compressed model as a GGUF file that llama.cpp runs, for the families whose
`sizewise.families` entry has a `GGUFArch` (`families.gguf_support()`: Llama/Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3 text, Phi-3). Everything a family's layout differs in lives in its module there.

Input is the model's state under transformers' names (`model.layers.N.self_attn.q_proj.weight`, ...),
each tensor either a format's stored tensor whose format has a ggml type (`Format.ggml_blocks`) or a
float tensor stored in its own dtype (float32 -> F32, float16 -> F16, bfloat16 -> BF16; 1-D tensors,
the norms, always F32 as llama.cpp's converter does). What the file adds to the weights:

- names in llama.cpp's convention, from the gguf package's own `TensorNameMap` for the family's arch;
- for `llama`, the rows of q_proj/k_proj (weights and biases; the layout's `rope_heads`) permuted the way
  llama.cpp's converter does, because llama.cpp applies rope to interleaved pairs where transformers uses halves (transformers' GGUF loader
  undoes it). Rows are independent in every block type, so packed rows are permuted as they are;
- norms shifted where the family's are (Gemma: 1 + w, the layout's `norm_shift`), and the tensors the
  converter adds (Llama 3's `rope_freqs`, the layout's `extra_tensors`), written after the weights;
- no `output.weight` when the embeddings are tied (that absence is how llama.cpp and transformers
  both know);
- architecture metadata (the layout's `add_metadata`) and a byte-level BPE tokenizer (llama.cpp's
  tokenizer model "gpt2", named after the tokenizer, not the model family), with the pre-tokenizer
  name given, else the one the family knows from the tokenizer's split regex (qwen2, llama-bpe).

The file's size is known before it is written (`header_bytes` + Σ `data_bytes`): a header (the
metadata, the whole tokenizer included, and one info per tensor, whose size does not depend on the
tensor's type) padded to `ALIGNMENT`, then each tensor's data padded to `ALIGNMENT`. The allocator
sizes byte budgets for GGUF output with these (`gguf_layout.GGUFLayout`).

The header and every tensor info are written first (from descriptions: formats and shapes), then each
tensor's data as it is read (`write_gguf`'s weights may be a lazy mapping, `artifact.StoredTensors`), so
the export holds one tensor at a time. The file is written to a temporary name beside `path` and
renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quant_shape_from_byte_shape

from .. import families
from ..atomic import staged_file
from ..errors import SizewiseError
from ..families import GGUFArch
from .gguf_tokenizer import backend_json, tokenizer_metadata

GGML = GGMLQuantizationType
ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT  # every tensor's data starts at a multiple of it
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION for the block layouts written here (always written, as
                          # llama.cpp's converter does: the header's size then does not depend on the types)

_FLOAT_DTYPES = {torch.float32: GGML.F32, torch.float16: GGML.F16, torch.bfloat16: GGML.BF16}
_TORCH_OF = {v: k for k, v in _FLOAT_DTYPES.items()}
_NUMPY_TYPES = {np.dtype(np.float32): GGML.F32, np.dtype(np.float16): GGML.F16}


def gguf_export_args(source_info: dict) -> dict:
    """What a GGUF compressed from a source says about itself (`api.export`'s defaults for name, tokenizer_pre,
    metadata): named after the model, the source recorded in `general.source.url`, llama.cpp's
    pre-tokenizer name kept. Fixed before compressing, so the file's size is known beforehand."""
    spec = str(source_info.get("spec", ""))
    return {"name": Path(spec).name or None, "tokenizer_pre": source_info.get("tokenizer_pre"),
            "metadata": {"general.source.url": f"sizewise {source_info.get('kind', 'model')} {spec}"}}


# --- names and layout -------------------------------------------------------------------------


def gguf_tensor_name(hf_name: str, n_layers: int, layout: GGUFArch | None = None) -> str:
    """llama.cpp's name for a transformers tensor (`model.layers.3.mlp.up_proj.weight` ->
    `blk.3.ffn_up.weight`), from gguf's own tables for the layout's arch (default: Llama's, the one
    callers without a config mean); a one-line error for a tensor the arch has not."""
    layout = layout or families.LLAMA.gguf
    name_map = gguf.get_tensor_name_map(layout.model_arch, n_layers)
    found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None or found[0] not in gguf.MODEL_TENSORS[layout.model_arch]:
        raise SizewiseError(f"tensor {hf_name!r} has no place in a GGUF '{layout.arch}' model")
    return found[1]


def rope_row_order(rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives q_proj/k_proj: within each head, transformers' layout
    (first half of the rotary dims, then the second) becomes interleaved pairs (x0, x_half, x1, ...).
    file_rows = hf_rows[order]."""
    if rows % (2 * n_head):
        raise SizewiseError(f"{rows} rows do not split into {n_head} heads of even size")
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)


def float_type(ndim: int, dtype: torch.dtype) -> GGMLQuantizationType:
    """The GGUF type of a float tensor: its own dtype; 1-D tensors (norms, biases) F32, as llama.cpp's
    converter keeps them."""
    if ndim <= 1:
        return GGML.F32
    if dtype not in _FLOAT_DTYPES:
        raise SizewiseError(f"float tensors are stored as F32/F16/BF16; got {dtype}")
    return _FLOAT_DTYPES[dtype]


def data_bytes(ggml_type: GGMLQuantizationType, shape) -> int:
    """Bytes one tensor's data takes in the file, its alignment padding included (ggml's block sizes)."""
    return _aligned(_nbytes(ggml_type, shape))


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def tensor_payload(value) -> tuple[np.ndarray, GGMLQuantizationType]:
    """What goes into the file for one tensor: a quantized tensor as uint8 ggml blocks
    [out, row bytes], a float tensor as an array of its own dtype (bfloat16 as its raw bytes)."""
    if not isinstance(value, torch.Tensor):      # a format's stored tensor: its own ggml blocks
        fmt = getattr(value, "fmt", None)
        if fmt is None or fmt.ggml_type is None:
            raise SizewiseError(f"cannot store {fmt.label if fmt else type(value).__name__} in GGUF exactly")
        return fmt.ggml_blocks(value), GGML[fmt.ggml_type]
    t = value.detach().cpu().contiguous()
    ggml_type = float_type(t.dim(), t.dtype)
    t = t.to(_TORCH_OF[ggml_type])
    if ggml_type == GGML.BF16:  # numpy has no bfloat16: write its bits, exactly
        return t.view(torch.int16).numpy().view(np.uint8), ggml_type
    return t.numpy(), ggml_type


# --- metadata ---------------------------------------------------------------------------------


def _layout(config) -> GGUFArch:
    """The family's GGUF layout, after its checks; a one-line error for what export cannot write."""
    layout = families.of(config).gguf
    if layout is None:
        raise SizewiseError(f"GGUF export supports: {families.gguf_support()}; "
                            f"got {getattr(config, 'model_type', None)!r}")
    layout.check_config(config, layout)
    return layout


def _put(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    """One metadata value with the GGUF type llama.cpp expects for its Python type."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        else:
            w.add_array(key, list(value))
    else:
        raise SizewiseError(f"metadata {key!r}: cannot store a {type(value).__name__}")


# --- the file ---------------------------------------------------------------------------------


def file_names(config, names) -> dict[str, str]:
    """transformers name -> GGUF name of every tensor the file holds, in the order given (rotary
    buffers and a tied head left out). Checks the config and that the model is complete."""
    layout = _layout(config)
    names = list(names)
    n_layers = config.num_hidden_layers
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = list(layout.top_tensors) + [
        f"{layout.layers}.{i}.{t}" for i in range(n_layers) for t in layout.layer_tensors]
    if not tied:
        expected.append(layout.output)
    present = set(names)
    missing = [n for n in expected if n not in present]
    if missing:
        raise SizewiseError(f"GGUF export is missing {len(missing)} tensor(s), first {missing[0]!r}")
    return {n: gguf_tensor_name(n, n_layers, layout) for n in names
            if not (n.endswith("rotary_emb.inv_freq") or (tied and n == layout.output))}


def gguf_tensors(config, weights: Mapping[str, Any]) -> list[tuple[str, np.ndarray, GGMLQuantizationType]]:
    """(gguf name, payload, type) for every tensor of the model, in llama.cpp's layout (rope rows
    permuted, tied output left out). Checks that the model is complete."""
    return list(iter_gguf_tensors(config, weights))


def iter_gguf_tensors(config, weights: Mapping[str, Any]):
    """`gguf_tensors` one at a time: each weight is read from `weights` only when its turn comes."""
    names = file_names(config, weights)
    layout = families.of(config).gguf
    heads = layout.rope_heads(config)
    for hf_name, name in names.items():
        value = weights[hf_name]
        if layout.norm_shift and hf_name.endswith("norm.weight"):   # norms stored as shift + w (Gemma's 1 + w)
            value = value.float() + layout.norm_shift
        payload, ggml_type = tensor_payload(value)
        del value
        module = hf_name.rsplit(".", 1)[0]            # the weight's or bias's module
        proj = next((p for p in heads if module.endswith(f".{p}")), None)
        if proj is not None:
            payload = payload[rope_row_order(payload.shape[0], heads[proj])]
        yield name, np.ascontiguousarray(payload), ggml_type
    for name, values in layout.extra_tensors(config).items():
        yield name, np.asarray(values, dtype=np.float32), GGML.F32


def payload_info(value) -> tuple[GGMLQuantizationType, tuple[int, ...]]:
    """The GGUF type and logical shape of what `tensor_payload` makes of `value`, without making it:
    `value` may be a meta tensor, or anything with a stored tensor's `fmt` and `shape`."""
    if isinstance(value, torch.Tensor):
        return float_type(value.dim(), value.dtype), tuple(value.shape)
    fmt = getattr(value, "fmt", None)
    if fmt is None or fmt.ggml_type is None:
        raise SizewiseError(f"cannot store {fmt.label if fmt else type(value).__name__} in GGUF exactly")
    return GGML[fmt.ggml_type], tuple(value.shape)


def tensor_infos(config, described: Mapping[str, Any]) -> list[tuple[str, GGMLQuantizationType, tuple[int, ...]]]:
    """(gguf name, type, logical shape) of each tensor `iter_gguf_tensors` writes, in its order, from
    `described` (hf name -> the value, or a description `payload_info` takes)."""
    layout = families.of(config).gguf
    out = []
    for hf_name, name in file_names(config, described).items():
        ggml_type, shape = payload_info(described[hf_name])
        if layout.norm_shift and hf_name.endswith("norm.weight"):
            ggml_type = float_type(len(shape), torch.float32)
        out.append((name, ggml_type, shape))
    for name, values in layout.extra_tensors(config).items():
        out.append((name, GGML.F32, (len(values),)))
    return out


def extra_tensor_shapes(config) -> list[tuple[str, tuple[int, ...], int]]:
    """(GGUF name, shape, data bytes) of the tensors the family's converter adds to the weights
    (Llama 3's rope_freqs), which `gguf_tensors` writes after them."""
    return [(name, (len(values),), data_bytes(GGML.F32, (len(values),)))
            for name, values in _layout(config).extra_tensors(config).items()]


def _add_metadata(w: gguf.GGUFWriter, config, tokenizer, name: str | None, tokenizer_pre: str | None,
                  metadata: Mapping[str, Any] | None) -> None:
    """Every key `write_gguf` writes, in its order (`header_bytes` sizes the same keys)."""
    default_name = Path(str(getattr(config, "_name_or_path", "") or "")).name or "sizewise model"
    w.add_name(name or default_name)
    families.of(config).gguf.add_metadata(w, config)
    w.add_quantization_version(QUANTIZATION_VERSION)
    if tokenizer is not None:
        for key, value in tokenizer_metadata(tokenizer, config.vocab_size).items():
            _put(w, key, value)
        tokenizer_pre = tokenizer_pre or families.of(config).gguf.tokenizer_pre(backend_json(tokenizer))
        if tokenizer_pre:
            w.add_tokenizer_pre(tokenizer_pre)
    for key, value in (metadata or {}).items():
        _put(w, key, value)


def header_bytes(config, tensors, tokenizer=None, *, name: str | None = None, tokenizer_pre: str | None = None,
                 metadata: Mapping[str, Any] | None = None) -> int:
    """Bytes before the first tensor's data in the file `write_gguf` writes with these arguments,
    for tensors of these (GGUF name, shape) in this order: header, metadata, tensor infos and the
    padding to `ALIGNMENT`, exactly. gguf's own writer writes them to a scratch file; neither the
    metadata nor a tensor info's size depends on the tensors' types."""
    with tempfile.TemporaryDirectory(prefix="sizewise-gguf-") as tmp:
        path = Path(tmp) / "header.gguf"
        writer = gguf.GGUFWriter(path, _layout(config).arch)
        try:
            _add_metadata(writer, config, tokenizer, name, tokenizer_pre, metadata)
            for tname, shape in tensors:
                writer.add_tensor_info(tname, tuple(shape), np.dtype(np.float32), 0, raw_dtype=GGML.F32)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        size = path.stat().st_size
    return _aligned(size)


def write_gguf(path: str | os.PathLike, config, weights: Mapping[str, Any], tokenizer=None, *,
               name: str | None = None, tokenizer_pre: str | None = None,
               metadata: Mapping[str, Any] | None = None, described: Mapping[str, Any] | None = None) -> Path:
    """Write a GGUF llama.cpp can run; returns its path.

    config: the transformers config of a family GGUF export supports (`families.gguf_support()`:
        Llama/Mistral (no sliding window), Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3).
    weights: transformers name -> a stored tensor whose format has a `ggml_type` (written as its ggml
        blocks), or a float torch.Tensor kept in its dtype (F32/F16/BF16). Read one at a time, in the
        file's order, after the header is written: a lazy mapping keeps one tensor in memory.
    described: the same names -> what `payload_info` reads (meta tensors, stored tensors' formats and
        shapes), for the header; default `weights` itself.
    tokenizer: a fast byte-level BPE tokenizer (None writes no tokenizer: transformers can still load
        the weights, llama.cpp cannot run the file).
    tokenizer_pre: llama.cpp's pre-tokenizer name (e.g. "smollm", "llama-bpe"); llama.cpp falls back to
        "default" without it. A source GGUF's `tokenizer.ggml.pre` is the value to pass on.
    metadata: extra or overriding keys, written last (e.g. {"general.license": "apache-2.0"}).
    """
    path = Path(path)
    infos = tensor_infos(config, weights if described is None else described)
    with staged_file(path) as tmp:
        write_streamed(tmp, families.of(config).gguf.arch,
                       lambda writer: _add_metadata(writer, config, tokenizer, name, tokenizer_pre, metadata),
                       infos, iter_gguf_tensors(config, weights))
    return path


def write_file(path: Path, arch: str, add_metadata, tensors) -> None:
    """One GGUF file: `add_metadata(writer)`, then (name, payload, ggml type) tensors, in that order
    (a None type: the payload's numpy dtype's)."""
    infos = []
    for tname, payload, ggml_type in tensors:
        if ggml_type is None:
            if payload.dtype not in _NUMPY_TYPES:
                raise SizewiseError(f"GGUF tensor {tname}: cannot store numpy {payload.dtype} without a ggml type")
            ggml_type = _NUMPY_TYPES[payload.dtype]
        # quantized (and bfloat16) payloads are uint8 bytes [rows, row bytes]
        shape = quant_shape_from_byte_shape(payload.shape, ggml_type) if payload.dtype == np.uint8 else payload.shape
        infos.append((tname, ggml_type, tuple(shape)))
    write_streamed(path, arch, add_metadata, infos, [(n, p, t or _NUMPY_TYPES[p.dtype]) for n, p, t in tensors])


def _nbytes(ggml_type: GGMLQuantizationType, shape) -> int:
    """Bytes of one tensor's data, unpadded; a one-line error where rows do not split into blocks."""
    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    if shape and shape[-1] % block:
        raise SizewiseError(f"rows of {shape[-1]} weights do not split into {ggml_type.name} blocks of {block}")
    return math.prod(shape) // block * size


def write_streamed(path: Path, arch: str, add_metadata, infos, tensors) -> None:
    """One GGUF file: `add_metadata(writer)` and the tensor infos `infos` ((name, type, logical shape))
    first, then each (name, payload, type) of `tensors` (an iterable: each is written as it comes and
    may then be dropped), which must match `infos` one for one."""
    writer = gguf.GGUFWriter(path, arch)
    try:
        add_metadata(writer)
        for tname, ggml_type, shape in infos:
            writer.add_tensor_info(tname, shape, np.dtype(np.float32), _nbytes(ggml_type, shape), raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        count = 0
        for tname, payload, ggml_type in tensors:
            info = infos[count] if count < len(infos) else (None, None, ())
            if (tname, ggml_type) != info[:2] or payload.nbytes != _nbytes(ggml_type, info[2]):
                raise SizewiseError(f"internal: GGUF tensor {tname} ({ggml_type.name}, {payload.nbytes} bytes) "
                                    f"does not match its header entry {info}")
            writer.write_tensor_data(payload)
            count += 1
        if count != len(infos):
            raise SizewiseError(f"internal: {count} GGUF tensors written for {len(infos)} in the header")
    finally:
        writer.close()
