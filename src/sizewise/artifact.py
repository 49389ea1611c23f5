"""The sizewise artifact: a manifest, packed tensors, and a dense Hugging Face copy.

    DIR/manifest.json        what was done and what is stored (formats, bits, protocol, sizes)
    DIR/packed.safetensors   every weight as stored: bit-packed codes + scales + zeros for quantized
                             weights, ggml's own blocks for k-quants, the rest in its float storage
                             dtype; this is the compressed model
    DIR/hf/                  the same weights dense (float32), loadable by transformers alone; written
                             a shard at a time from the stored tensors (exact whatever dtype the model
                             computed in); may hold only config and tokenizer (`dense_weights=False`)

Written to a temporary directory beside DIR and renamed into place, so a DIR that exists is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import staged_dir
from .errors import SizewiseError
from .quant.formats import TORCH_DTYPES, FloatFormat, Format, Part
from .quant.pack import pack_bits, unpack_bits
from .quant.registry import format_from_dict

MANIFEST, PACKED, DENSE = "manifest.json", "packed.safetensors", "hf"
FORMAT_NAME, FORMAT_VERSION = "sizewise-artifact", 1


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any work if `out` already holds something (unless overwriting)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SizewiseError(f"output path {out} already exists and is not empty (use --force to replace it)")


def part_tensor(part: Part, t: torch.Tensor) -> torch.Tensor:
    """A format's part as the packed file stores it: integer codes bit-packed, anything else as it is."""
    if part.code_bits is None:
        return t.contiguous()
    return torch.from_numpy(pack_bits(t.numpy(), part.code_bits))


def part_value(part: Part, t: torch.Tensor) -> torch.Tensor:
    """Inverse of `part_tensor`: the part's logical tensor (codes unpacked to uint8, in `part.shape`)."""
    if part.code_bits is None:
        if tuple(t.shape) != part.shape:
            raise SizewiseError(f"stored shape {tuple(t.shape)}, expected {part.shape}")
        return t
    return torch.from_numpy(unpack_bits(t.numpy(), part.code_bits, part.numel).reshape(part.shape))


def stored_entries(name: str, fmt: Format, stored) -> dict[str, torch.Tensor]:
    """The packed file's tensors for one solved weight, through its format's parts."""
    out, inp = stored.shape
    values = fmt.to_parts(stored)
    return {p.key(name): part_tensor(p, values[p.suffix]) for p in fmt.parts(out, inp)}


def read_stored(get, name: str, fmt: Format, shape: tuple[int, int]):
    """One solved weight from the packed file's tensors (`get(key)` reads one) through its format."""
    return fmt.from_parts({p.suffix: part_value(p, get(p.key(name))) for p in fmt.parts(*shape)}, shape)


def stored_shape(entry: dict) -> tuple[int, int]:
    """[out, in] of a quantized weight from its manifest entry (GPT-2's Conv1D stores [in, out])."""
    shape = tuple(entry["shape"])
    return shape[::-1] if entry["transposed"] else shape


