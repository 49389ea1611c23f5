"""Low-rank factors as a format: W ≈ base(W) + B·A, or W ≈ B·A alone.

- Compensation (LQER, EoRA): the base format's error R = W − Q(W) is approximated by B·A, the rank-r
  truncated SVD of R *whitened by the inputs*: with XᵀX = S Sᵀ (damped), the output error
  ‖(R − B·A) Xᵀ‖ equals ‖(R − B·A) S‖_F, whose best rank-r minimizer is the SVD of R·S, unwhitened by
  S⁻¹. Without statistics (data-free) it is the plain SVD of R.
- Pure factorization (ASVD/SVD-LLM style, whitened the same way): no base, W ≈ B·A.

Stored as the base's parts, then `lora_a` [rank, in] and `lora_b` [out, rank] in `factor_dtype`
(rank·(in + out) values, counted exactly). GGUF: the base is written as its ggml type and the factors
travel in a LoRA adapter beside it (`Format.lora`; llama.cpp `--lora`); a pure factorization has no
GGUF form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import SizewiseError
from .formats import DTYPE_BITS, TORCH_DTYPES, Format, Part, dense


def whitening(xtx: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, Λ^½) float64 with XᵀX + damping = Q Λ Qᵀ = S Sᵀ, S = Q Λ^½.

    An eigendecomposition, not a Cholesky, because XᵀX summed from half-precision passes can be slightly
    indefinite; negative eigenvalues are clipped, then damped. It depends on XᵀX alone, so linears that
    read one input (q/k/v, gate/up) share it (`LowRankFormat.solve` caches it with their statistics)."""
    h = xtx.detach().double()
    lam, q = torch.linalg.eigh((h + h.t()) / 2)
    lam = lam.clamp_min(0) + damp * float(h.diagonal().clamp_min(0).mean()) + 1e-30
    return q, lam.sqrt()


