"""The format protocol: what is stored for a compressed weight, exactly, and how it turns back into one.

A format is a small frozen dataclass that owns its bits: `stored_bits` (every bit it stores, never
an estimate), the named tensors it is stored as (`parts`), encoding a solved weight to those tensors
and back (`to_parts` / `from_parts`), its ggml type and block bytes where GGUF has one, and its
data-free rounding and fixed grid for quantizers (`round`, `round_mse`, `fixed_grid`). Everything
outside `quant/` (artifact, lossless packing, file sizes, export) goes through these methods and
never asks which class a format is. The registry (`quant.registry`) maps a JSON kind to its class.

What a format produces when a weight is solved is its *stored tensor* (`QuantizedTensor`,
`KQuantTensor`, `CodebookTensor`; a plain float tensor for `FloatFormat`): it has `.fmt`, `.shape`,
`.stored_bits()` and `.dequantize()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..errors import SizewiseError

DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class Part:
    """One named tensor a format is stored as: `{weight name}:{suffix}` in an artifact (the weight's
    own name when the suffix is empty).

    code_bits: the part holds integer codes below 2^code_bits (uint8, one per value); an artifact
    bit-packs them (`quant.pack`), the lossless coder entropy-codes them. Otherwise the part is
    stored as a tensor of `dtype` ("float16", "uint8", ...) and `shape`, byte for byte.
    """

    suffix: str
    shape: tuple[int, ...]
    dtype: str
    code_bits: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of the part as an artifact stores it (codes bit-packed, nothing else padded)."""
        if self.code_bits is not None:
            return (self.numel * self.code_bits + 7) // 8
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    @property
    def bits_per_value(self) -> int:
        """Bits each value takes as stored (bit-packed codes: their width)."""
        if self.code_bits is not None:
            return self.code_bits
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size() * 8

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return (self.nbytes,) if self.code_bits is not None else self.shape

    @property
    def stored_dtype(self) -> str:
        return "uint8" if self.code_bits is not None else self.dtype

    def key(self, name: str) -> str:
        return f"{name}:{self.suffix}" if self.suffix else name


@dataclass
class FixedGrid:
    """A grid fixed before any weight is rounded, per weight [out, in], for column-wise quantizers
    (GPTQ): `encode(x, scale, zero)` → codes, `decode(codes, scale, zero)` → values (elementwise,
    scale/zero broadcast), `wrap(codes)` → the format's stored tensor."""

    scale: torch.Tensor
    zero: torch.Tensor | None
    encode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    decode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    wrap: Callable[[torch.Tensor], Any]


@dataclass
class IntGrid:
    """A stored weight as a signed integer grid, the way compressed-tensors (llm-compressor) stores
    one: weight = scales * (codes - zero_points) per group of `group_size` input columns (None: one
    group per row); codes and zero points int8 in [-2^(b-1), 2^(b-1)); no zero points if symmetric."""

    bits: int
    group_size: int | None
    codes: torch.Tensor                  # int8 [out, in]
    scales: torch.Tensor                 # [out, groups], in the format's scale dtype
    zero_points: torch.Tensor | None     # int8 [out, groups]


