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
from ..quant.lowrank import LowRankFormat
from ..quant.registry import GGML_FORMATS, format_from_dict  # noqa: F401 (GGML_FORMATS: re-exported)
from ..quant.sparse import SparseFormat
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
    cands = [Candidate(q, _grid(b, g)) for q in quantizers for b in bits for g in group_sizes]
    if float_dtype is not None:
        cands.append(Candidate("float", FloatFormat(float_dtype)))
    if not cands:
        raise SizewiseError("the candidate set is empty")
    return tuple(cands)


def _grid(bits: int, group: int | None) -> QuantFormat:
    return QuantFormat(bits, group, symmetric=False, scale_dtype="float16", zero="int")


@dataclass(frozen=True)
class JointAxes:
    """The grids, sparsity patterns and ranks that pruning and low-rank candidates take. Few on purpose:
    profiling solves every candidate on every layer. Group 64 divides the input sizes of most models."""

    patterns: tuple[str, ...] = ("2:4", "50%")
    sparse_bits: tuple[int, ...] = (3, 4, 5)           # the kept weights' grids (group 64)
    lowrank_bits: tuple[int, ...] = (2, 3, 4)          # the corrected grids (group 64)
    ranks: tuple[int, ...] = (8, 16)                   # float16 factors
    sparse_lowrank: tuple[tuple[str, int, int], ...] = (("2:4", 4, 8),)   # (pattern, kept bits, rank)
    svd_ranks: tuple[int, ...] = (32, 64)              # factors alone
    group_size: int = 64


JOINT_AXES = JointAxes()

# GPTQ's grids in a budget that also offers RTN's. GPTQ solves all its grids in one column loop whose
# cost grows with their number, and two kinds buy least there: 8 bits (its error is already ~1% of 4
# bits') and groups of 32 (64 is chosen far more often). RTN's grid of the same format stays a
# candidate. On both real models' profiles the knapsack's predicted KL without GPTQ at those rises by
# at most 0.34% at 2.5-3.5 bits per weight, 0.8% at 4 and 4% at 5 (upper bounds: RTN's were not offered
# in that check; bench/candidate_grids.py); the default budget run solves 15 GPTQ grids, not 24.
BUDGET_GPTQ_BITS = (2, 3, 4, 5, 6)
BUDGET_GPTQ_GROUPS = (64, 128, None)


def budget_candidates(names: tuple[str, ...], float_dtype: str = "float16",
                      axes: JointAxes = JOINT_AXES) -> tuple[Candidate, ...]:
    """The candidates a budget's method list names (`methods.split_budget_methods`).

    Quantizers alone: `candidate_set(quantizers)`, except that beside RTN, GPTQ takes only the grids
    `BUDGET_GPTQ_BITS` x `BUDGET_GPTQ_GROUPS` (RTN's grid is the candidate for the others). Each pruner listed adds sparse
    candidates (`axes.patterns` × kept weights on `axes.sparse_bits` grids; SparseGPT rounds them with
    GPTQ in the same pass, Wanda and magnitude to nearest); "lowrank" adds the quantizers' grids at
    `axes.lowrank_bits` plus rank-r factors, and with a pruner, sparse grids plus factors
    (`axes.sparse_lowrank`); "svd" adds factors alone at `axes.svd_ranks`. Each is one composed
    format, so its size and cost come from the same code as any other candidate's.
    """
    kinds = methods.split_budget_methods(tuple(names))
    cands = list(candidate_set(kinds.quantizers, float_dtype=float_dtype))
    if "rtn" in kinds.quantizers:            # RTN covers the grids where GPTQ buys least (BUDGET_GPTQ_*)
        cands = [c for c in cands if c.method != "gptq" or (c.format.bits in BUDGET_GPTQ_BITS
                                                            and c.format.group_size in BUDGET_GPTQ_GROUPS)]
    g = axes.group_size
    # the pruner's quantizing variant where it has one (sparsegpt -> sparsegpt+gptq: one pass)
    pruners = [p if p.endswith("+gptq") or f"{p}+gptq" not in methods.METHODS else f"{p}+gptq"
               for p in kinds.pruners]
    cands += [Candidate(p, SparseFormat(_grid(b, g), pat)) for p in pruners for pat in axes.patterns
              for b in axes.sparse_bits]
    if kinds.lowrank:
        cands += [Candidate(q, LowRankFormat(_grid(b, g), r)) for q in kinds.quantizers for b in axes.lowrank_bits
                  for r in axes.ranks]
        cands += [Candidate(p, LowRankFormat(SparseFormat(_grid(b, g), pat), r)) for p in pruners
                  for pat, b, r in axes.sparse_lowrank]
    if kinds.svd:
        cands += [Candidate("svd", LowRankFormat(None, r)) for r in axes.svd_ranks]
    return tuple(dict.fromkeys(cands))


