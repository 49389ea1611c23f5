"""The allocator's candidates: the ways one weight may be stored (a quantizer and a format, or float),
the candidate sets (`candidate_set`, llama.cpp's types in `gguf_candidate_set`), which token tables
take which candidates, and what a candidate makes of a weight (`_solved`, `_dequantized`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import Architecture
from ..errors import SizewiseError
from ..plan import Choice
from ..quant import methods
from ..quant.formats import TORCH_DTYPES, FloatFormat, Format
from ..quant.registry import GGML_FORMATS, format_from_dict  # noqa: F401 (GGML_FORMATS: re-exported)
from ..quant.uniform import QuantFormat


@dataclass(frozen=True)
class Candidate:
    """One way to store a linear weight: a quantizer and a format, or "float" and a float dtype."""

    method: str
    format: Format

    def fits(self, in_features: int) -> bool:
        """Whether the format tiles this input size (a group size that divides it, k-quants: 256 | in)."""
        try:
            self.format.check(in_features)
        except SizewiseError:
            return False
        return True

    @property
    def label(self) -> str:
        return self.format.label if self.method == "float" else f"{self.method} {self.format.label}"

    def to_dict(self) -> dict:
        return {"method": self.method, "format": self.format.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        return cls(d["method"], format_from_dict(d["format"]))


def candidate_set(quantizers: tuple[str, ...] = ("rtn",), bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8),
                  group_sizes: tuple[int | None, ...] = (32, 64, 128, None),
                  float_dtype: str | None = "float16") -> tuple[Candidate, ...]:
    """Asymmetric integer-zero formats with float16 scales for every (quantizer, bits, group), plus float.

    Group sizes that do not divide a layer's input size are skipped for that layer only; None is
    per-channel. `float_dtype=None` leaves the float option out.
    """
    for q in quantizers:
        methods.get(q)
    cands = [Candidate(q, QuantFormat(b, g, symmetric=False, scale_dtype="float16", zero="int"))
             for q in quantizers for b in bits for g in group_sizes]
    if float_dtype is not None:
        cands.append(Candidate("float", FloatFormat(float_dtype)))
    if not cands:
        raise SizewiseError("the candidate set is empty")
    return tuple(cands)




def gguf_candidate_set(quantizers: tuple[str, ...] = ("rtn",), float_dtype: str | None = "float16") -> tuple[Candidate, ...]:
    """Only formats that llama.cpp's block types hold exactly, plus float: the 32-weight types (Q4_0,
    Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL with its non-uniform levels, MXFP4 at 4.25 bits) and the k-quants (Q2_K .. Q6_K; only on layers whose input size is a
    multiple of 256). A plan made of these exports to GGUF unchanged, as a mixed-type file. Token
    tables take them too (`_table_takes`)."""
    cands = [Candidate(q, f) for q in quantizers for f in GGML_FORMATS.values()]
    for q in quantizers:
        methods.get(q)
    if float_dtype is not None:
        cands.append(Candidate("float", FloatFormat(float_dtype)))
    return tuple(cands)


def _choice(name: str, cand: Candidate) -> Choice:
    return Choice(name, cand.method, cand.format)


def _solved(cand: Candidate, w: torch.Tensor, stats, options: dict | None):
    """What `api.compress` stores for this candidate: a QuantizedTensor, or the float weight."""
    if cand.method == "float":
        return w.to(TORCH_DTYPES[cand.format.dtype]).float()
    return methods.solve(cand.method, w, stats, cand.format, options)


def _solved_all(cands: list[Candidate], w: torch.Tensor, stats, options: dict | None) -> list:
    """`_solved` of every candidate, each method solving all its formats at once (`methods.solve_many`)."""
    out: list = [None] * len(cands)
    by_method: dict[str, list[int]] = {}
    for k, c in enumerate(cands):
        if c.method == "float":
            out[k] = _solved(c, w, stats, options)
        else:
            by_method.setdefault(c.method, []).append(k)
    for m, ks in by_method.items():
        for k, t in zip(ks, methods.solve_many(m, w, stats, [cands[k].format for k in ks], options)):
            out[k] = t
    return out


def _dense(solved) -> torch.Tensor:
    return solved if isinstance(solved, torch.Tensor) else solved.dequantize()


def _dequantized(cand: Candidate, w: torch.Tensor, stats, options: dict | None) -> torch.Tensor:
    """The weight the model would hold with this candidate (what `api.compress` computes)."""
    return _dense(_solved(cand, w, stats, options))


def _data_free(c: Candidate) -> bool:
    return c.method == "float" or not methods.get(c.method).needs_calibration


def _table_takes(arch: Architecture, name: str, c: Candidate) -> bool:
    """Whether token table `name` may be quantized with candidate `c` (float is always its fallback):
    an input embedding only data-free, the head (or the embedding tied to it) also calibrated, from
    the statistics of its input, the final hidden states (`engine.head_statistics`)."""
    return c.method != "float" and c.fits(arch.tables[name][1]) and (_data_free(c) or name == arch.head_table)