class Format:
    """The protocol every stored format implements (see the module docstring)."""

    kind: ClassVar[str]
    quantized: ClassVar[bool] = True
    # solving reads the inputs' statistics when the run has them, whatever the method (a low-rank
    # correction is whitened by them); without them it is data-free (`methods.calibrates`)
    reads_statistics: ClassVar[bool] = False

    def check(self, in_features: int, name: str = "layer") -> None:
        """Raise a one-line error if this format cannot store rows of `in_features` weights."""
        raise NotImplementedError

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """Every bit stored for one [out, in] weight."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. 'int4 g64 asym', 'Q4_K' or 'float16'."""
        raise NotImplementedError

    @property
    def compression(self) -> str:
        """Which kind of compression this is, for reports: "float", "quant", "sparse", "low-rank"
        (factors alone, or correcting a quantized base) or "sparse+low-rank"."""
        return "quant" if self.quantized else "float"

    @property
    def group_label(self) -> str:
        """How many weights share a scale, for tables: '64', 'channel', '16/256' (sub-blocks of a
        super-block), '-' (none)."""
        raise NotImplementedError

    @property
    def ggml_type(self) -> str | None:
        """The ggml type (GGUF) that stores this format exactly, or None if none does."""
        return None

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def ggml_formats(cls) -> tuple["Format", ...]:
        """This kind's formats that are llama.cpp types (quantized ones; floats are written as arrays)."""
        return ()

    # --- what is stored ---------------------------------------------------------------------

    def parts(self, out_features: int, in_features: int) -> tuple[Part, ...]:
        raise NotImplementedError

    def to_parts(self, stored) -> dict[str, torch.Tensor]:
        """suffix -> tensor (codes unpacked, on the CPU) of a solved weight, in `parts` order."""
        raise NotImplementedError

    def from_parts(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]):
        """Inverse of `to_parts`: the stored tensor of an [out, in] weight."""
        raise NotImplementedError

    def ggml_blocks(self, stored) -> np.ndarray:
        """The weight as ggml blocks, uint8 [out, row bytes] (formats with a `ggml_type` only)."""
        raise SizewiseError(f"{self.label} has no exact GGUF type")

    def from_ggml_blocks(self, data: np.ndarray, shape: tuple[int, int]):
        raise SizewiseError(f"{self.label} has no exact GGUF type")

    def int_grid(self, stored) -> IntGrid | None:
        """The weight as a signed integer grid with group scales (and integer zero points), or None
        where this format is not one (k-quants, codebooks, float minimums)."""
        return None

    @property
    def carries_lora(self) -> bool:
        """Whether `lora` can return factors for a tensor of this format (said without reading one)."""
        return False

    def lora(self, stored) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Low-rank factors (A [rank, in], B [out, rank]) that a runtime adds to the weight `ggml_blocks`
        holds (llama.cpp's LoRA adapter: W + B·A), or None: formats that carry a correction say so."""
        return None

    # --- how a method solves it -----------------------------------------------------------------

    def solve(self, solver, w: torch.Tensor, stats):
        """The stored tensor of `w` in this format, `solver(w, fmt)` being the method applied to a plain
        format. Wrappers (a low-rank correction) solve their base with it, then add their own part."""
        return solver(w, self)

    # --- what quantizers call -----------------------------------------------------------------

    def round(self, w: torch.Tensor, importance: torch.Tensor | None = None):
        """Data-free rounding of an [out, in] weight to this format (each fit's own search)."""
        raise NotImplementedError

    def round_mse(self, w: torch.Tensor):
        """Data-free rounding with the best clipping of each group (where the fit does not already search)."""
        return self.round(w)

    def fixed_grid(self, w: torch.Tensor, importance: torch.Tensor | None) -> FixedGrid | None:
        """The grid a column-wise quantizer rounds `w` against, fitted up front with `importance` per
        input channel; None where the quantizer fits the grid itself (uniform groups)."""
        return None


class GGMLBlocks(Format):
    """A format stored as ggml's own blocks (k-quants, codebooks): one part, one row of blocks per output
    channel, exactly the stored bits; a GGUF export copies them."""

    def parts(self, out_features: int, in_features: int) -> tuple[Part, ...]:
        return (Part("ggml", (out_features, self.stored_bits(out_features, in_features) // 8 // out_features),
                     "uint8"),)

    def to_parts(self, stored) -> dict[str, torch.Tensor]:
        return {"ggml": torch.from_numpy(self.ggml_blocks(stored))}

    def from_parts(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]):
        return self.from_ggml_blocks(tensors["ggml"].numpy(), shape)


def dense(stored) -> torch.Tensor:
    """The float32 weight a stored tensor holds (a float format's stored tensor is the weight itself)."""
    return stored.float() if isinstance(stored, torch.Tensor) else stored.dequantize()


class StoredTensor:
    """What the stored tensors share: an [out, in] weight whose codes give its shape."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def stored_bits(self) -> int:
        return self.fmt.stored_bits(*self.shape)


@dataclass(frozen=True)
class FloatFormat(Format):
    """A weight kept in floating point (not quantized); its stored tensor is the float tensor itself."""

    dtype: str = "float16"
    kind: ClassVar[str] = "float"
    quantized: ClassVar[bool] = False

    def __post_init__(self):
        if self.dtype not in DTYPE_BITS:
            raise SizewiseError(f"float dtype must be one of {sorted(DTYPE_BITS)}, got {self.dtype!r}")

    @property
    def bits(self) -> int:
        return DTYPE_BITS[self.dtype]

    @property
    def label(self) -> str:
        return self.dtype

    @property
    def group_label(self) -> str:
        return "-"

    @property
    def ggml_type(self) -> str:
        return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[self.dtype]

    def check(self, in_features: int, name: str = "layer") -> None:
        return None

    def stored_bits(self, out_features: int, in_features: int) -> int:
        return out_features * in_features * DTYPE_BITS[self.dtype]

    def parts(self, out_features: int, in_features: int) -> tuple[Part, ...]:
        return (Part("", (out_features, in_features), self.dtype),)

    def to_parts(self, stored: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"": stored.detach().to(TORCH_DTYPES[self.dtype]).cpu().contiguous()}

    def from_parts(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return tensors[""]

    def round(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        return w.to(TORCH_DTYPES[self.dtype])



_CHECK_SLICE = 1 << 24      # elements per slice of `check_storable`


def check_storable(name: str, t: torch.Tensor, dtype: str | None = None) -> None:
    """Refuse a weight holding NaN or inf, or (with `dtype`) finite values beyond that float dtype's
    range, which it would store as inf, with one line naming the tensor. Refused rather than kept in
    float32: every size and plan counts the chosen dtype's bits, and such a model is broken or needs
    another --float-dtype, which the user should choose knowingly."""
    if not t.is_floating_point():
        return
    flat = t.reshape(-1)
    # in slices: whole-tensor temporaries of an 8B model's embedding would be several GB
    if not all(torch.isfinite(flat[i:i + _CHECK_SLICE]).all() for i in range(0, flat.numel(), _CHECK_SLICE)):
        raise SizewiseError(f"weight {name} holds NaN or infinite values; refusing to compress a broken model")
    if dtype is not None and TORCH_DTYPES[dtype].itemsize < 4:
        big = max((float(flat[i:i + _CHECK_SLICE].abs().max()) for i in range(0, flat.numel(), _CHECK_SLICE)),
                  default=0.0)
        limit = torch.finfo(TORCH_DTYPES[dtype]).max
        if big > limit:
            raise SizewiseError(f"weight {name} holds {big:.4g}, beyond {dtype}'s range ({limit:.4g}); "
                                "use --float-dtype float32 (or bfloat16)")


def stored_as(dtype: str):
    """(name, tensor) -> the tensor in float `dtype`, checked first (`check_storable`): the `convert` of a
    writer that streams tensors (`lazy.StateTensors`). Meta tensors are only cast; non-float ones kept."""
    def convert(name: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        if not t.is_meta:
            check_storable(name, t, dtype)
        return t.to(TORCH_DTYPES[dtype])
    return convert
