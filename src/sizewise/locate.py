"""Where the Hugging Face directory of a model spec is: the one place a spec is resolved to it.

sources.load (which loads the model) and lossless packing (which reads its safetensors) both ask
here, so a .gguf file maps to the same converted cache entry and a built-in name to the same fetch.
"""

from __future__ import annotations

from pathlib import Path

from . import builtins
from .data import sha256_file
from .filecheck import check_gguf


def model_dir(spec: str | Path) -> tuple[Path, dict] | None:
    """(directory, where) for a Hugging Face directory (config.json), a .gguf file (converted to
    float safetensors once, into the cache) or a built-in model name (fetched into the cache);
    None when `spec` is none of these. `where`: kind ("hf", "gguf", "builtin"), path, and for a
    GGUF file its sha256 (gguf_sha256). Callers recognise lossless-packed directories and
    sizewise artifacts before asking (a packed model directory holds a config.json too)."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return path, {"kind": "hf", "path": str(path.resolve())}
    if path.is_file() and path.suffix.lower() == ".gguf":
        check_gguf(path)    # even with a cached conversion: its tokenizer metadata is read again
        digest = sha256_file(path)
        converted = builtins.cache_dir() / "gguf" / digest[:32]
        if not (converted / "config.json").is_file():
            builtins.gguf_to_hf(path, converted)
        return converted, {"kind": "gguf", "path": str(path.resolve()), "gguf_sha256": digest}
    if not path.exists() and builtins.is_builtin_model(spec):
        directory = builtins.fetch_model(spec)
        return directory, {"kind": "builtin", "path": str(directory)}
    return None
