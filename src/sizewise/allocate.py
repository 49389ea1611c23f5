"""Budget allocation: per-layer candidates, measured sensitivities, an exact knapsack, budgets → a Plan.

    from sizewise.allocate import plan_for_budget, render
    alloc = plan_for_budget("smollm2-135m", "3.5bpw", calib=CalibConfig(text="enwiki-sample"))
    print(render(alloc)); Path("plan.json").write_text(alloc.plan.to_json())

The pieces are separate so that a sweep over budgets profiles once:

    sizes = size_table(model, arch, cands)        # exact sizes, from shapes alone (of the packed
                                                  # artifact; layout=GGUFLayout.for_source(src): of the .gguf)
    check_budget(budget, sizes)                   # one-line error before any expensive work
    prof = profile_model(model, arch, samples, cands)   # or cached_profile(...)
    alloc = allocate(prof, sizes, budget)         # exact multiple-choice knapsack
    alloc = choose_measured(src, arch, calib, prof, sizes, budget)   # ...checked by measurement

Sensitivity proxy (predicted KL divergence from the float model, nats per token). For a linear
layer with calibration inputs X (H = XᵀX over N tokens) and a candidate's weight error ΔW, the
layer-output error of output channel j is e_j = (ΔW H ΔWᵀ)_jj / N, exactly the mean over tokens
of (Δy_j)². A second-order expansion of the KL around the float model turns output errors into
model loss: KL ≈ ½ Σ_j f_j e_j, where f_j is the diagonal Fisher of the layer's output (mean over
tokens of (∂ℓ/∂y_j)², labels sampled from the model itself, so that E[ggᵀ] is the Fisher of the
model's own distribution and ½ δᵀFδ is its KL). Costs add over layers (cross-terms ignored).

A GGUF runs in llama.cpp, which also rounds each matmul's input to the weight type's dot-product
format (`export.ggml_matmul`: 8-bit blocks of 32 for Q4_0..Q8_0 and IQ4_NL, of 256 for the
k-quants, float16 for F16). With `arithmetic="llamacpp"` a candidate's cost adds that rounding's
½ Σ_j f_j (W E Wᵀ)_jj / N (E = Σ e eᵀ of the input's rounding error e, on the float weight W; the
cross term with the weight error is ignored), scaled per linear role to the KL measured with all
of that role's inputs rounded (`_calibrate_rounding`); the head table's is measured with its input
rounded, and plans are measured with every input rounded as llama.cpp would.

Profiling runs the engine once over the *float* model: each layer's statistics are those of the
inputs the float model gives it. The allocation must be known before any layer is compressed, and
a layer's own error dominates the change its input statistics would see from upstream choices.

Costs stop adding up when many layers are coarse (errors compound: at 3.3 bpw on SmolLM2 the
prediction was 0.79 nats, the measurement 1.29), so `choose_measured` measures the knapsack's
plan next to the knapsack without its lowest bit widths and the best uniform plan, on held-out
calibration samples, and keeps the least measured KL. Token tables (embedding, untied head) are
items only under file-size budgets, with costs measured directly: data-free candidates, and for the
table that computes the logits also calibrated ones, solved from the final hidden states.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import builtins, engine
from .defaults import HEAD_SAMPLES, MEASURE_SAMPLES, ROUNDING_TOKENS
from .arch import Architecture, discover
from .errors import SizewiseError
from .observers import DEFAULT_OBSERVERS, RoundingGram
from .plan import Choice, Plan
from .quant import methods
from .quant.formats import DTYPE_BITS, TORCH_DTYPES, FloatFormat, Format, label
from .quant.registry import format_from_dict
from .quant.uniform import QuantFormat
from .quant.codebook import CodebookFormat
from .quant.kquant import KQUANT_TYPES, KQuantFormat
from .quant.pack import packed_nbytes

PROFILE_VERSION = 5          # bump when the proxy's definition changes: cached profiles are then ignored (5: llama.cpp's input rounding)


# --- candidates -----------------------------------------------------------------------------------


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
        return self.format.dtype if self.method == "float" else f"{self.method} {label(self.format)}"

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


# llama.cpp's quantized block types as our formats, each held exactly (`Format.ggml_type`)
GGML_FORMATS: dict[str, Format] = {
    **{f"Q{b}_0": QuantFormat(b, 32, symmetric=True, scale_dtype="float16") for b in (4, 5, 8)},
    **{f"Q{b}_1": QuantFormat(b, 32, symmetric=False, scale_dtype="float16", zero="float16") for b in (4, 5)},
    **{t: KQuantFormat(t) for t in KQUANT_TYPES},
    "IQ4_NL": CodebookFormat("IQ4_NL"),
    "MXFP4": CodebookFormat("MXFP4"),
}


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


def _dense(solved) -> torch.Tensor:
    return solved if isinstance(solved, torch.Tensor) else solved.dequantize()


def _dequantized(cand: Candidate, w: torch.Tensor, stats, options: dict | None) -> torch.Tensor:
    """The weight the model would hold with this candidate (what `api.compress` computes)."""
    return _dense(_solved(cand, w, stats, options))


# --- exact sizes ----------------------------------------------------------------------------------

# safetensors' dtype names: header entries are sized exactly, up to the offsets' digit counts
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL"}
_FLOAT_ST = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def _tensors(name: str, cand: Candidate, shape: tuple[int, int], state_shape: tuple[int, ...]):
    """(tensor name, safetensors dtype, shape, bytes) of what the artifact stores for this choice."""
    out, inp = shape
    fmt = cand.format
    if isinstance(fmt, FloatFormat):
        return [(name, _FLOAT_ST[fmt.dtype], state_shape, out * inp * DTYPE_BITS[fmt.dtype] // 8)]
    if isinstance(fmt, (KQuantFormat, CodebookFormat)):   # ggml's blocks, one row of them per output channel
        nbytes = fmt.stored_bits(out, inp) // 8
        return [(f"{name}:ggml", "U8", (out, nbytes // out), nbytes)]
    groups = out * (inp // fmt.group_len(inp))
    codes = packed_nbytes(out * inp, fmt.bits)
    scale_bytes = groups * DTYPE_BITS[fmt.scale_dtype] // 8
    rows = [(f"{name}:codes", "U8", (codes,), codes),
            (f"{name}:scales", _FLOAT_ST[fmt.scale_dtype], (out, groups // out), scale_bytes)]
    if not fmt.symmetric:
        if fmt.zero == "int":
            z = packed_nbytes(groups, fmt.bits)
            rows.append((f"{name}:zeros", "U8", (z,), z))
        else:
            rows.append((f"{name}:zeros", "F16", (out, groups // out), groups * 2))
    return rows


def _entry_bytes(name: str, dtype: str, shape, digits: int) -> int:
    """One safetensors header entry (compact JSON, with its comma), offsets at their widest."""
    wide = "9" * digits
    entry = f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":[{",".join(map(str, shape))}],' \
            f'"data_offsets":[{wide},{wide}]}}'
    return len(entry) + 1


# A row is one tensor as a file holds it: (name, dtype or ggml type, shape, data bytes).
Row = tuple[str, str, tuple[int, ...], int]


class ArtifactLayout:
    """The packed artifact's `packed.safetensors` (`artifact.write`): 8 bytes of header length, a
    JSON header padded to a multiple of 8, then the tensor bytes. Tensor bytes are exact; each header
    entry is counted with its data offsets at the largest width they could have, so a file size is a
    tight upper bound (a few bytes per tensor)."""

    kind = "artifact"
    arithmetic = None           # sizewise's own kernels multiply by float activations
    noun = "packed file"

    def check(self, candidates: tuple[Candidate, ...]) -> None:
        pass

    def rows(self, name: str, cand: Candidate, shape: tuple[int, int], state_shape: tuple[int, ...]) -> list[Row]:
        return _tensors(name, cand, shape, state_shape)

    def other_rows(self, name: str, t: torch.Tensor, float_dtype: str) -> list[Row]:
        if t.is_floating_point():
            return [(name, _FLOAT_ST[float_dtype], tuple(t.shape), t.numel() * DTYPE_BITS[float_dtype] // 8)]
        return [(name, _ST_DTYPES.get(t.dtype, "XXXX"), tuple(t.shape), t.numel() * t.element_size())]

    def measure(self, others: list[Row], groups: list[list[list[Row]]]) -> tuple[int, list[list[int]]]:
        """(bytes of everything but the choices, bytes of each option of each group of choices)."""
        from .artifact import FORMAT_NAME

        most = sum(r[3] for r in others) + sum(max(sum(r[3] for r in opt) for opt in g) for g in groups)
        digits = len(str(most))
        entries = lambda rows: sum(_entry_bytes(n, d, s, digits) + b for n, d, s, b in rows)     # noqa: E731
        prefix = len(json.dumps({"__metadata__": {"format": FORMAT_NAME}}, separators=(",", ":")))
        return 8 + prefix + 7 + entries(others), [[entries(opt) for opt in g] for g in groups]

    def describe(self) -> dict:
        return {"kind": self.kind}


class GGUFLayout:
    """The GGUF file that `export` writes from the artifact (`export/gguf.py`): a header (metadata,
    the whole tokenizer, one info per tensor) padded to 32 bytes, then every tensor's ggml blocks
    padded to 32 bytes; norms F32, other float tensors in the float dtype, a tied head left out.

    Exact, to the byte: the header is sized by gguf's own writer with the metadata the export writes
    (`export_args`; nothing in it depends on the plan), data by ggml's block sizes. Candidates must
    be ggml types (`gguf_candidate_set`).
    """

    kind = "gguf"
    arithmetic = "llamacpp"     # what runs it rounds each matmul's input (`export.ggml_matmul`)
    noun = "GGUF file"

    def __init__(self, config, tokenizer, *, name: str | None = None, tokenizer_pre: str | None = None,
                 metadata: dict | None = None):
        self.config, self.tokenizer = config, tokenizer
        self.export_args = {"name": name, "tokenizer_pre": tokenizer_pre, "metadata": dict(metadata or {})}

    @classmethod
    def for_source(cls, src) -> "GGUFLayout":
        """The GGUF a compression of `src` is exported as (`export.gguf.gguf_export_args`)."""
        from .export.gguf import gguf_export_args

        return cls(src.model.config, src.tokenizer, **gguf_export_args(src.info))

    def check(self, candidates: tuple[Candidate, ...]) -> None:

        bad = [c for c in candidates if c.format.ggml_type is None]
        if bad:
            raise SizewiseError(f"GGUF cannot hold {bad[0].label} exactly; a GGUF's candidates must be ggml types "
                                "(allocate.gguf_candidate_set: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4, Q2_K..Q6_K, float)")

    def rows(self, name: str, cand: Candidate, shape: tuple[int, int], state_shape: tuple[int, ...]) -> list[Row]:
        from .export.gguf import GGML, data_bytes

        t = GGML[cand.format.ggml_type]
        return [(name, t.name, tuple(state_shape), data_bytes(t, state_shape))]

    def other_rows(self, name: str, t: torch.Tensor, float_dtype: str) -> list[Row]:
        from .export.gguf import data_bytes, float_type

        if not t.is_floating_point():
            raise SizewiseError(f"GGUF holds float tensors only; {name} is {t.dtype}")
        g = float_type(t.dim(), TORCH_DTYPES[float_dtype])
        return [(name, g.name, tuple(t.shape), data_bytes(g, tuple(t.shape)))]

    def measure(self, others: list[Row], groups: list[list[list[Row]]]) -> tuple[int, list[list[int]]]:
        from .export.gguf import file_names, header_bytes

        firsts = [g[0][0] for g in groups]            # one row per choosable tensor, whatever its type
        names = file_names(self.config, [r[0] for r in others + firsts])
        head = header_bytes(self.config, [(names[n], shape) for n, _, shape, _ in others + firsts if n in names],
                            self.tokenizer, **self.export_args)
        kept = lambda rows: sum(b for n, _, _, b in rows if n in names)     # noqa: E731
        return head + kept(others), [[kept(opt) for opt in g] for g in groups]

    def write(self, artifact_dir, out, overwrite: bool = False) -> dict:
        """`api.export` of the artifact to GGUF, with the metadata this layout counted."""
        from . import api

        return api.export(artifact_dir, out, format="gguf", overwrite=overwrite, **self.export_args)

    def describe(self) -> dict:
        return {"kind": self.kind, **self.export_args}


ARTIFACT = ArtifactLayout()


def file_layout(layout, src=None):
    """"artifact" or "gguf" (for `src`, a loaded Source), or a layout object as it is."""
    if layout is None or layout == "artifact":
        return ARTIFACT
    if layout == "gguf":
        if src is None:
            raise SizewiseError("a GGUF layout needs the model's source (config and tokenizer)")
        return GGUFLayout.for_source(src)
    if isinstance(layout, str):
        raise SizewiseError(f"unknown output format {layout!r}; available: artifact, gguf")
    return layout


@dataclass(frozen=True)
class LayerSizes:
    name: str                        # weight name in the state dict
    shape: tuple[int, int]           # (out, in)
    options: tuple[int, ...]         # indices of the candidates that fit this layer
    bits: tuple[int, ...]            # exact stored bits of each option (fmt.stored_bits)
    file_bytes: tuple[int, ...]      # bytes each option adds to the output file (per the layout)


@dataclass(frozen=True)
class SizeTable:
    """Exact sizes of every candidate on every decoder linear, and of everything else in the file.

    File sizes are those of the output file `layout` describes: the artifact's packed file, or a GGUF.
    """

    candidates: tuple[Candidate, ...]
    layers: tuple[LayerSizes, ...]
    linear_params: int
    fixed_file_bytes: int            # all other tensors, headers and padding
    float_dtype: str
    # token tables (embedding, untied head): choices under byte budgets only (bits per weight
    # count the decoder linears); otherwise stored in the float dtype, `table_float_bytes` each
    tables: tuple[LayerSizes, ...] = ()
    table_float_bytes: tuple[int, ...] = ()
    layout: object = ARTIFACT        # ArtifactLayout or GGUFLayout

    def items(self, budget: "Budget") -> tuple[LayerSizes, ...]:
        """What the knapsack chooses for: the linears, and the tables when the budget is a file size."""
        return self.layers + (self.tables if budget.kind == "bytes" else ())

    def reachable_bits(self) -> tuple[int, int]:
        return sum(min(l.bits) for l in self.layers), sum(max(l.bits) for l in self.layers)

    def reachable_bytes(self) -> tuple[int, int]:
        items = self.layers + self.tables
        return (self.fixed_file_bytes + sum(min(l.file_bytes) for l in items),
                self.fixed_file_bytes + sum(max(l.file_bytes) for l in items))


def size_table(model, arch: Architecture, candidates: tuple[Candidate, ...], float_dtype: str = "float16",
               layout=None) -> SizeTable:
    """Sizes from shapes alone, counted the way the output file stores the model: `layout` is
    `ARTIFACT` (the packed artifact, default) or a `GGUFLayout` (the GGUF exported from it); see
    each for how exact its file sizes are. Stored bits per weight are exact either way.
    """
    from .artifact import unique_state

    layout = file_layout(layout)
    if float_dtype not in _FLOAT_ST:
        raise SizewiseError(f"float dtype must be one of {sorted(_FLOAT_ST)}, got {float_dtype!r}")
    # the artifact stores every unquantized weight in one float dtype, so a float candidate must use it
    if any(c.method == "float" and c.format.dtype != float_dtype for c in candidates):
        raise SizewiseError(f"a float candidate must be stored as the model's float dtype ({float_dtype})")
    layout.check(candidates)
    state, _ = unique_state(model)
    refs = arch.all_linears()
    linear = {r.weight_name for r in refs}
    per_layer = []
    for r in refs:
        opts = [i for i, c in enumerate(candidates) if c.fits(r.shape[1])]
        if not opts:
            raise SizewiseError(f"no candidate fits {r.name} (input size {r.shape[1]}); add per-channel or float")
        per_layer.append((r, opts, [layout.rows(r.weight_name, candidates[i], r.shape, tuple(state[r.weight_name].shape))
                                    for i in opts]))
    per_table = []
    as_float = Candidate("float", FloatFormat(float_dtype))
    for name, shape in arch.tables.items():
        opts = [i for i, c in enumerate(candidates) if _table_takes(arch, name, c)]
        per_table.append((name, shape, opts, [layout.rows(name, candidates[i], shape, shape) for i in opts]
                          + [layout.rows(name, as_float, shape, shape)]))          # last: stored float
    others = [row for name, t in state.items() if name not in linear and name not in arch.tables
              for row in layout.other_rows(name, t, float_dtype)]
    fixed, per = layout.measure(others, [opt_rows for *_, opt_rows in per_layer] + [g for *_, g in per_table])
    layers = tuple(LayerSizes(r.weight_name, r.shape, tuple(opts),
                              tuple(candidates[i].format.stored_bits(*r.shape) for i in opts), tuple(b))
                   for (r, opts, _), b in zip(per_layer, per))
    per_tables = per[len(per_layer):]
    tables = tuple(LayerSizes(name, shape, tuple(opts), tuple(candidates[i].format.stored_bits(*shape) for i in opts),
                              tuple(b[:-1])) for (name, shape, opts, _), b in zip(per_table, per_tables))
    return SizeTable(tuple(candidates), layers, sum(r.shape[0] * r.shape[1] for r in refs), fixed, float_dtype,
                     tables, tuple(b[-1] for b in per_tables), layout)


def _data_free(c: Candidate) -> bool:
    return c.method == "float" or not methods.get(c.method).needs_calibration


def _table_takes(arch: Architecture, name: str, c: Candidate) -> bool:
    """Whether token table `name` may be quantized with candidate `c` (float is always its fallback):
    an input embedding only data-free, the head (or the embedding tied to it) also calibrated, from
    the statistics of its input, the final hidden states (`engine.head_statistics`)."""
    return c.method != "float" and c.fits(arch.tables[name][1]) and (_data_free(c) or name == arch.head_table)


# --- budgets --------------------------------------------------------------------------------------

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Budget:
    """"3.5bpw": average stored bits per weight over the decoder linears (scales and zeros included).
    "70MB": the whole output file, as the size table's layout counts it: the packed artifact file,
    or the GGUF file (MB = 10⁶ bytes; MiB = 2²⁰; also kB, GB, KiB, GiB, B)."""

    text: str
    kind: str                 # "bpw" or "bytes"
    value: Fraction           # bits per weight, or bytes
    unit: str = ""            # the unit as written, for messages

    def capacity(self, sizes: SizeTable) -> int:
        """The knapsack capacity, exactly: linear bits for bpw, linear-layer file bytes for files."""
        if self.kind == "bpw":
            return math.floor(self.value * sizes.linear_params)
        return math.floor(self.value) - sizes.fixed_file_bytes

    def weights(self, layer: LayerSizes) -> tuple[int, ...]:
        return layer.bits if self.kind == "bpw" else layer.file_bytes

    def describe(self) -> str:
        return f"{float(self.value):g} bits/weight" if self.kind == "bpw" else f"{self.text} ({int(self.value):,} bytes)"


def parse_budget(text: str | Budget) -> Budget:
    """'3.5bpw', '3.25 bpw', '70MB', '70 MiB', '1.2GB', '123456789B'."""
    if isinstance(text, Budget):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]+)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or (unit not in _UNITS and unit != "bpw"):
        raise SizewiseError(f"budget {text!r} is not understood; write bits per weight (3.5bpw) or a file size "
                            "(70MB = 70·10⁶ bytes, 70MiB = 70·2²⁰ bytes; also kB, GB, KiB, GiB)")
    value = Fraction(m.group(1))    # exact: '3.1bpw' is 31/10, never a binary approximation
    if value <= 0:
        raise SizewiseError(f"budget {text!r} must be positive")
    if unit == "bpw":
        return Budget(str(text).strip(), "bpw", value, "bpw")
    return Budget(str(text).strip(), "bytes", value * _UNITS[unit], m.group(2))


def _show_range(budget: Budget, sizes: SizeTable) -> str:
    """The reachable range in the budget's own unit, rounded inwards so both ends are reachable."""
    def inwards(lo: Fraction, hi: Fraction) -> tuple[str, str]:
        d = max(2, 3 - math.floor(math.log10(float(hi))))          # at least 4 significant digits
        return f"{math.ceil(lo * 10**d) / 10**d:.{d}f}", f"{math.floor(hi * 10**d) / 10**d:.{d}f}"

    if budget.kind == "bpw":
        lo, hi = sizes.reachable_bits()
        a, b = inwards(Fraction(lo, sizes.linear_params), Fraction(hi, sizes.linear_params))
        return f"{a} to {b} bits/weight"
    lo, hi = sizes.reachable_bytes()
    unit = budget.unit if budget.unit.lower() in _UNITS and budget.unit.lower() != "b" else "MB"  # bytes: in full after
    a, b = inwards(Fraction(lo, _UNITS[unit.lower()]), Fraction(hi, _UNITS[unit.lower()]))
    return f"{a} {unit} to {b} {unit} ({lo:,} to {hi:,} bytes)"


