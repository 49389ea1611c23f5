"""Model sources: a sizewise artifact, a Hugging Face directory, a GGUF file, or a built-in name.

Every source ends as (model on CPU, tokenizer, provenance). A Hugging Face directory's model keeps
its weights' storage dtype (bf16/fp16 as stored; transformers memory-maps safetensors whose dtype it
keeps), so the whole model never exists in float32: the engine and the evaluator bring one decoder
layer at a time to float32 (`precision`). A model whose float32 copy would not fit comfortably keeps
its decoder layers on disk until each runs (`lazy`; SIZEWISE_LAZY=0/1 decides). Weights load from
safetensors only unless the caller explicitly allows pickle; remote code is never run.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

try:        # transformers validates configs with huggingface_hub's strict dataclasses (newer versions)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:                 # older: such checks raise ValueError, caught already
    StrictDataclassError = ValueError

from . import artifact, builtins, lazy, locate
from .data import files_sha256
from .errors import SizewiseError
from .filecheck import check_safetensors
from .lossless import is_packed_model, load_packed_model


@dataclass
class Source:
    model: torch.nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)   # spec, kind, path, sha256, model_type, parameters
    # transforms already applied to `model` in memory (name -> record), e.g. a budget rotates the model
    # before profiling it and the compression that follows must not rotate it again
    transforms: dict = field(default_factory=dict)


def _weights_sha256(directory: Path) -> str:
    """One hash over the weight files (name + content hash of each, sorted)."""
    return files_sha256(list(directory.glob("*.safetensors")) or list(directory.glob("*.bin")))


def _gguf_tokenizer_pre(path: Path) -> str | None:
    """llama.cpp's pre-tokenizer name, kept so that an export back to GGUF tokenizes the same way."""
    import gguf

    field = gguf.GGUFReader(path).get_field("tokenizer.ggml.pre")
    return None if field is None else field.contents()


def _storage_dtype(config) -> torch.dtype:
    """The dtype the checkpoint says its weights are stored in, if it is a float dtype we compute from."""
    dtype = getattr(config.get_text_config(), "dtype", None) or getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _load_hf(directory: Path, allow_pickle: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    has_safetensors = any(directory.glob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise SizewiseError(f"{directory} holds only pickled PyTorch weights; convert them to safetensors "
                                "or pass --allow-pickle if you trust the files")
        raise SizewiseError(f"{directory} holds no model weights (*.safetensors)")
    try:
        for f in directory.glob("*.safetensors"):
            check_safetensors(f)    # a truncated or corrupt header is one line, not the loader's traceback
    except SizewiseError as e:
        raise SizewiseError(f"cannot load a causal LM from {directory}: {e}") from None
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        dtype = _storage_dtype(config)
        stored = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        if has_safetensors and lazy.wanted(directory, stored * 4 // dtype.itemsize):
            model = lazy.load(directory, config, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False, dtype=dtype,
                                                         use_safetensors=has_safetensors or None)
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except pickle.UnpicklingError:     # torch.load(weights_only=True) met a pickle that is more than tensors
        raise SizewiseError(f"{directory}: weights-only loading refused its pickled weights (they hold more than "
                            "tensors, e.g. code to run); sizewise never unpickles arbitrary objects") from None
    except (OSError, ValueError, KeyError, SafetensorError, StrictDataclassError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SizewiseError(f"cannot load a causal LM from {directory}: {first}") from None
    return model.eval(), tokenizer, config


def load(spec: str | Path, *, allow_pickle: bool = False) -> Source:
    """Resolve and load a model given by path or built-in name."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir() and is_packed_model(path):   # first: a packed directory also holds manifest.json
        model, tokenizer, info = load_packed_model(path, dtype=torch.float32)
    elif path.is_dir() and artifact.is_artifact(path):
        model, tokenizer, manifest = artifact.load(path)
        info = {"kind": "artifact", "path": str(path.resolve()),
                "sha256": hashlib.sha256((path / artifact.MANIFEST).read_bytes()).hexdigest(),
                "compressed_from": manifest.get("source")}
    elif (found := locate.model_dir(spec)) is not None:   # a HF directory, a .gguf file or a built-in name
        directory, where = found
        if where["kind"] == "hf":
            model, tokenizer, _ = _load_hf(directory, allow_pickle)
            info = {"kind": "hf", "path": where["path"], "sha256": _weights_sha256(directory)}
        elif where["kind"] == "gguf":
            model, tokenizer, _ = _load_hf(directory, False)
            info = {"kind": "gguf", "path": where["path"], "sha256": where["gguf_sha256"],
                    "tokenizer_pre": _gguf_tokenizer_pre(path)}
        else:
            model, tokenizer, _ = _load_hf(directory, False)
            provenance = directory / "sizewise_source.json"
            info = {"kind": "builtin", "path": where["path"], "sha256": _weights_sha256(directory),
                    "provenance": json.loads(provenance.read_text()) if provenance.is_file() else None,
                    "tokenizer_pre": getattr(builtins.MODELS[spec], "tokenizer_pre", None)}
    elif path.exists():
        raise SizewiseError(f"{spec} is neither a Hugging Face model directory (config.json), a .gguf file, "
                            "nor a sizewise artifact (manifest.json)")
    else:
        raise SizewiseError(f"no model at {spec}: give a Hugging Face directory, a .gguf file, a sizewise "
                            f"artifact, or a built-in name ({', '.join(builtins.MODELS)})")
    info = {"spec": spec, **info, "model_type": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters())}
    return Source(model, tokenizer, info)
