"""Model families as data: one module per family, and this registry.

`of(config)` / `for_model_type(model_type)` return the `Family` that covers a transformers model
type; a model type no family covers gets `GENERIC`, with which discovery, compression and evaluation
still work and AWQ, rotation and GGUF export refuse with one line saying why.

Adding a family: a module here defining its `Family`, its line in `FAMILIES`, and a tiny config in
tests/tiny.py (tests/test_families.py checks all three).
"""

from __future__ import annotations

from . import gemma, gpt2, llama, opt, phi3, qwen2, qwen3
from .base import Family, Fold, GGUFArch, Prunable

__all__ = ["FAMILIES", "GENERIC", "Family", "Fold", "GGUFArch", "LLAMA", "Prunable",
           "awq_model_types", "config_from_gguf", "for_model_type", "gguf_support", "of", "prunable_model_types",
           "rotation_model_types", "supported_text"]

# The registry; its order is the order user-facing texts list families in.
FAMILIES: tuple[Family, ...] = (
    llama.LLAMA,
    qwen2.QWEN2,
    llama.MISTRAL,
    qwen3.QWEN3,
    gemma.GEMMA2,
    gemma.GEMMA3,
    gemma.GEMMA,
    phi3.PHI3,
    gpt2.GPT2,
    opt.OPT,
)

LLAMA = llama.LLAMA   # the GGUF layout callers without a config get (export.gguf.gguf_tensor_name)

_UNKNOWN = "no sizewise family covers this model type"
GENERIC = Family(name="generic", label="generic", model_types=(), no_awq=_UNKNOWN, no_rotation=_UNKNOWN,
                 known=False)


def _index(registry: tuple[Family, ...]) -> tuple[dict[str, Family], dict[str, Family]]:
    exact: dict[str, Family] = {}
    prefixes: dict[str, Family] = {}
    for fam in registry:
        for table, keys in ((exact, fam.model_types), (prefixes, fam.model_type_prefixes)):
            for t in keys:
                if t in table:
                    raise RuntimeError(f"model_type {t!r} is claimed by families {table[t].name} and {fam.name}")
                table[t] = fam
    return exact, prefixes


_BY_TYPE, _BY_PREFIX = _index(FAMILIES)


def for_model_type(model_type: str | None) -> Family:
    """The family covering a transformers `model_type` (by name, else by prefix); `GENERIC` for one
    no family covers."""
    if not isinstance(model_type, str):
        return GENERIC
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    return next((f for p, f in _BY_PREFIX.items() if model_type.startswith(p)), GENERIC)


def of(config) -> Family:
    """The family of a transformers config (by its `model_type`)."""
    return for_model_type(getattr(config, "model_type", None))


def supported_text() -> str:
    """"Llama-, Qwen2-, ... and OPT-style models", for error messages."""
    labels = [f"{f.label}-" for f in FAMILIES]
    return f"{', '.join(labels[:-1])} and {labels[-1]}style models"


def rotation_model_types() -> tuple[str, ...]:
    """Model types whose residual stream `quant.rotate` can rotate, in registry order."""
    return tuple(t for f in FAMILIES if f.rotates for t in f.covers)


def awq_model_types() -> tuple[str, ...]:
    """Model types AWQ has fold rules for ("gemma*" for a prefix), in registry order."""
    return tuple(t for f in FAMILIES if f.folds for t in f.covers)


def config_from_gguf(path) -> dict:
    """Config values of a GGUF file that transformers' GGUF loader does not read, by the family
    writing its architecture (`GGUFArch.config_from_gguf`); {} for an architecture none writes."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else None
    layout = next((f.gguf for f in FAMILIES if f.gguf is not None and f.gguf.arch == arch), None)
    if layout is None:
        return {}
    meta = {k[len(arch) + 1:] if k.startswith(f"{arch}.") else k: f.contents() for k, f in reader.fields.items()
            if not (k.startswith("tokenizer.") and f.types[:1] == [gguf.GGUFValueType.ARRAY])}   # not the vocabulary
    tensors = {t.name: t for t in reader.tensors}

    def tensor(name):
        t = tensors.get(name)
        if t is None or t.tensor_type != gguf.GGMLQuantizationType.F32:
            return None
        return np.asarray(t.data, dtype=np.float64).reshape(-1).tolist()

    return layout.config_from_gguf(meta, tensor)


def prunable_model_types() -> tuple[str, ...]:
    """Model types structured pruning knows the modules of ("gemma*" for a prefix), in registry order."""
    return tuple(t for f in FAMILIES if f.prunable is not None for t in f.covers)


def gguf_support() -> str:
    """"llama (model_type llama, mistral)": the llama.cpp architectures GGUF export writes, with the
    model types that become each."""
    archs: dict[str, list[str]] = {}
    for f in FAMILIES:
        if f.gguf is not None:
            archs.setdefault(f.gguf.arch, []).extend(f.covers)
    return "; ".join(f"{a} (model_type {', '.join(ts)})" for a, ts in archs.items())