def check_budget(budget: Budget | str, sizes: SizeTable) -> int:
    """The knapsack capacity, or a one-line error naming the reachable range."""
    budget = parse_budget(budget)
    cap = budget.capacity(sizes)
    if budget.kind == "bpw":
        (lo, hi), exact = sizes.reachable_bits(), budget.value * sizes.linear_params
        what = "bits per weight over the decoder linears"
    else:
        (lo, hi), exact = sizes.reachable_bytes(), budget.value
        what = f"{sizes.layout.noun} size"
        lo, hi = lo - sizes.fixed_file_bytes, hi - sizes.fixed_file_bytes
        exact -= sizes.fixed_file_bytes
    if cap < lo:
        raise SizewiseError(f"budget {budget.text} is below the smallest reachable {what} with these candidates; "
                            f"reachable: {_show_range(budget, sizes)}")
    if exact > hi:
        raise SizewiseError(f"budget {budget.text} is above the largest reachable {what} with these candidates "
                            f"(everything at its largest option); reachable: {_show_range(budget, sizes)}")
    return cap


# --- sensitivity profiling ------------------------------------------------------------------------


@dataclass
class LayerProfile:
    name: str                        # weight name
    shape: tuple[int, int]
    importance: float                # mean over output channels of the diagonal Fisher f_j
    costs: list[float | None]        # predicted KL (nats/token) per candidate; None where it does not fit
    errors: list[float | None]       # Σ_j e_j: mean squared layer-output error per token, per candidate
    kind: str = "linear"             # or "table": costs then measured directly (KL with only this table changed)
    rounding: dict = field(default_factory=dict)   # llama.cpp input rounding kind -> its cost, included in costs