def whitened_factors(r: torch.Tensor, rank: int, xtx: torch.Tensor | None, damp: float = 0.01,
                     white: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(A [rank, in], B [out, rank]) float32 minimizing ‖(r − B·A) Xᵀ‖ for xtx = XᵀX (Frobenius if None;
    `white`: `whitening(xtx, damp)` computed beforehand).

    Σ's square root goes to both sides so that neither factor's range dwarfs the other's (they are
    stored in float16)."""
    rd = r.detach().double()
    if xtx is None and white is None:
        u, sv, vh = torch.linalg.svd(rd, full_matrices=False)
        root = sv[:rank].sqrt()
        return (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float()
    q, root_lam = white if white is not None else whitening(xtx, damp)
    q, root_lam = q.to(rd.device), root_lam.to(rd.device)
    u, sv, vh = torch.linalg.svd(rd @ (q * root_lam), full_matrices=False)
    root = sv[:rank].sqrt()
    # A = Σ^½ Vᵀ S⁻¹ = Σ^½ Vᵀ Λ^-½ Qᵀ
    a_ = (root[:, None] * vh[:rank] / root_lam) @ q.t()
    return a_.float(), (u[:, :rank] * root).float()


@dataclass(frozen=True)
class LowRankFormat(Format):
    """`base` (a quantized format, or None for a pure factorization) plus rank-`rank` factors in `factor_dtype`."""

    base: Format | None = None
    rank: int = 32
    factor_dtype: str = "float16"
    kind: ClassVar[str] = "lowrank"
    reads_statistics: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SizewiseError(f"rank must be a positive integer, got {self.rank!r}")
        if self.factor_dtype not in DTYPE_BITS:
            raise SizewiseError(f"factor dtype must be one of {sorted(DTYPE_BITS)}, got {self.factor_dtype!r}")
        if self.base is not None and (not self.base.quantized or isinstance(self.base, LowRankFormat)):
            raise SizewiseError(f"a low-rank correction needs a compressed base format, got {self.base.label}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "base": None if self.base is None else self.base.to_dict(),
                "rank": self.rank, "factor_dtype": self.factor_dtype}

    @property
    def label(self) -> str:
        factors = f"r{self.rank}" + ("" if self.factor_dtype == "float16" else f" {self.factor_dtype}")
        return factors + " factors" if self.base is None else f"{self.base.label} + {factors}"

    @property
    def group_label(self) -> str:
        return "-" if self.base is None else self.base.group_label

    @property
    def bits(self) -> int:
        """The base's bits per code, or the factors' dtype bits for factors alone."""
        return DTYPE_BITS[self.factor_dtype] if self.base is None else self.base.bits

    @property
    def compression(self) -> str:
        base = "quant" if self.base is None else self.base.compression
        return "low-rank" if base == "quant" else f"{base}+low-rank"

    def check(self, in_features: int, name: str = "layer") -> None:
        if self.base is not None:
            self.base.check(in_features, name)
        if self.rank > in_features:
            raise SizewiseError(f"rank {self.rank} exceeds the input dimension {in_features} of {name}")

    def stored_bits(self, out_features: int, in_features: int) -> int:
        self.check(in_features)
        base = 0 if self.base is None else self.base.stored_bits(out_features, in_features)
        return base + self.rank * (in_features + out_features) * DTYPE_BITS[self.factor_dtype]

    def parts(self, out_features: int, in_features: int) -> tuple[Part, ...]:
        self.check(in_features)
        base = () if self.base is None else self.base.parts(out_features, in_features)
        return (*base, Part("lora_a", (self.rank, in_features), self.factor_dtype),
                Part("lora_b", (out_features, self.rank), self.factor_dtype))

    def to_parts(self, st: "LowRankTensor") -> dict[str, torch.Tensor]:
        out = {} if self.base is None else dict(self.base.to_parts(st.base))
        out["lora_a"], out["lora_b"] = st.a.cpu().contiguous(), st.b.cpu().contiguous()
        return out

    def from_parts(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> "LowRankTensor":
        a, b = tensors["lora_a"], tensors["lora_b"]
        if tuple(a.shape) != (self.rank, shape[1]) or tuple(b.shape) != (shape[0], self.rank):
            raise SizewiseError(f"low-rank factors of shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit a "
                                f"{shape[0]}x{shape[1]} rank-{self.rank} weight")
        base = None if self.base is None else self.base.from_parts(tensors, shape)
        return LowRankTensor(self, base, a, b)

    # --- GGUF: the base as its ggml type, the factors in a LoRA adapter ---------------------------------

    @property
    def ggml_type(self) -> str | None:
        return None if self.base is None else self.base.ggml_type

    def ggml_blocks(self, st: "LowRankTensor") -> np.ndarray:
        if self.ggml_type is None:
            raise SizewiseError(f"{self.label} has no GGUF form: " + (
                "a pure factorization is not a llama.cpp weight" if self.base is None
                else f"{self.base.label} has no exact ggml type"))
        return self.base.ggml_blocks(st.base)

    @property
    def carries_lora(self) -> bool:
        return True

    def lora(self, st: "LowRankTensor"):
        return st.a, st.b

    # --- solving --------------------------------------------------------------------------------------

    def _factored(self, w, base, stats, damp=0.01) -> "LowRankTensor":
        r = w.float() - (0 if base is None else dense(base).to(w.device))
        white = None
        if stats is not None and stats.xtx is not None:
            key = ("lowrank-whitening", damp)
            if key not in stats.cache:
                stats.cache[key] = whitening(stats.xtx, damp)
            white = stats.cache[key]
        a, b = whitened_factors(r, self.rank, None, damp, white)
        dt = TORCH_DTYPES[self.factor_dtype]
        return LowRankTensor(self, base, a.to(dt).contiguous(), b.to(dt).contiguous())

    def solve(self, solver, w: torch.Tensor, stats):
        base = None if self.base is None else self.base.solve(solver, w, stats)
        return self._factored(w, base, stats)

    def round(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> "LowRankTensor":
        return self._factored(w, None if self.base is None else self.base.round(w), None)


@dataclass
class LowRankTensor:
    """base (the base format's stored tensor, or None) + b @ a."""

    fmt: LowRankFormat
    base: object
    a: torch.Tensor        # [rank, in]
    b: torch.Tensor        # [out, rank]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])

    def stored_bits(self) -> int:
        return self.fmt.stored_bits(*self.shape)

    def dequantize(self) -> torch.Tensor:
        # contiguous operands: the product's rounding must not depend on how the factors are laid out
        low = self.b.float().contiguous() @ self.a.float().contiguous()
        return low if self.base is None else dense(self.base).to(low.device) + low
