"""Exact sizes, from shapes alone: what each candidate adds to the output file, per layer.

A file layout says how the output file stores a choice (`rows`, `other_rows`) and what the file
around them costs (`measure`). `ArtifactLayout` (here) counts the packed artifact; the GGUF that
the artifact exports to is counted by `export.gguf_layout.GGUFLayout`, which callers above the
allocator build from a model's source and pass in as `layout`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..arch import Architecture
from ..errors import SizewiseError
from ..quant.formats import DTYPE_BITS, FloatFormat
from .candidates import Candidate, _table_takes

# safetensors' dtype names: header entries are sized exactly, up to the offsets' digit counts
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL"}
_FLOAT_ST = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "uint8": "U8"}


def _tensors(name: str, cand: Candidate, shape: tuple[int, int], state_shape: tuple[int, ...]):
    """(tensor name, safetensors dtype, shape, bytes) of what the artifact stores for this choice: its
    format's parts (`Format.parts`), a float weight in the state dict's own shape."""
    return [(p.key(name), _FLOAT_ST[p.stored_dtype], state_shape if not p.suffix else p.stored_shape, p.nbytes)
            for p in cand.format.parts(*shape)]


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
        from ..artifact import FORMAT_NAME

        most = sum(r[3] for r in others) + sum(max(sum(r[3] for r in opt) for opt in g) for g in groups)
        digits = len(str(most))
        entries = lambda rows: sum(_entry_bytes(n, d, s, digits) + b for n, d, s, b in rows)     # noqa: E731
        prefix = len(json.dumps({"__metadata__": {"format": FORMAT_NAME}}, separators=(",", ":")))
        return 8 + prefix + 7 + entries(others), [[entries(opt) for opt in g] for g in groups]

    def describe(self) -> dict:
        return {"kind": self.kind}


ARTIFACT = ArtifactLayout()


def file_layout(layout):
    """"artifact" (or None) as `ARTIFACT`, or a layout object as it is. A GGUF layout needs the
    model's source: build it above the allocator (`export.gguf_layout.GGUFLayout.for_source`, or
    `api.budget.file_layout("gguf", src)`) and pass the object."""
    if layout is None or layout == "artifact":
        return ARTIFACT
    if layout == "gguf":
        raise SizewiseError("a GGUF layout needs the model's source (config and tokenizer)")
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
    layout: object = ARTIFACT        # ArtifactLayout or export.gguf_layout.GGUFLayout

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
    from ..artifact import unique_state

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