@dataclass
class Profile:
    candidates: tuple[Candidate, ...]
    layers: list[LayerProfile]
    protocol: dict = field(default_factory=dict)

    def __post_init__(self):
        self.by_name = {l.name: l for l in self.layers}
        self.stats = None          # linear name -> engine.LinearStats when profiled with keep_stats; not saved

    def to_json(self) -> str:
        return json.dumps({"profile_version": PROFILE_VERSION, "protocol": self.protocol,
                           "candidates": [c.to_dict() for c in self.candidates],
                           "layers": [{"name": l.name, "shape": list(l.shape), "importance": l.importance,
                                       "costs": l.costs, "errors": l.errors, "kind": l.kind, "rounding": l.rounding}
                                      for l in self.layers]})

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        d = json.loads(text)
        if d.get("profile_version") != PROFILE_VERSION:
            raise SizewiseError("the sensitivity profile was made by another sizewise version; profile again")
        return cls(tuple(Candidate.from_dict(c) for c in d["candidates"]),
                   [LayerProfile(l["name"], tuple(l["shape"]), l["importance"], l["costs"], l["errors"], l["kind"],
                                 l["rounding"]) for l in d["layers"]], d["protocol"])


def fisher_diagonal(model, arch: Architecture, samples: torch.Tensor, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per decoder linear, f_j = mean over tokens of (∂ℓ/∂y_j)², labels drawn from the model's own predictions.

    One forward and one backward pass per sample; no parameter gradients are computed.
    """
    refs = arch.all_linears()
    acc = {r.name: torch.zeros(r.shape[0], dtype=torch.float64) for r in refs}
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}

    def watch(name):
        def accumulate(g):      # returns None: the gradient itself is left alone
            acc[name].add_(g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu())

        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(accumulate)
        return hook

    # gradients flow from the embedding output: parameters stay frozen
    handles = [model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))]
    handles += [r.module.register_forward_hook(watch(r.name)) for r in refs]
    tokens = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for ids in samples:
                logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0].float()
                probs = logits.detach().softmax(-1).cpu()
                labels = torch.multinomial(probs, 1, generator=gen)[:, 0].to(device)
                F.cross_entropy(logits, labels, reduction="sum").backward()
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    return {name: (a / max(tokens, 1)).float() for name, a in acc.items()}


def profile_model(model, arch: Architecture, samples: torch.Tensor, candidates: tuple[Candidate, ...], *,
                  options: dict | None = None, fisher_samples: int = 8, seed: int = 0, batch: int = 8,
                  compute_dtype: torch.dtype = torch.float32, offload: Path | None = None,
                  progress: bool = True, keep_stats: bool = False, table_samples: int = 4,
                  tables: bool = True, arithmetic: str | None = None) -> Profile:
    """Predicted KL of every candidate on every decoder linear: one Fisher pass, one engine pass;
    with `tables`, for the token tables (embedding, untied head), the KL measured on
    `table_samples` samples (only byte budgets choose for tables; `add_table_costs` adds them later).
    `arithmetic="llamacpp"`: costs include llama.cpp's rounding of each candidate's inputs (GGUF
    candidates only; see the module docstring).

    The model is left exactly as it was. With `keep_stats` the profile also holds each linear's
    input statistics (`profile.stats`, in memory only), so plans can be solved without another pass.
    """
    if fisher_samples < 1:
        raise SizewiseError(f"the Fisher estimate needs at least 1 sample, got {fisher_samples}")
    t0 = time.perf_counter()
    rounds = _input_roundings(candidates, arithmetic)
    fisher = fisher_diagonal(model, arch, samples[:fisher_samples], seed=seed)
    t_fisher = time.perf_counter() - t0
    layers = []

    def measure(ref, w, stats):
        f = fisher[ref.name].to(w.device)
        h = stats.xtx
        rounding = {k: 0.5 * float((f * ((w @ e) * w).sum(1).clamp_min(0)).sum()) / stats.rounding_count
                    for k, e in stats.rounding.items()}
        costs, errors = [], []
        for cand, kind in zip(candidates, rounds):
            if not cand.fits(ref.shape[1]):
                costs.append(None)
                errors.append(None)
                continue
            dw = _dequantized(cand, w, stats, options) - w
            row = ((dw @ h) * dw).sum(1).clamp_min(0) / stats.count     # e_j, mean (Δy_j)² per token
            errors.append(float(row.sum()))
            costs.append(0.5 * float((f * row).sum()))
        layers.append(LayerProfile(ref.weight_name, ref.shape, float(f.mean()), costs, errors, rounding=rounding))

    stats, facts = engine.statistics(model, arch, samples, batch=batch, offload=offload, progress=progress,
                                     compute_dtype=compute_dtype, measure=measure,
                                     head=tables and _needs_head_stats(arch, candidates),
                                     observers=(*DEFAULT_OBSERVERS, RoundingGram(
                                         tuple(sorted({k for k in rounds if k is not None})), ROUNDING_TOKENS)))
    t1 = time.perf_counter()
    calibration = _calibrate_rounding(model, arch, layers, samples[:table_samples], batch, progress) if arithmetic else {}
    for lp in layers:                       # each candidate pays its own input rounding on top of its weight error
        lp.costs = [None if c is None else c + lp.rounding.get(k, 0.0) for c, k in zip(lp.costs, rounds)]
    protocol = {"proxy": "0.5 * sum_j fisher_j * mean_tokens (dW X^T)_j^2, float-model inputs; token tables: "
                         "measured KL with only that table changed (calibrated ones solved from the head's "
                         f"input on the last {HEAD_SAMPLES} samples)",
                "fisher_samples": min(fisher_samples, len(samples)), "fisher_labels": "sampled from the model",
                "seed": seed, "calibration_tokens": int(samples.numel()), "options": options or {},
                "arithmetic": arithmetic, **({"rounding_tokens": ROUNDING_TOKENS, "rounding_calibration": calibration,
                                              "rounding_calibration_s": time.perf_counter() - t1} if arithmetic else {}),
                "fisher_s": t_fisher, "engine_s": facts["engine_s"], "profile_s": time.perf_counter() - t0}
    prof = Profile(tuple(candidates), layers, protocol)
    if tables:
        add_table_costs(prof, model, arch, samples, batch=batch, table_samples=table_samples, options=options,
                        progress=progress, stats=stats, compute_dtype=compute_dtype)
    prof.protocol["profile_s"] = time.perf_counter() - t0
    if keep_stats:
        prof.stats = stats
    return prof


def _calibrate_rounding(model, arch: Architecture, layers: list, samples: torch.Tensor, batch: int,
                        progress: bool) -> dict:
    """Scale the layers' input-rounding proxies to measurement, per linear role and 8-bit kind.

    The Fisher proxy misjudges rounding noise by role: it overstates v_proj's about 2.5x on SmolLM2
    (attention averages the independent noise of many tokens), and states down_proj's about right.
    So for each role (q_proj, ..., down_proj) and kind, the KL with every such input rounded is
    measured on `samples`, and each layer's proxy is scaled so that the role's sum matches; the
    proxy still says how the role's cost splits over layers. Float16 rounding (~1e-17) is left as is.
    Returns {"ROLE KIND": {"proxy", "measured"}}.
    """
    from .export.ggml_matmul import rounded_inputs

    modules = {r.weight_name: r.module for r in arch.all_linears()}
    groups: dict[tuple[str, str], list] = {}
    for lp in layers:
        for kind in lp.rounding:
            if kind.startswith("q8"):
                groups.setdefault((re.sub(r"\.\d+\.", ".", lp.name), kind), []).append(lp)
    if not groups or not len(samples):
        return {}
    reference = _log_probs(model, samples, batch)
    out = {}
    for (role, kind), lps in tqdm(groups.items(), desc="rounding costs", unit="role", disable=not progress,
                                  file=sys.stderr):
        with rounded_inputs({modules[lp.name]: kind for lp in lps}):
            logp = _log_probs(model, samples, batch)
        kl = max(0.0, sum(float((r.exp() * (r - l)).sum()) for r, l in zip(reference, logp)) / samples.numel())
        proxy = sum(lp.rounding[kind] for lp in lps)
        for lp in lps:
            lp.rounding[kind] *= kl / proxy if proxy > 0 else 1.0
        out[f"{role} {kind}"] = {"proxy": proxy, "measured": kl}
    return out


def _input_roundings(candidates, arithmetic: str | None) -> list[str | None]:
    """Per candidate, the input rounding `arithmetic` applies to its matmuls (None: none)."""
    if arithmetic is None:
        return [None] * len(candidates)
    if arithmetic != "llamacpp":
        raise SizewiseError(f"unknown arithmetic {arithmetic!r}; available: llamacpp")
    from .export.ggml_matmul import input_rounding

    try:
        return [input_rounding(c.format) for c in candidates]
    except ValueError as e:
        raise SizewiseError(f"llama.cpp's arithmetic applies to ggml types only: {e}") from None


def has_table_costs(profile: Profile, arch: Architecture) -> bool:
    return all(profile.by_name.get(n) is not None for n in arch.tables)


def _needs_head_stats(arch: Architecture, candidates) -> bool:
    return arch.head_table is not None and any(_table_takes(arch, arch.head_table, c) and not _data_free(c)
                                               for c in candidates)


def add_table_costs(profile: Profile, model, arch: Architecture, samples: torch.Tensor, *, batch: int = 8,
                    table_samples: int = 4, options: dict | None = None, progress: bool = True,
                    stats: dict | None = None, compute_dtype: torch.dtype = torch.float32) -> None:
    """Measure the token tables' candidates (`_table_costs`) into `profile`, if not there yet, on
    the first `table_samples` calibration samples. The head's statistics come from `stats` or, if
    calibrated candidates need them, a pass over the last ones (`engine.head_statistics`)."""
    if has_table_costs(profile, arch):
        return
    t0 = time.perf_counter()
    if _needs_head_stats(arch, profile.candidates) and arch.head_table not in (stats or {}):
        stats = engine.head_statistics(model, arch, samples, batch=batch, compute_dtype=compute_dtype)
        if profile.stats is not None:         # kept for solving plans: they may now quantize the head
            profile.stats.update(stats)
    profile.layers += _table_costs(model, arch, profile.candidates, samples[:table_samples], batch, options, progress,
                                   stats, profile.protocol.get("arithmetic"))
    profile.by_name = {l.name: l for l in profile.layers}
    profile.protocol.update(table_samples=min(table_samples, len(samples)), tables_s=time.perf_counter() - t0)


def _table_costs(model, arch: Architecture, candidates, samples: torch.Tensor, batch: int, options, progress: bool,
                 stats: dict | None = None, arithmetic: str | None = None):
    """KL(float ‖ model with one token table changed) per candidate the table takes, measured directly.

    A table touches every position (and, tied, every output logit): no layer-local proxy applies,
    and there are only one or two of them, so measuring is affordable and exact. `stats` holds the
    head table's input statistics (`engine.head_statistics`), which calibrated candidates need.
    With `arithmetic`, the head's input is rounded as that arithmetic rounds it for the candidate.
    """
    from .export.ggml_matmul import rounded_inputs

    params = dict(model.named_parameters())
    out = []
    if not arch.tables or not len(samples):
        return out
    stats = stats or {}
    reference = _log_probs(model, samples, batch)

    def takes(name, c):
        return _table_takes(arch, name, c) and (_data_free(c) or name in stats)

    todo = [(n, i) for n in arch.tables for i, c in enumerate(candidates) if takes(n, c)]
    rounds = _input_roundings(candidates, arithmetic)
    head = model.get_output_embeddings()
    bar = tqdm(total=len(todo), desc="token tables", unit="cand", disable=not progress, file=sys.stderr)
    for name, shape in arch.tables.items():
        w = params[name].detach().clone()
        costs: list[float | None] = [None] * len(candidates)
        try:
            for i, cand in enumerate(candidates):
                if cand.method == "float":
                    changed = w.to(TORCH_DTYPES[cand.format.dtype]).float()
                elif takes(name, cand):
                    changed = _dequantized(cand, w, stats.get(name), options)
                    bar.update()
                else:
                    continue
                with torch.no_grad():
                    params[name].copy_(changed)
                with rounded_inputs({head: rounds[i]} if name == arch.head_table else {}):
                    logp = _log_probs(model, samples, batch)
                costs[i] = max(0.0, sum(float((r.exp() * (r - l)).sum()) for r, l in zip(reference, logp)) / samples.numel())
        finally:
            with torch.no_grad():
                params[name].copy_(w)
        out.append(LayerProfile(name, shape, float("nan"), costs, [None] * len(candidates), "table"))
    bar.close()
    return out


# --- exact multiple-choice knapsack ----------------------------------------------------------------
#
# Pick one option per item, Σ weight ≤ capacity (exact integers), least Σ cost (floats). A dynamic
# program over *Pareto states* (Nemhauser–Ullmann) with branch-and-bound pruning, exact without
# discretizing the weight axis. After each item a state is dropped only if
#   - another state is no heavier and no costlier (its best completion is at least as good), or
#   - it cannot fit even with the lightest remaining options, or
#   - a lower bound on its best completion exceeds the cost of a known integral solution. The
#     bound is the LP relaxation of the remaining items (each item's options replaced by their
#     lower convex hull, filled greedily by efficiency); the integral solution is the same greedy
#     fill stopped at the last whole hull step that fits, which is a real choice per item.
# None of these can remove every optimal solution, so the cheapest final state is optimal. The LP
# gap is at most one hull step of one item, which keeps the state count small in practice.
# Pruning is guarded against float rounding by a relative margin far above accumulated error.

_SLACK = 1e-9


@dataclass(frozen=True)
class Solution:
    choice: list[int]     # option index per item, into the caller's lists
    weight: int
    cost: float
    states: int           # most states held at once: the work the exactness cost


def _pareto(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Indices of the points that no other point beats on both weight and cost, by increasing weight."""
    order = np.lexsort((c, w))
    cs = c[order]
    best_before = np.minimum.accumulate(np.concatenate(([np.inf], cs[:-1])))
    return order[cs < best_before]


def _hull_steps(w: np.ndarray, c: np.ndarray) -> list[tuple[int, float]]:
    """(Δweight > 0, Δcost < 0) steps along the lower convex hull of Pareto points (sorted by weight).

    Efficiency -Δcost/Δweight strictly decreases along the hull, so a greedy fill by efficiency
    takes each item's steps in order and every breakpoint is an integral choice.
    """
    pts = [(int(w[0]), float(c[0]))]
    for x, y in zip(w[1:].tolist(), c[1:].tolist()):
        while len(pts) >= 2:
            (x0, y0), (x1, y1) = pts[-2], pts[-1]
            if (y0 - y1) / (x1 - x0) <= (y1 - y) / (x - x1):   # not strictly decreasing: drop the middle
                pts.pop()
            else:
                break
        pts.append((x, y))
    return [(x1 - x0, y1 - y0) for (x0, y0), (x1, y1) in zip(pts, pts[1:])]


def _relaxation(steps: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (extra weight, cost change) of the greedy LP fill over the given hull steps."""
    if not steps:
        return np.zeros(1, dtype=np.int64), np.zeros(1)
    dw = np.array([s[0] for s in steps], dtype=np.int64)
    dc = np.array([s[1] for s in steps], dtype=np.float64)
    order = np.argsort(dc / dw, kind="stable")          # most cost saved per unit weight first
    return np.concatenate(([0], np.cumsum(dw[order]))), np.concatenate(([0.0], np.cumsum(dc[order])))


def solve_mckp(weights: list[list[int]], costs: list[list[float]], capacity: int) -> Solution:
    """Choose one option per item minimizing Σ cost subject to Σ weight ≤ capacity, exactly."""
    if len(weights) != len(costs) or any(len(w) != len(c) or not len(w) for w, c in zip(weights, costs)):
        raise ValueError("every item needs the same, non-zero number of weights and costs")
    items = []
    for w, c in zip(weights, costs):
        w, c = np.asarray(w, dtype=np.int64), np.asarray(c, dtype=np.float64)
        if not np.isfinite(c).all():
            raise ValueError("costs must be finite")
        keep = _pareto(w, c)                              # dominated options are never needed
        items.append((keep, w[keep], c[keep]))
    n = len(items)
    rest_min = np.zeros(n + 1, dtype=np.int64)            # Σ lightest weights of items k..n-1
    rest_base = np.zeros(n + 1)                           # Σ costs of those lightest options
    for k in range(n - 1, -1, -1):
        rest_min[k] = rest_min[k + 1] + items[k][1][0]
        rest_base[k] = rest_base[k + 1] + items[k][2][0]
    if rest_min[0] > capacity:
        raise SizewiseError(f"no choice fits: the lightest options weigh {int(rest_min[0])} > capacity {capacity}")
    steps = [_hull_steps(iw, ic) for _, iw, ic in items]
    relax = [_relaxation([s for item in steps[k:] for s in item]) for k in range(n + 1)]
    slack = _SLACK * (sum(float(np.abs(ic).max()) for _, _, ic in items) + 1e-300)

    def bounds(k, W, C):
        x, y = relax[k]
        extra = capacity - W - rest_min[k]
        lower = C + rest_base[k] + np.interp(extra.astype(np.float64), x.astype(np.float64), y)
        upper = C + rest_base[k] + y[np.searchsorted(x, extra, side="right") - 1]
        return lower, upper

    W, C = np.zeros(1, dtype=np.int64), np.zeros(1)
    best = float(bounds(0, W, C)[1][0])
    trail, peak = [], 1
    for k, (idx, iw, ic) in enumerate(items):
        m = len(iw)
        W2, C2 = (W[:, None] + iw).ravel(), (C[:, None] + ic).ravel()
        parent, option = np.repeat(np.arange(len(W)), m), np.tile(idx, len(W))
        sel = np.flatnonzero(W2 + rest_min[k + 1] <= capacity)
        sel = sel[_pareto(W2[sel], C2[sel])]
        lower, upper = bounds(k + 1, W2[sel], C2[sel])
        best = min(best, float(upper.min()))
        sel = sel[lower <= best + slack]
        W, C = W2[sel], C2[sel]
        trail.append((parent[sel], option[sel]))
        peak = max(peak, len(W))
    s = int(np.lexsort((W, C))[0])
    weight, cost = int(W[s]), float(C[s])
    choice = [0] * n
    for k in range(n - 1, -1, -1):
        parent, option = trail[k]
        choice[k], s = int(option[s]), int(parent[s])
    return Solution(choice, weight, cost, peak)


# --- allocation -----------------------------------------------------------------------------------


@dataclass
class Allocation:
    plan: Plan
    predicted: dict[str, float]        # predicted KL contribution (nats/token) per weight name
    budget: Budget
    capacity: int                      # knapsack capacity (bits, or linear-layer file bytes)
    used: int                          # knapsack weight of the plan, ≤ capacity
    linear_bits: int                   # Σ stored bits over the decoder linears, exact
    linear_params: int
    file_bytes: int                    # output file size (per the layout): artifact upper bound, GGUF exact
    states: int
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)    # (out, in) per weight name
    profile_protocol: dict = field(default_factory=dict)
    note: str = "knapsack"             # how the plan was made
    plan_float_dtype: str = "float16"  # storage of what the plan leaves unquantized
    measured: list[dict] = field(default_factory=list)   # plans measured for this budget, if any
    layout: object = ARTIFACT          # the output file `file_bytes` counts (ArtifactLayout, GGUFLayout)

    @property
    def bits_per_weight(self) -> float:
        return self.linear_bits / self.linear_params

    @property
    def predicted_total(self) -> float:
        return sum(self.predicted.values())

    def summary(self) -> dict:
        return {"budget": self.budget.text, "budget_kind": self.budget.kind, "capacity": self.capacity,
                "used": self.used, "linear_bits": self.linear_bits, "linear_params": self.linear_params,
                "bits_per_weight": self.bits_per_weight, "file_bytes_bound": self.file_bytes,
                "file_layout": self.layout.describe(),
                "predicted_kl": self.predicted_total, "predicted": self.predicted,
                "knapsack_states": self.states, "how": self.note, "measured_plans": self.measured,
                "profile": self.profile_protocol}


def _layer_options(profile: Profile, sizes: SizeTable, budget: Budget, allowed) -> tuple[list, list, list]:
    """Per layer: knapsack weights, predicted costs and option indices of the allowed candidates."""
    weights, costs, opts = [], [], []
    for layer in sizes.items(budget):
        lp = profile.by_name.get(layer.name)
        if lp is None or tuple(lp.shape) != tuple(layer.shape):
            raise SizewiseError(f"the sensitivity profile does not match this model (at {layer.name}); profile again")
        ok = [k for k, i in enumerate(layer.options)
              if lp.costs[i] is not None and (allowed is None or allowed(sizes.candidates[i]))]
        weights.append([budget.weights(layer)[k] for k in ok])
        costs.append([lp.costs[layer.options[k]] for k in ok])
        opts.append(ok)
    return weights, costs, opts


def _allocation(profile: Profile, sizes: SizeTable, budget: Budget, capacity: int, picks: list[int],
                states: int, note: str) -> Allocation:
    """The Allocation for one option index (into item.options) per knapsack item, exact sizes checked.

    Tables outside the knapsack stay float and are left out of the plan (which then keeps them float).
    """
    items = sizes.items(budget)
    choices, predicted, bits, fbytes = [], {}, 0, sizes.fixed_file_bytes
    for item, k in zip(items, picks):
        cand = sizes.candidates[item.options[k]]
        fbytes += item.file_bytes[k]
        predicted[item.name] = profile.by_name[item.name].costs[item.options[k]]
        if item in sizes.tables:
            if cand.method != "float":
                choices.append(_choice(item.name, cand))
            continue
        choices.append(_choice(item.name, cand))
        bits += cand.format.stored_bits(*item.shape)
    used = bits if budget.kind == "bpw" else fbytes - sizes.fixed_file_bytes
    if budget.kind == "bpw":
        fbytes += sum(sizes.table_float_bytes)
    # the guarantee, in exact integers: never over budget
    assert used <= capacity, (used, capacity)
    assert budget.kind != "bpw" or bits <= budget.value * sizes.linear_params
    assert budget.kind != "bytes" or fbytes <= budget.value
    return Allocation(Plan(choices), predicted, budget, capacity, used, bits, sizes.linear_params, fbytes,
                      states, {l.name: l.shape for l in sizes.layers + sizes.tables}, profile.protocol, note,
                      sizes.float_dtype, layout=sizes.layout)


def allocate(profile: Profile, sizes: SizeTable, budget: Budget | str, *, allowed=None,
             note: str = "knapsack") -> Allocation:
    """The plan of least predicted KL whose exact size fits the budget.

    `allowed(candidate) -> bool` restricts the candidates (e.g. none below 3 bits).
    """
    budget = parse_budget(budget)
    if tuple(profile.candidates) != tuple(sizes.candidates):
        raise SizewiseError("the sensitivity profile was made for a different candidate set; profile again")
    if profile.protocol.get("arithmetic") != sizes.layout.arithmetic:
        raise SizewiseError(f"the sensitivity profile prices {profile.protocol.get('arithmetic') or 'float'} "
                            f"arithmetic, a {sizes.layout.noun} runs in {sizes.layout.arithmetic or 'float'}; "
                            "profile again (profile_model(arithmetic=layout.arithmetic))")
    capacity = check_budget(budget, sizes)
    weights, costs, opts = _layer_options(profile, sizes, budget, allowed)
    if any(not w for w in weights):
        raise SizewiseError(f"no allowed candidate fits every layer ({note})")
    sol = solve_mckp(weights, costs, capacity)
    alloc = _allocation(profile, sizes, budget, capacity, [ok[j] for ok, j in zip(opts, sol.choice)],
                        sol.states, note)
    assert alloc.used == sol.weight, (alloc.used, sol.weight)
    return alloc


def uniform_allocations(profile: Profile, sizes: SizeTable, budget: Budget | str) -> list[Allocation]:
    """Every plan that gives all linears the same candidate and fits the budget, best predicted first."""
    budget = parse_budget(budget)
    capacity = check_budget(budget, sizes)
    out = []
    items = sizes.items(budget)
    tables = items[len(sizes.layers):]              # tables in the knapsack (byte budgets) stay float here
    floats = [next((k for k, i in enumerate(t.options) if sizes.candidates[i].method == "float"), None) for t in tables]
    if None in floats:
        return out
    for i, cand in enumerate(sizes.candidates):
        if cand.method == "float" or any(i not in l.options for l in sizes.layers):
            continue
        picks = [l.options.index(i) for l in sizes.layers] + floats
        if sum(budget.weights(l)[k] for l, k in zip(items, picks)) <= capacity:
            out.append(_allocation(profile, sizes, budget, capacity, picks, 1, f"uniform {cand.label}"))
    return sorted(out, key=lambda a: a.predicted_total)


def _quantized_bits(c: Candidate) -> int:
    return 16 if c.method == "float" else c.format.bits


def plan_variants(profile: Profile, sizes: SizeTable, budget: Budget | str) -> list[Allocation]:
    """The plans worth measuring for a budget: the knapsack's, the knapsack's without its lowest
    bit widths (additive costs understate how errors compound when many layers are coarse), and
    the best uniform plan that fits. Duplicates are dropped."""
    budget = parse_budget(budget)
    out = [allocate(profile, sizes, budget)]
    for floor in sorted({_quantized_bits(c) for c in sizes.candidates if c.method != "float"})[1:3]:
        try:
            out.append(allocate(profile, sizes, budget, allowed=lambda c, f=floor: _quantized_bits(c) >= f,
                                note=f"knapsack, no candidate below {floor} bits"))
        except SizewiseError:       # nothing that coarse-free fits this budget
            break
    out += uniform_allocations(profile, sizes, budget)[:1]
    seen, unique = set(), []
    for a in out:
        key = tuple((c.method, c.format) for c in a.plan.choices)
        if key not in seen:
            seen.add(key)
            unique.append(a)
    return unique


def measure_plans(model, arch: Architecture, allocs: list[Allocation], samples: torch.Tensor, *,
                  stats: dict | None = None, options: dict | None = None, batch: int = 8,
                  progress: bool = True, memo: dict | None = None) -> list[float]:
    """Measured KL(float ‖ plan) in nats/token on `samples`, per plan; the model is restored.

    Each plan's weights are solved from `stats` (the float model's input statistics, needed by
    calibrated quantizers) all at once, as the profile predicted them. `memo` (a dict kept by the
    caller, e.g. across the budgets of a sweep) holds solved weights and the float model's
    log-probabilities, which plans and budgets share. A plan sized for a GGUF is measured with
    llama.cpp's input rounding (`export.ggml_matmul`); the reference is the float model as it is.
    """
    from .export.ggml_matmul import rounded_inputs

    memo = {} if memo is None else memo
    refs = {r.weight_name: r for r in arch.all_linears()}
    params = dict(model.named_parameters())
    originals = {n: r.weight() for n, r in refs.items()} | {n: params[n].detach().clone() for n in arch.tables}

    def put(name: str, w: torch.Tensor) -> None:
        if name in refs:
            refs[name].set_weight(w)
        else:
            with torch.no_grad():
                params[name].copy_(w)

    key = ("reference", tuple(samples.shape), hashlib.sha256(samples.numpy().tobytes()).hexdigest())
    if key not in memo:
        memo[key] = _log_probs(model, samples, batch, torch.float32)     # whole plans: KL ≫ float32 rounding
    reference = memo[key]
    kls = []
    bar = tqdm(allocs, desc="measuring plans", unit="plan", disable=not progress, file=sys.stderr)
    try:
        for alloc in bar:
            pkey = ("kl", key, alloc.plan_float_dtype, _arithmetic(alloc),
                    tuple((c.name, c.method, c.format) for c in alloc.plan.choices))
            if pkey in memo:                    # the same plan, measured for another budget
                kls.append(memo[pkey])
                continue
            for n in arch.tables:               # tables the plan does not name stay float
                put(n, originals[n].to(TORCH_DTYPES[alloc.plan_float_dtype]).float())
            rounding = _plan_roundings(model, arch, alloc)
            for c in alloc.plan.choices:
                cand = Candidate(c.method, c.format)
                # linears' statistics are keyed by module name, the head table's by its weight name
                st = stats.get(refs[c.name].name if c.name in refs else c.name) if stats is not None else None
                if st is None and cand.method != "float" and methods.get(cand.method).needs_calibration:
                    raise SizewiseError(f"measuring a {cand.method} plan needs the calibration statistics")
                wkey = ("weight", c.name, cand)
                if wkey not in memo:        # stored solved (uint8 codes), not dense: 4x less memory
                    memo[wkey] = _solved(cand, originals[c.name], st, options)
                put(c.name, _dense(memo[wkey]))
            with rounded_inputs(rounding):
                logp = _log_probs(model, samples, batch, torch.float32)
            kl = sum(float((r.exp() * (r - l)).double().sum()) for r, l in zip(reference, logp))
            kls.append(kl / samples.numel())
            memo[pkey] = kls[-1]
    finally:
        for n, w in originals.items():
            put(n, w)
    return kls


def _arithmetic(alloc: Allocation) -> str | None:
    return getattr(alloc.layout, "arithmetic", None)


def _plan_roundings(model, arch: Architecture, alloc: Allocation) -> dict:
    """Module -> the input rounding the plan's file gets from its runtime (empty for our own artifact)."""
    from .export.ggml_matmul import input_rounding, module_roundings

    arithmetic = _arithmetic(alloc)
    if arithmetic is None:
        return {}
    _input_roundings([], arithmetic)                 # a known arithmetic
    chosen = {c.name: c.format for c in alloc.plan.choices}
    float_format = FloatFormat(alloc.plan_float_dtype)
    return module_roundings(model, arch, lambda n: input_rounding(chosen.get(n, float_format)))


def solved_weights(memo: dict) -> dict:
    """(weight name, method, format) -> QuantizedTensor, from a `measure_plans` memo: the weights
    its plans were measured with, which `api.compress(..., stats=..., solved=...)` then reuses."""
    return {(k[1], k[2].method, k[2].format): v for k, v in memo.items()
            if isinstance(k, tuple) and k[0] == "weight" and not isinstance(v, torch.Tensor)}


def render(alloc: Allocation) -> str:
    """The plan as a table: layer, method, bits, group, bits/weight, predicted KL; then the totals."""
    rows = [f"{'layer':52} {'method':7} {'bits':>4} {'group':>7} {'bits/w':>7} {'pred. KL':>10}"]
    mix: dict[str, int] = {}
    for c in alloc.plan.choices:
        fmt, (out, inp) = c.format, alloc.shapes[c.name]
        name = c.name.removesuffix(".weight")
        if isinstance(fmt, FloatFormat):
            bits, group, kind = DTYPE_BITS[fmt.dtype], "-", fmt.dtype
        elif isinstance(fmt, KQuantFormat):     # sub-blocks of a 256-weight super-block
            bits, group, kind = fmt.bits, f"{fmt.sub_size}/256", f"{c.method} {label(fmt)}"
        elif isinstance(fmt, CodebookFormat):
            bits, group, kind = fmt.bits, "32", f"{c.method} {label(fmt)}"
        else:
            bits, group = fmt.bits, "channel" if fmt.group_size is None else str(fmt.group_size)
            kind = f"{c.method} {label(fmt)}"
        mix[kind] = mix.get(kind, 0) + 1
        rows.append(f"{name[-52:]:52} {c.method:7} {bits:>4} {group:>7} {fmt.stored_bits(out, inp) / (out * inp):7.3f} "
                    f"{alloc.predicted[c.name]:10.3e}")
    for name in alloc.shapes:           # every linear is in the plan: the rest are token tables left in float
        if name not in alloc.plan.by_name:
            note = "(outside bits/weight)" if alloc.budget.kind == "bpw" else ""
            rows.append(f"{name.removesuffix('.weight')[-52:]:52} {'float':7} {DTYPE_BITS[alloc.plan_float_dtype]:>4} "
                        f"{'-':>7} {DTYPE_BITS[alloc.plan_float_dtype]:7.3f} {alloc.predicted.get(name, 0.0):10.3e} {note}")
    rows.append("mix: " + ", ".join(f"{v} x {k}" for k, v in sorted(mix.items(), key=lambda kv: -kv[1])))
    rows.append(f"total: {alloc.bits_per_weight:.4f} bits/weight over {alloc.linear_params / 1e6:.2f}M linear weights; "
                f"{alloc.layout.noun} at most {alloc.file_bytes / 1e6:.2f} MB; budget {alloc.budget.describe()}; "
                f"predicted KL {alloc.predicted_total:.4g} nats/token")
    return "\n".join(rows)


# --- validating the proxy -------------------------------------------------------------------------


def spearman(a, b) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):                      # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den else float("nan")


