"""Method names → solvers. A solver is a pure function (weight [out,in], stats, format) → the format's
stored tensor (QuantizedTensor, KQuantTensor, CodebookTensor).

This is the one place a method name is resolved; the engine, the CLI and the plan all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import SizewiseError
from .formats import Format


@dataclass(frozen=True)
class Method:
    name: str
    needs_calibration: bool
    solve: Callable[..., object]   # (weight, stats, fmt, **options) -> the format's stored tensor
    summary: str
    options: dict = field(default_factory=dict)


def round_to_nearest(w: torch.Tensor, fmt: Format):
    """Data-free rounding in any quantized format (k-quants fit their two-level grid first, IQ4_NL
    searches each block's scale)."""
    return fmt.round(w)


def _rtn(w, stats, fmt, **_):
    return fmt.round(w)


def _rtn_mse(w, stats, fmt, **_):
    return fmt.round_mse(w)


def _gptq(w, stats, fmt, block_size=128, act_order=True, damp=0.01, clip_search=True, factor=None, **_):
    from .gptq import gptq, hessian_factor

    # q/k/v (and gate/up) share their statistics: factor their Hessian once.
    key = ("gptq-factor", damp, act_order)
    if factor is None:
        if key not in stats.cache:
            stats.cache[key] = hessian_factor(stats.xtx, damp=damp, act_order=act_order)
        factor = stats.cache[key]
    return gptq(w, stats.xtx, fmt, block_size=block_size, act_order=act_order, damp=damp,
                clip_search=clip_search, factor=factor)


METHODS = {m.name: m for m in [
    Method("rtn", False, _rtn, "round-to-nearest, each group's grid fitted to its min/max (data-free)"),
    Method("rtn-mse", False, _rtn_mse, "round-to-nearest with an MSE-optimal clipping search per group (data-free)"),
    Method("gptq", True, _gptq, "GPTQ: second-order error compensation from calibration data, clipping range searched per group",
           # clip_search on: at 3 bits g64 on SmolLM2, 40.99 perplexity vs 51.12 from min/max grids
           {"block_size": 128, "act_order": True, "damp": 0.01, "clip_search": True}),
]}


@dataclass(frozen=True)
class Pipeline:
    """A method name such as "rotate+awq+gptq": optional model/layer transforms, then a quantizer."""

    rotate: bool
    awq: bool
    quantizer: str

    @property
    def needs_calibration(self) -> bool:
        return self.awq or METHODS[self.quantizer].needs_calibration


TRANSFORMS = ("rotate", "awq")


def parse(name: str) -> Pipeline:
    """'awq' alone means awq+rtn; transforms come first, in the order rotate, awq."""
    parts = name.split("+")
    quantizer = parts[-1] if parts[-1] in METHODS else "rtn"
    stages = parts[:-1] if parts[-1] in METHODS else parts
    if any(p not in TRANSFORMS for p in stages) or len(set(stages)) != len(stages) or \
            stages != [t for t in TRANSFORMS if t in stages]:
        raise SizewiseError(f"unknown method {name!r}; a method is [rotate+][awq+]QUANTIZER with QUANTIZER one of "
                            f"{', '.join(METHODS)} (e.g. gptq, awq+gptq, rotate+gptq)")
    return Pipeline("rotate" in stages, "awq" in stages, quantizer)


def get(name: str) -> Method:
    if name not in METHODS:
        raise SizewiseError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def solve(name: str, w: torch.Tensor, stats, fmt: Format, options: dict | None = None):
    m = get(name)
    return m.solve(w, stats, fmt, **{**m.options, **(options or {})})
