"""The sizewise artifact: a manifest and packed tensors, plus the files that rebuild the model.

    DIR/manifest.json        what was done and what is stored (formats, bits, protocol, sizes)
    DIR/packed.safetensors   every weight as stored: bit-packed codes + scales + zeros for quantized
                             weights, ggml's own blocks for k-quants, the rest in its float storage
                             dtype; this is the compressed model
    DIR/hf/                  config and tokenizer files only (no weights): the model is rebuilt from
                             the config and the dequantized packed tensors. A dense copy is written on
                             request (`sizewise export ART --format hf`). Older artifacts also hold
                             dense float32 weights here; nothing reads them.

Written to a temporary directory beside DIR and renamed into place, so a DIR that exists is complete.
The packed file is laid out before compressing and each solved weight is written to it as soon as its
decoder layer is finished (`streamed`, `ArtifactWriter`), so solved weights never accumulate; the
manifest, with every tensor's sha256, is written last.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .atomic import check_target, staged_dir
from .data import tensor_sha256
from .errors import SizewiseError
from .quant.formats import TORCH_DTYPES, FloatFormat, Format, Part
from .quant.pack import pack_bits, unpack_bits
from .quant.registry import format_from_dict
from .streamed_safetensors import StreamedFile

MANIFEST, PACKED, MODEL_FILES = "manifest.json", "packed.safetensors", "hf"
FORMAT_NAME, FORMAT_VERSION = "sizewise-artifact", 1


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any work if `out` already holds something (unless overwriting) or cannot be written."""
    check_target(out, overwrite=overwrite)


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
        # a decoder layer kept on disk (`lazy`) has meta tensors (data_ptr 0): never tied, each its own
        key = t.data_ptr() if t.numel() and not t.is_meta else id(t)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            state[name] = t
    return state, aliases


class ArtifactWriter:
    """An artifact written as it is computed, into a staging directory `tmp` (`streamed`).

    The packed file is laid out up front from the model's state and the formats its weights will be
    stored in (`formats`: weight name -> Format of each weight that will be quantized); `put` writes one
    solved weight's parts in place as soon as it is solved, so that it need not be kept; `finish` writes
    everything else from the model, then the config, tokenizer and manifest (last: with its hashes).
    The packed file is byte for byte what writing every tensor at once writes (`streamed_safetensors`).
    """

    def __init__(self, tmp: Path, model, formats: dict[str, Format], linears: dict[str, bool], float_dtype: str):
        self.tmp, self.float_dtype = Path(tmp), float_dtype
        state, _ = unique_state(model)
        self.shapes = {name: tuple(t.shape) for name, t in state.items()}
        layout = {}
        for name, t in state.items():
            if name in formats:
                shape = self.shapes[name][::-1] if linears.get(name, False) else self.shapes[name]
                layout.update({p.key(name): (getattr(torch, p.stored_dtype), tuple(p.stored_shape))
                               for p in formats[name].parts(*shape)})
            else:
                layout[name] = (TORCH_DTYPES[float_dtype] if t.is_floating_point() else t.dtype, tuple(t.shape))
        self.file = StreamedFile(self.tmp / PACKED, layout, metadata={"format": FORMAT_NAME})
        self.written: dict[str, dict] = {}     # weight name -> its table entry's stored fields

    def put(self, name: str, qt) -> None:
        """One solved weight's stored tensor, written now (the caller may drop it)."""
        entries = stored_entries(name, qt.fmt, qt)
        for key, t in entries.items():
            self.file.write(key, t)
        self.written[name] = {"format": qt.fmt.to_dict(), "stored_bits": qt.stored_bits(),
                              "sha256": entries_sha256(entries)}

    def finish(self, *, model, tokenizer, quantized: dict, linears: dict[str, bool], methods: dict[str, str],
               manifest: dict) -> dict:
        """Write what `put` has not (`quantized`: weight name -> stored tensor; the model's other
        tensors in their storage dtype), the files that rebuild the model, and the manifest."""
        state, aliases = unique_state(model)
        if {n: tuple(t.shape) for n, t in state.items()} != self.shapes:
            raise SizewiseError("the model's tensors changed while its artifact was written")
        table = {}
        for name, t in state.items():
            if name in quantized:
                self.put(name, quantized[name])
            if name in self.written:
                stored = self.written[name]
            elif t.is_floating_point():
                entries = {name: t.detach().to(TORCH_DTYPES[self.float_dtype]).contiguous()}
                stored = {"format": FloatFormat(self.float_dtype).to_dict(),
                          "stored_bits": FloatFormat(self.float_dtype).stored_bits(1, t.numel()),
                          "sha256": entries_sha256(entries)}
                self.file.write(name, entries[name])
            else:  # integer buffers (e.g. position ids) are stored as they are
                entries = {name: t.detach().contiguous()}
                stored = {"format": {"kind": "raw", "dtype": str(t.dtype)},
                          "stored_bits": t.numel() * t.element_size() * 8, "sha256": entries_sha256(entries)}
                self.file.write(name, entries[name])
            table[name] = {"shape": list(t.shape), "format": stored["format"], "method": methods.get(name, "float"),
                           "stored_bits": stored["stored_bits"], "transposed": linears.get(name, False),
                           "linear": name in linears, "params": t.numel(), "sha256": stored["sha256"]}
        self.file.close()
        tmp = self.tmp
        model.config.save_pretrained(tmp / MODEL_FILES)      # what rebuilds the model; the weights are packed
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp / MODEL_FILES)
        tokenizer.save_pretrained(tmp / MODEL_FILES)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and (tmp / MODEL_FILES / "tokenizer.json").is_file():
            # the same tokenizer without the pretty-printing: 1.6 MB instead of 3.5 (SmolLM2's packed tensors: 114 MB)
            backend.save(str(tmp / MODEL_FILES / "tokenizer.json"), pretty=False)
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest,
                    "float_dtype": self.float_dtype, "aliases": aliases, "tensors": table}
        manifest["totals"] = totals(manifest, (tmp / PACKED).stat().st_size)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return manifest

    def abort(self) -> None:
        self.file.abort()