def proxy_pairs(profile: Profile, count: int = 12, seed: int = 0, candidate: int | None = None) -> list[tuple[str, int]]:
    """Single-layer changes to test: distinct random layers, each with a random quantized candidate
    (or always `candidate`, an index into profile.candidates, to test the ranking across layers)."""
    rng = np.random.default_rng(seed)
    linears = [l for l in profile.layers if l.kind == "linear"]
    layers = [linears[i] for i in rng.permutation(len(linears))]
    pairs = []
    for lp in layers:
        ok = [i for i, c in enumerate(profile.candidates) if c.method != "float" and lp.costs[i] is not None]
        if candidate is not None:
            ok = [i for i in ok if i == candidate]
        if ok:
            pairs.append((lp.name, int(rng.choice(ok))))
        if len(pairs) == count:
            break
    return pairs


@torch.no_grad()
def _log_probs(model, samples: torch.Tensor, batch: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    # float64 by default: single-layer changes at 8 bits move the KL by ~1e-8, below float32 rounding
    return [F.log_softmax(model(input_ids=samples[s:s + batch].to(device), use_cache=False).logits.to(dtype), -1).cpu()
            for s in range(0, len(samples), batch)]


def validate_proxy(model, arch: Architecture, profile: Profile, samples: torch.Tensor, *,
                   pairs: list[tuple[str, int]] | None = None, count: int = 12, seed: int = 0,
                   options: dict | None = None, batch: int = 8) -> dict:
    """Measured KL(float ‖ model with one layer changed) vs the profile's prediction, per pair.

    Returns {"spearman": ρ, "pairs": [...], "median_ratio": measured/predicted}. The model is restored.
    """
    pairs = pairs if pairs is not None else proxy_pairs(profile, count, seed)
    if len(pairs) < 2:
        raise SizewiseError("validating the proxy needs at least 2 single-layer changes")
    refs = {r.weight_name: r for r in arch.all_linears()}
    need = {n for n, i in pairs if profile.candidates[i].method != "float"
            and methods.get(profile.candidates[i].method).needs_calibration}
    stats = {}
    if need:     # statistics of the float model's inputs, as profiled, for the layers that use them
        hooks = []
        for n in need:
            stats[n] = engine.LinearStats.empty(refs[n].shape[1], next(model.parameters()).device)
            hooks.append(refs[n].module.register_forward_pre_hook(lambda m, a, s=stats[n]: s.add(a[0])))
        try:
            _log_probs(model, samples, batch)
        finally:
            for h in hooks:
                h.remove()
    reference = _log_probs(model, samples, batch)
    rows = []
    for name, i in pairs:
        ref, cand = refs[name], profile.candidates[i]
        w = ref.weight()
        ref.set_weight(_dequantized(cand, w, stats.get(name), options))
        try:
            logp = _log_probs(model, samples, batch)
        finally:
            ref.set_weight(w)
        kl = sum(float((r.exp() * (r - l)).sum()) for r, l in zip(reference, logp)) / samples.numel()
        rows.append({"layer": name, "candidate": cand.label, "predicted": profile.by_name[name].costs[i], "measured": kl})
    pred, meas = [r["predicted"] for r in rows], [r["measured"] for r in rows]
    ratios = [m / p for p, m in zip(pred, meas) if p > 0]
    return {"spearman": spearman(pred, meas), "pairs": rows,
            "median_ratio": float(np.median(ratios)) if ratios else float("nan"), "tokens": int(samples.numel())}


# --- entry points (the CLI and api call these) -----------------------------------------------------


def _profile_key(src_info: dict, calib, text_sha: str | None, candidates, options, fisher_samples: int,
                 arithmetic: str | None) -> str:
    d = {"v": PROFILE_VERSION, "model": src_info.get("sha256"), "text": text_sha, "samples": calib.samples,
         "length": calib.length, "seed": calib.seed, "dtype": calib.dtype, "fisher_samples": fisher_samples,
         "options": options or {}, "candidates": [c.to_dict() for c in candidates], "arithmetic": arithmetic}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:32]