def unique_state(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without tied duplicates, and the aliases (duplicate name -> stored name)."""
    seen: dict[int, str] = {}
    state, aliases = {}, {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            state[name] = t
    return state, aliases


# Dense float32 shards of the hf/ copy: each is materialized alone (with its serialized bytes).
DENSE_SHARD_BYTES = 1 << 30


def _write_dense(out: Path, model, state: dict, exact) -> None:
    """hf/: config, generation config and float32 safetensors shards, one shard in memory at a time;
    `exact(name, tensor)` gives each tensor's float32 value."""
    import copy

    from huggingface_hub import split_state_dict_into_shards_factory

    sizes = {name: t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size()
             for name, t in state.items()}
    split = split_state_dict_into_shards_factory(sizes, get_storage_size=lambda n: n,
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=DENSE_SHARD_BYTES)
    out.mkdir()
    for filename, names in split.filename_to_tensors.items():
        save_file({n: exact(n, state[n]).contiguous() for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = copy.deepcopy(model.config)
    config.dtype = torch.float32
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def write(out: Path, *, model, tokenizer, quantized: dict,
          linears: dict[str, bool], methods: dict[str, str], float_dtype: str, manifest: dict,
          overwrite: bool = False, dense_weights: bool = True) -> dict:
    """Write the artifact for `model`, whose weights equal the dequantized ones up to its storage
    dtype: quantized weights come from their stored tensors, not from the model.

    `quantized` maps weight names to their formats' stored tensors; `linears` maps each decoder linear
    weight name to whether it is stored transposed (GPT-2 Conv1D). `dense_weights=False` leaves the
    float32 weights out of hf/ (e.g. an artifact that is only a step towards a GGUF file).
    """
    out = Path(out)
    check_output(out, overwrite)
    with staged_dir(out) as tmp:
        state, aliases = unique_state(model)
        tensors, table = {}, {}
        for name, t in state.items():
            if name in quantized:
                qt = quantized[name]
                tensors.update(stored_entries(name, qt.fmt, qt))
                fmt, bits = qt.fmt.to_dict(), qt.stored_bits()
            elif t.is_floating_point():
                tensors[name] = t.detach().to(TORCH_DTYPES[float_dtype]).contiguous()
                fmt, bits = FloatFormat(float_dtype).to_dict(), FloatFormat(float_dtype).stored_bits(1, t.numel())
            else:  # integer buffers (e.g. position ids) are stored as they are
                tensors[name] = t.detach().contiguous()
                fmt, bits = {"kind": "raw", "dtype": str(t.dtype)}, t.numel() * t.element_size() * 8
            table[name] = {"shape": list(t.shape), "format": fmt, "method": methods.get(name, "float"),
                           "stored_bits": bits, "transposed": linears.get(name, False),
                           "linear": name in linears, "params": t.numel()}
        save_file(tensors, str(tmp / PACKED), metadata={"format": FORMAT_NAME})
        del tensors

        def exact(name, t):
            if name not in quantized:
                return t.detach().to(TORCH_DTYPES[float_dtype]).float() if t.is_floating_point() else t.detach()
            w = quantized[name].dequantize()
            return w.t() if linears.get(name, False) else w
        _write_dense(tmp / DENSE, model, state if dense_weights else {}, exact)
        tokenizer.save_pretrained(tmp / DENSE)
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest,
                    "float_dtype": float_dtype, "aliases": aliases, "tensors": table}
        manifest["totals"] = totals(manifest, (tmp / PACKED).stat().st_size)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def totals(manifest: dict, packed_bytes: int) -> dict:
    """Bits per weight over the compressed linear weights and over the whole stored model."""
    t = manifest["tensors"]
    linear = [v for v in t.values() if v["linear"]]
    lin_params = sum(v["params"] for v in linear)
    lin_bits = sum(v["stored_bits"] for v in linear)
    params = sum(v["params"] for v in t.values())
    bits = sum(v["stored_bits"] for v in t.values())
    return {
        "linear_params": lin_params, "linear_stored_bits": lin_bits,
        "bits_per_weight": lin_bits / lin_params if lin_params else None,
        "model_params": params, "model_stored_bits": bits,
        "bits_per_weight_model": bits / params,
        "file_bytes": packed_bytes,
        "bits_per_weight_file": packed_bytes * 8 / params,
    }


def read_manifest(path: str | Path) -> dict:
    p = Path(path) / MANIFEST
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise SizewiseError(f"{path} is not a sizewise artifact (no {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise SizewiseError(f"{p} is corrupt: {e}") from None
    if m.get("format") != FORMAT_NAME or m.get("format_version", 0) > FORMAT_VERSION:
        raise SizewiseError(f"{p} is not a sizewise artifact this version can read")
    return m


def load_stored(path: str | Path) -> tuple[dict, dict]:
    """The tensors exactly as stored: each quantized weight as its format's stored tensor ([out, in]),
    everything else as a tensor in its storage dtype.

    Returns (tensors, manifest); tied aliases are not repeated.
    """
    path = Path(path)
    manifest = read_manifest(path)
    stored = {}
    try:
        with safe_open(str(path / PACKED), framework="pt") as f:
            for name, entry in manifest["tensors"].items():
                fmt = entry["format"]
                if fmt["kind"] in ("raw", "float"):
                    stored[name] = f.get_tensor(name)
                else:
                    stored[name] = read_stored(f.get_tensor, name, format_from_dict(fmt), stored_shape(entry))
    except (SafetensorError, OSError, ValueError, KeyError, SizewiseError) as e:
        raise SizewiseError(f"{path / PACKED} is missing or corrupt: {e}") from None
    return stored, manifest


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Rebuild the dense state dict (float32, model layout) from the packed tensors alone."""
    return dense_state(*load_stored(path))


def dense_state(stored: dict, manifest: dict) -> dict[str, torch.Tensor]:
    """Stored tensors (as `load_stored` returns them) → the dense float32 state dict, aliases restored."""
    state = {}
    for name, t in stored.items():
        if isinstance(t, torch.Tensor):
            state[name] = t.float() if t.is_floating_point() else t
        else:
            w = t.dequantize()
            state[name] = w.t().contiguous() if manifest["tensors"][name]["transposed"] else w
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]
    return state


def load(path: str | Path):
    """(model, tokenizer, manifest) with the model rebuilt from the packed tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    try:        # the config is data from a stranger: a model only its own code could build is refused
        config = AutoConfig.from_pretrained(path / DENSE, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SizewiseError(f"cannot build the model of {path} from {DENSE}/config.json: {first}") from None
    state = load_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise SizewiseError(f"{path} does not match its model config (missing {missing[:2]}, unexpected {unexpected[:2]})")
    tokenizer = AutoTokenizer.from_pretrained(path / DENSE, trust_remote_code=False)
    return model.eval(), tokenizer, manifest
