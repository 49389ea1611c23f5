"""The format registry: a format's JSON `kind` → its class. Adding a format is its module and a line here."""

from __future__ import annotations

from ..errors import SizewiseError
from .codebook import CodebookFormat
from .formats import FloatFormat, Format
from .kquant import KQuantFormat
from .lowrank import LowRankFormat
from .sparse import SparseFormat
from .uniform import QuantFormat

FORMATS: dict[str, type[Format]] = {cls.kind: cls for cls in (
    FloatFormat,
    QuantFormat,
    KQuantFormat,
    CodebookFormat,
    SparseFormat,
    LowRankFormat,
)}


# llama.cpp's quantized block types as formats, each held exactly (`Format.ggml_type`), by type name
GGML_FORMATS: dict[str, Format] = {f.ggml_type: f for cls in FORMATS.values() for f in cls.ggml_formats()}


def format_from_dict(d: dict) -> Format:
    """The format a manifest or plan describes; one-line error for anything else (the dict is untrusted)."""
    if not isinstance(d, dict) or d.get("kind") not in FORMATS:
        kind = d.get("kind") if isinstance(d, dict) else d
        raise SizewiseError(f"unknown format kind {kind!r}; known: {', '.join(FORMATS)}")
    # wrappers (sparse, low-rank) hold their kept or base format as a nested dict
    fields = {k: format_from_dict(v) if isinstance(v, dict) else v for k, v in d.items() if k != "kind"}
    try:
        return FORMATS[d["kind"]](**fields)
    except TypeError as e:
        raise SizewiseError(f"bad {d['kind']} format {fields}: {e}") from None