@contextmanager
def streamed(out: Path, *, model, formats: dict[str, Format], linears: dict[str, bool], float_dtype: str,
             overwrite: bool = False):
    """An `ArtifactWriter` in a staging directory that becomes `out` when the block completes (after
    `finish`); if the block raises, nothing is left (an interrupted run never looks complete)."""
    out = Path(out)
    check_output(out, overwrite)
    with staged_dir(out, overwrite=overwrite) as tmp:
        writer = ArtifactWriter(tmp, model, formats, linears, float_dtype)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        if not (tmp / MANIFEST).is_file():
            raise SizewiseError(f"internal: the artifact {out} was not finished")


def write(out: Path, *, model, tokenizer, quantized: dict,
          linears: dict[str, bool], methods: dict[str, str], float_dtype: str, manifest: dict,
          overwrite: bool = False) -> dict:
    """Write the artifact for `model`, whose weights equal the dequantized ones up to its storage
    dtype: quantized weights come from their stored tensors, not from the model.

    `quantized` maps weight names to their formats' stored tensors; `linears` maps each decoder linear
    weight name to whether it is stored transposed (GPT-2 Conv1D). (`streamed` writes them as they
    are solved instead.)
    """
    with streamed(out, model=model, formats={n: qt.fmt for n, qt in quantized.items()}, linears=linears,
                  float_dtype=float_dtype, overwrite=overwrite) as writer:
        return writer.finish(model=model, tokenizer=tokenizer, quantized=quantized, linears=linears,
                             methods=methods, manifest=manifest)


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


def entries_sha256(entries: dict[str, torch.Tensor]) -> str:
    """One sha256 over one weight's packed entries (its own key, or its parts' keys), in key order:
    verified on load, so a changed byte is named, not evaluated."""
    h = hashlib.sha256()
    for key in sorted(entries):
        h.update(key.encode() + b"\0" + tensor_sha256(entries[key]).encode())
    return h.hexdigest()