def gguf_candidate_set(quantizers: tuple[str, ...] = ("rtn",), float_dtype: str | None = "float16") -> tuple[Candidate, ...]:
    """Only formats that llama.cpp's block types hold exactly, plus float: the 32-weight types (Q4_0,
    Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL with its non-uniform levels, MXFP4 at 4.25 bits) and the k-quants (Q2_K .. Q6_K; only on layers whose input size is a
    multiple of 256). A plan made of these exports to GGUF unchanged, as a mixed-type file. Token
    tables take them too (`_table_takes`)."""
    if methods.split_budget_methods(tuple(quantizers)).joint:
        raise SizewiseError("with --format gguf the allocator chooses among llama.cpp's types: pruning and "
                            "low-rank candidates are for the artifact (or apply one with --sparsity/--lowrank)")
    cands = [Candidate(q, f) for q in quantizers for f in GGML_FORMATS.values()]
    if float_dtype is not None:
        cands.append(Candidate("float", FloatFormat(float_dtype)))
    return tuple(cands)


def profiled(cands: tuple[Candidate, ...]) -> list[bool]:
    """Per candidate, whether the allocator profiles it on decoder linears: not where a method that
    dominates it (`Method.dominates`: GPTQ over RTN) is a candidate on the same format, since the knapsack
    never picks a candidate of the same size and a higher cost. Solving and pricing RTN's 24 grids was
    a sixth of profiling a SmolLM2 layer beside GPTQ's; token tables still take them (an input embedding
    takes only data-free ones)."""
    on = {(c.method, c.format) for c in cands}
    return [c.method == "float" or not any((m.name, c.format) in on for m in methods.METHODS.values()
                                           if c.method in m.dominates) for c in cands]


def _choice(name: str, cand: Candidate) -> Choice:
    return Choice(name, cand.method, cand.format)


def _solved(cand: Candidate, w: torch.Tensor, stats, options: dict | None, text_given: bool = True):
    """What `api.compress` stores for this candidate: a QuantizedTensor, or the float weight. As there,
    the statistics reach only candidates that read them with this calibration (`methods.calibrates`:
    without text, a data-free quantizer's low-rank correction is the plain SVD of its error)."""
    if cand.method == "float":
        return w.to(TORCH_DTYPES[cand.format.dtype]).float()
    return methods.solve(cand.method, w, _stats_for(cand, stats, text_given), cand.format, options)


def _stats_for(cand: Candidate, stats, text_given: bool):
    return stats if methods.calibrates(cand.method, cand.format, text_given) else None


def _solved_all(cands: list[Candidate], w: torch.Tensor, stats, options: dict | None, text_given: bool = True) -> list:
    """`_solved` of every candidate, each method solving all its formats at once (`methods.solve_many`)."""
    out: list = [None] * len(cands)
    by_method: dict[tuple[str, bool], list[int]] = {}       # (method, reads the statistics) -> candidates
    for k, c in enumerate(cands):
        if c.method == "float":
            out[k] = _solved(c, w, stats, options)
        else:
            by_method.setdefault((c.method, methods.calibrates(c.method, c.format, text_given)), []).append(k)
    for (m, reads), ks in by_method.items():
        for k, t in zip(ks, methods.solve_many(m, w, stats if reads else None, [cands[k].format for k in ks], options)):
            out[k] = t
    return out


def _dense(solved) -> torch.Tensor:
    return solved if isinstance(solved, torch.Tensor) else solved.dequantize()


def _dequantized(cand: Candidate, w: torch.Tensor, stats, options: dict | None, text_given: bool = True) -> torch.Tensor:
    """The weight the model would hold with this candidate (what `api.compress` computes)."""
    return _dense(_solved(cand, w, stats, options, text_given))


def _data_free(c: Candidate) -> bool:
    return c.method == "float" or not methods.get(c.method).needs_calibration


def _table_takes(arch: Architecture, name: str, c: Candidate) -> bool:
    """Whether token table `name` may be quantized with candidate `c` (float is always its fallback):
    an input embedding only data-free, the head (or the embedding tied to it) also calibrated, from
    the statistics of its input, the final hidden states (`engine.head_statistics`)."""
    return (c.format.compression == "quant" and c.fits(arch.tables[name][1])
            and (_data_free(c) or name == arch.head_table))
