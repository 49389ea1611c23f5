"""What the engine observes of a linear layer's inputs: pluggable observers filling one `LinearStats`.

Each observer accumulates one statistic over the calibration tokens, batch by batch: `Gram` the
Hessian XᵀX (GPTQ, the allocator's proxy), `AbsSum` the per-channel Σ|x| (AWQ's salience), `SqSum`
Σx² (Wanda's channel norms), `RoundingGram` the Gram of what llama.cpp's input rounding does to x (the allocator's GGUF
pricing). A method that needs another statistic adds an observer; the engine's loop is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .runtime import llamacpp


class Observer:
    """Accumulates one statistic of a linear's inputs into its `LinearStats`."""

    def start(self, stats: "LinearStats", in_features: int, device) -> None:
        raise NotImplementedError

    def add(self, stats: "LinearStats", x: torch.Tensor, xf: torch.Tensor) -> None:
        """One batch: `x` [tokens, in] as computed (maybe half precision), `xf` the same in float32."""
        raise NotImplementedError


@dataclass(frozen=True)
class Gram(Observer):
    """Σ x xᵀ, float32 [in, in]."""

    def start(self, stats, in_features, device):
        stats.xtx = torch.zeros(in_features, in_features, device=device)

    def add(self, stats, x, xf):
        if x.dtype in (torch.bfloat16, torch.float16):
            # Half-precision passes: the Gram product runs in x's dtype (4x faster here than float32),
            # but its output is rounded to 8 mantissa bits. Centering first keeps that rounding
            # relative to the spread of x, not to its mean, which dominates XᵀX entries:
            # XᵀX = CᵀC + n μμᵀ with C = X - μ. Batches are then summed in float32.
            mu = xf.mean(0)
            c = (xf - mu).to(x.dtype)
            stats.xtx.add_((c.t() @ c).float())
            stats.xtx.addr_(mu, mu, alpha=x.shape[0])
        else:
            stats.xtx.addmm_(xf.t(), xf)


@dataclass(frozen=True)
class AbsSum(Observer):
    """Σ |x| per input channel, float32 [in]."""

    def start(self, stats, in_features, device):
        stats.abs_sum = torch.zeros(in_features, device=device)

    def add(self, stats, x, xf):
        stats.abs_sum.add_(xf.abs().sum(0))


@dataclass(frozen=True)
class SqSum(Observer):
    """Σ x² per input channel, float32 [in] (Wanda's ‖x‖₂², without the [in, in] Gram)."""

    def start(self, stats, in_features, device):
        stats.sq_sum = torch.zeros(in_features, device=device)

    def add(self, stats, x, xf):
        stats.sq_sum.add_(xf.square().sum(0))


@dataclass(frozen=True)
class RoundingGram(Observer):
    """Per rounding kind of llama.cpp's (`runtime.llamacpp`), Σ e eᵀ with e = round(x) - x, over the
    first `tokens` tokens only: its statistics settle fast. Kinds whose blocks do not tile the input
    are left out."""

    kinds: tuple[str, ...] = ()
    tokens: int = 0

    def start(self, stats, in_features, device):
        stats.rounding = {k: torch.zeros(in_features, in_features, device=device) for k in self.kinds
                          if llamacpp.fits(k, in_features)}
        stats.rounding_limit = self.tokens

    def add(self, stats, x, xf):
        if stats.rounding and stats.rounding_count < stats.rounding_limit:
            xs = xf[:stats.rounding_limit - stats.rounding_count]
            for kind, acc in stats.rounding.items():
                e = llamacpp.round_input(xs, kind) - xs
                acc.addmm_(e.t(), e)
            stats.rounding_count += xs.shape[0]


DEFAULT_OBSERVERS: tuple[Observer, ...] = (Gram(), AbsSum())
# statistic name (a `LinearStats` field, as methods declare what they read) -> its observer
OBSERVERS: dict[str, Observer] = {"xtx": Gram(), "abs_sum": AbsSum(), "sq_sum": SqSum()}


def observers_for(names) -> tuple[Observer, ...]:
    """The observers that accumulate the named statistics, in a fixed order."""
    return tuple(o for n, o in OBSERVERS.items() if n in set(names))


@dataclass
class LinearStats:
    """What a solver may know about a linear layer's inputs (sums over calibration tokens), as its
    observers filled it."""

    xtx: torch.Tensor | None = None        # [in, in] float32, sum of x xᵀ (GPTQ's Hessian up to a factor 2/n)
    abs_sum: torch.Tensor | None = None    # [in] float32, sum of |x| (AWQ's activation salience)
    sq_sum: torch.Tensor | None = None     # [in] float32, sum of x² (Wanda's channel norms)
    count: int = 0                         # tokens seen
    # Linears that read the same input (q/k/v, gate/up) share one LinearStats; solvers may cache
    # what they derive from it (e.g. GPTQ's Hessian factor) here. Cleared whenever xtx changes.
    cache: dict = field(default_factory=dict, repr=False)
    # kind -> [in, in] sum of e eᵀ (`RoundingGram`)
    rounding: dict = field(default_factory=dict, repr=False)
    rounding_count: int = 0
    rounding_limit: int = 0
    observers: tuple[Observer, ...] = field(default=DEFAULT_OBSERVERS, repr=False)

    @classmethod
    def empty(cls, in_features: int, device, observers: tuple[Observer, ...] = DEFAULT_OBSERVERS) -> "LinearStats":
        stats = cls(observers=tuple(observers))
        for o in stats.observers:
            o.start(stats, in_features, device)
        return stats

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        xf = x.float()
        for o in self.observers:
            o.add(self, x, xf)
        self.count += x.shape[0]