def _check_tables(m: dict, p: Path) -> None:
    """The manifest's tensor table and aliases are data from a stranger: each field has the type the
    loaders use, each format builds, each alias names a stored tensor; one line otherwise."""
    tensors, aliases = m.get("tensors"), m.get("aliases", {})
    if not isinstance(tensors, dict) or not isinstance(aliases, dict):
        raise SizewiseError(f"{p} is corrupt: 'tensors' and 'aliases' must be objects")
    for name, e in tensors.items():
        fmt = e.get("format") if isinstance(e, dict) else None
        ok = (isinstance(fmt, dict) and isinstance(e.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e["shape"])
              and all(isinstance(e.get(k), bool) for k in ("transposed", "linear"))
              and all(isinstance(e.get(k), int) for k in ("stored_bits", "params"))
              and isinstance(e.get("method"), str) and isinstance(e.get("sha256", ""), str))
        if not ok:
            raise SizewiseError(f"{p} is corrupt: the entry of tensor {name!r} lacks a field or has a wrong type")
        try:
            if fmt.get("kind") == "raw":
                getattr(torch, str(fmt["dtype"]).removeprefix("torch."))
            else:
                format_from_dict(fmt)
                if fmt.get("kind") != "float" and len(e["shape"]) != 2:
                    raise ValueError(f"a quantized weight has shape {e['shape']}")
        except Exception as ex:   # whatever a format's constructor says about fields it cannot use
            raise SizewiseError(f"{p} is corrupt: tensor {name!r} has format {fmt}: {ex}") from None
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in tensors or alias in tensors:
            raise SizewiseError(f"{p} is corrupt: alias {alias!r} -> {target!r} names no stored tensor")


def read_manifest(path: str | Path) -> dict:
    p = Path(path) / MANIFEST
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise SizewiseError(f"{path} is not a sizewise artifact (no {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise SizewiseError(f"{p} is corrupt: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME or m.get("format_version", 0) > FORMAT_VERSION:
        raise SizewiseError(f"{p} is not a sizewise artifact this version can read")
    _check_tables(m, p)
    return m


class StoredTensors(Mapping):
    """An artifact's tensors exactly as stored, read one at a time when asked for (each checked against
    its sha256 then): each quantized weight as its format's stored tensor ([out, in]), everything
    else as a tensor in its storage dtype. Tied aliases are not repeated. `described(name)` says
    what a tensor is without reading it (`Described`, or a meta tensor of its dtype and shape)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)

    def __iter__(self):
        return iter(self.manifest["tensors"])

    def __len__(self) -> int:
        return len(self.manifest["tensors"])

    def described(self, name: str):
        entry = self.manifest["tensors"][name]
        fmt = entry["format"]
        if fmt["kind"] == "raw":
            return torch.empty(entry["shape"], dtype=getattr(torch, str(fmt["dtype"]).removeprefix("torch.")),
                               device="meta")
        if fmt["kind"] == "float":
            return torch.empty(entry["shape"], dtype=TORCH_DTYPES[fmt["dtype"]], device="meta")
        return Described(format_from_dict(fmt), stored_shape(entry))

    def __getitem__(self, name: str):
        entry = self.manifest["tensors"][name]
        try:
            # opened for each tensor: the file's mapping goes with it, so the pages read do not stay resident
            with safe_open(str(self.path / PACKED), framework="pt") as f:
                fmt, read = entry["format"], {}

                def get(key):
                    read[key] = f.get_tensor(key)
                    return read[key]
                if fmt["kind"] in ("raw", "float"):
                    value = get(name)
                else:
                    value = read_stored(get, name, format_from_dict(fmt), stored_shape(entry))
            # manifests written before hashes were recorded load unverified, as they always did
            if "sha256" in entry and entries_sha256(read) != entry["sha256"]:
                raise SizewiseError(f"tensor {name} differs from its sha256 in the manifest")
        except (SafetensorError, OSError, ValueError, KeyError, SizewiseError) as e:
            raise SizewiseError(f"{self.path / PACKED} is missing or corrupt: {e}") from None
        return value


@dataclass(frozen=True)
class Described:
    """A quantized weight as the manifest describes it: its format and [out, in] shape."""

    fmt: Format
    shape: tuple[int, int]


def load_stored(path: str | Path) -> tuple[dict, dict]:
    """The tensors exactly as stored, all at once (`StoredTensors` reads them one at a time).

    Returns (tensors, manifest); tied aliases are not repeated.
    """
    stored = StoredTensors(path)
    return {name: stored[name] for name in stored}, stored.manifest


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
        config = AutoConfig.from_pretrained(path / MODEL_FILES, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SizewiseError(f"cannot build the model of {path} from {MODEL_FILES}/config.json: {first}") from None
    state = load_weights(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:     # a shape the config does not have, e.g. an edited alias
        raise SizewiseError(f"{path} does not match its model config: {str(e).strip().splitlines()[-1].strip()}") from None
    if unexpected or missing:
        raise SizewiseError(f"{path} does not match its model config (missing {missing[:2]}, unexpected {unexpected[:2]})")
    tokenizer = AutoTokenizer.from_pretrained(path / MODEL_FILES, trust_remote_code=False)
    return model.eval(), tokenizer, manifest