def cached_profile(src, arch: Architecture, calib, candidates: tuple[Candidate, ...], *, options: dict | None = None,
                   fisher_samples: int = 8, cache: bool = True, progress: bool = True,
                   keep_stats: bool = False, tables: bool = True, arithmetic: str | None = None) -> Profile:
    """`profile_model` on the source's calibration samples, cached per model + calibration + candidates
    (+ the arithmetic whose input rounding the costs include: the layout's, e.g. llama.cpp's for a GGUF).

    The cache (under `builtins.cache_dir()/profiles`) lets a sweep over budgets profile once. A
    profile read from the cache has no statistics (`profile.stats` is None) even with `keep_stats`.
    `tables`: also measure the token tables' candidates (byte budgets need them; measured once,
    when first asked for, and added to the cached profile).
    """
    from . import data
    from .api import _calibration

    text_sha = data.read_text(calib.text).sha256 if calib.text is not None else None
    key = _profile_key(src.info, calib, text_sha, candidates, options, fisher_samples, arithmetic)
    path = builtins.cache_dir() / "profiles" / f"{key}.json"
    prof = None
    if cache and src.info.get("sha256") and path.is_file():
        try:
            prof = Profile.from_json(path.read_text())
        except (SizewiseError, json.JSONDecodeError, KeyError):
            pass                                  # stale or damaged: profile again
        if prof is not None and (not tables or has_table_costs(prof, arch)):
            return prof
    samples, calib_proto = _calibration(src, calib, progress)
    if prof is not None:                          # cached, but without the tables this budget needs
        add_table_costs(prof, src.model, arch, samples, batch=calib.batch, options=options, progress=progress,
                        compute_dtype=TORCH_DTYPES[calib.dtype])
    else:
        prof = profile_model(src.model, arch, samples, candidates, options=options, fisher_samples=fisher_samples,
                             seed=calib.seed, batch=calib.batch, compute_dtype=TORCH_DTYPES[calib.dtype],
                             offload=Path(calib.offload) if calib.offload else None, progress=progress,
                             keep_stats=keep_stats, tables=tables, arithmetic=arithmetic)
        prof.protocol.update(model=src.info.get("spec"), model_sha256=src.info.get("sha256"),
                             calibration=calib_proto)
    if cache and src.info.get("sha256"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(prof.to_json())
        tmp.replace(path)
    return prof


def profile_statistics(src, arch: Architecture, calib, profile: Profile, progress: bool = True) -> dict | None:
    """The linears' input statistics the profile was made from (and the head's, if calibrated
    candidates may quantize it): kept ones, or one float pass again.

    None when no candidate needs calibration data.
    """
    from .api import _calibration

    if not any(c.method != "float" and methods.get(c.method).needs_calibration for c in profile.candidates):
        return None
    if profile.stats is None:
        samples, _ = _calibration(src, calib, progress)
        profile.stats, _ = engine.statistics(src.model, arch, samples, batch=calib.batch,
                                             offload=Path(calib.offload) if calib.offload else None,
                                             progress=progress, compute_dtype=TORCH_DTYPES[calib.dtype],
                                             head=_needs_head_stats(arch, profile.candidates))
    return profile.stats


def choose_measured(src, arch: Architecture, calib, profile: Profile, sizes: SizeTable, budget: Budget | str, *,
                    options: dict | None = None, samples: int = MEASURE_SAMPLES, progress: bool = True,
                    memo: dict | None = None) -> Allocation:
    """`plan_variants` for the budget, each measured (KL against the float model on `samples`
    held-out calibration samples, drawn with the next seed); the least measured KL wins.

    The knapsack is exact for its additive prediction, but real costs stop adding up when many
    layers are coarse: this keeps the allocation from ever losing to a plan it could have made.
    """
    from .api import _calibration

    allocs = plan_variants(profile, sizes, budget)
    if len(allocs) == 1 or samples < 1:
        return allocs[0]
    stats = profile_statistics(src, arch, calib, profile, progress)
    memo = {} if memo is None else memo
    hkey = ("held-out", calib.text, samples, calib.length, calib.seed + 1)
    if hkey not in memo:
        memo[hkey], _ = _calibration(src, replace(calib, samples=samples, seed=calib.seed + 1), progress)
    held = memo[hkey]
    t0 = time.perf_counter()
    kls = measure_plans(src.model, arch, allocs, held, stats=stats, options=options, batch=calib.batch,
                        progress=progress, memo=memo)
    best = allocs[int(np.argmin(kls))]
    best.measured = [{"how": a.note, "bits_per_weight": a.bits_per_weight, "predicted_kl": a.predicted_total,
                      "measured_kl": kl, "chosen": a is best} for a, kl in zip(allocs, kls)]
    best.profile_protocol = {**best.profile_protocol, "measure": {
        "samples": samples, "length": calib.length, "seed": calib.seed + 1, "tokens": int(held.numel()),
        "weights": "solved at once from the float model's statistics", "measure_s": time.perf_counter() - t0}}
    return best


def plan_for_budget(model, budget: str | Budget, *, calib=None, quantizers: tuple[str, ...] = ("rtn",),
                    candidates: tuple[Candidate, ...] | None = None, float_dtype: str = "float16",
                    options: dict | None = None, fisher_samples: int = 8, cache: bool = True,
                    measure_samples: int = MEASURE_SAMPLES, progress: bool = True, allow_pickle: bool = False,
                    layout="artifact") -> Allocation:
    """Load MODEL (a spec or `Source`), check the budget from shapes alone, profile (cached), allocate.

    With `measure_samples` > 0 the knapsack's plan is checked against a few alternatives by
    measurement (`choose_measured`); 0 trusts the prediction alone. `layout`: the output file a byte
    budget bounds, "artifact" (the packed file) or "gguf" (the GGUF exported from it; the candidates
    must then be ggml types, by default `gguf_candidate_set(quantizers)`), or a layout object.
    """
    from .api import CalibConfig, _source

    budget = parse_budget(budget)                       # a typo fails before anything loads
    src = _source(model, allow_pickle)
    arch = discover(src.model)
    layout = file_layout(layout, src)
    cands = candidates or (gguf_candidate_set(quantizers, float_dtype) if layout.kind == "gguf"
                           else candidate_set(quantizers, float_dtype=float_dtype))
    sizes = size_table(src.model, arch, cands, float_dtype, layout)
    check_budget(budget, sizes)                         # before any expensive work
    calib = (calib or CalibConfig()).resolved(next(src.model.parameters()).device)
    prof = cached_profile(src, arch, calib, cands, options=options, fisher_samples=fisher_samples, cache=cache,
                          progress=progress, keep_stats=measure_samples > 0, tables=budget.kind == "bytes",
                          arithmetic=layout.arithmetic)
    if measure_samples > 0:
        return choose_measured(src, arch, calib, prof, sizes, budget, options=options, samples=measure_samples,
                               progress=progress)
    return allocate(prof, sizes, budget)


def compress_to_budget(model, budget: str | Budget, out: str | Path | None = None, config=None, *,
                       quantizers: tuple[str, ...] = ("rtn",), candidates: tuple[Candidate, ...] | None = None,
                       fisher_samples: int = 8, cache: bool = True, overwrite: bool = False,
                       measure_samples: int = MEASURE_SAMPLES, progress: bool = True, allow_pickle: bool = False,
                       layout="artifact", gguf: str | Path | None = None):
    """Allocate for the budget, then `api.compress` with that plan. Returns (Result, Allocation).

    The artifact's manifest gets an "allocation" entry (budget, predicted KL per layer, profile protocol).
    With `layout="gguf"` a byte budget bounds the GGUF file, which `gguf` names (the artifact `out`
    is then exported to it and its size checked; see `compress_allocation`).
    """
    from . import api, artifact

    config = config or api.CompressConfig()
    budget = parse_budget(budget)
    if out is not None:
        artifact.check_output(Path(out), overwrite)
    src = api._source(model, allow_pickle)
    alloc = plan_for_budget(src, budget, calib=config.calib, quantizers=quantizers, candidates=candidates,
                            float_dtype=config.float_dtype, options=config.options, fisher_samples=fisher_samples,
                            cache=cache, measure_samples=measure_samples, progress=progress, layout=layout)
    return compress_allocation(src, alloc, out, config, overwrite=overwrite, progress=progress, gguf=gguf), alloc


def compress_allocation(model, alloc: Allocation, out: str | Path | None = None, config=None, *,
                        overwrite: bool = False, progress: bool = True, allow_pickle: bool = False,
                        stats: dict | None = None, solved: dict | None = None, gguf: str | Path | None = None):
    """`api.compress` with the allocation's plan; the manifest records the allocation, sizes checked.

    Separate from `compress_to_budget` so that a sweep allocates many budgets from one profile
    (and, with the profile's `stats`, solves each plan without calibration passes).

    For an allocation sized as a GGUF (`alloc.layout` a `GGUFLayout`), `gguf` names the file: the
    artifact `out` is exported to it with the metadata the layout counted, and the file's size is
    checked against the allocation's (`res.exported`: the export's path, bytes and tensor types).
    """
    from . import api, artifact

    config = config or api.CompressConfig()
    is_gguf = alloc.layout.kind == "gguf"
    if gguf is not None and (not is_gguf or out is None):
        raise SizewiseError("writing a GGUF needs an allocation sized as one (layout='gguf') and an artifact "
                            "directory to export from")
    res = api.compress(api._source(model, allow_pickle), replace(config, plan=alloc.plan), out,
                       overwrite=overwrite, progress=progress, stats=stats, solved=solved)
    res.manifest["allocation"] = alloc.summary()
    if out is not None:
        t = res.manifest["totals"]
        if t["linear_stored_bits"] != alloc.linear_bits or (not is_gguf and t["file_bytes"] > alloc.file_bytes):
            raise SizewiseError(f"internal error: the artifact's size ({t['linear_stored_bits']} bits, "
                                f"{t['file_bytes']} bytes) differs from the allocation's; please report this")
        path = Path(out) / artifact.MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res.manifest, indent=1))
        tmp.replace(path)
    if gguf is not None:
        res.exported = alloc.layout.write(out, gguf, overwrite=overwrite)
        size = res.exported["bytes"]
        if size > alloc.file_bytes or (alloc.budget.kind == "bytes" and size > alloc.budget.value):
            Path(gguf).unlink(missing_ok=True)
            raise SizewiseError(f"internal error: the GGUF file {gguf} has {size:,} bytes, more than the "
                                f"{alloc.file_bytes:,} allocated for budget {alloc.budget.describe()}; please report this")
    return res
