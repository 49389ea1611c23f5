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
    # which statistics of the inputs it reads (`observers.OBSERVERS`): the engine accumulates only those
    observes: tuple[str, ...] = ("xtx", "abs_sum")
    # what it stores: "" any format, "float"/"quant": a sparse format whose kept values are float or on a
    # grid (pruning), "factors": low-rank factors alone
    stores: str = ""
    # (weight, stats, [fmt], **options) -> [stored tensor, or None where it leaves that format to `solve`]:
    # several formats of one weight at once, each equal to its own solve (`solve_many`)
    solve_many: Callable[..., list] | None = None
    # methods whose result on the same format this one's beats on a linear's output error, the allocator's
    # proxy: where both are candidates the allocator does not profile those on linears (`candidates.profiled`)
    dominates: tuple[str, ...] = ()


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


def _gptq_many(w, stats, fmts, block_size=128, act_order=True, damp=0.01, clip_search=True, **_):
    from .gptq import hessian_factor
    from .gptq_stack import gptq_stacked, stackable

    key = ("gptq-factor", damp, act_order)
    if key not in stats.cache:
        stats.cache[key] = hessian_factor(stats.xtx, damp=damp, act_order=act_order)
    factor = stats.cache[key]
    ks = [k for k, f in enumerate(fmts) if stackable(f, factor)]
    out = [None] * len(fmts)
    for k, t in zip(ks, gptq_stacked(w, [fmts[k] for k in ks], factor, block_size=block_size, clip_search=clip_search)):
        out[k] = t
    return out


def _sparsegpt(w, stats, fmt, block_size=128, damp=0.01, clip_search=True, **_):
    from .gptq import hessian_factor
    from .sparsegpt import sparsegpt

    key = ("gptq-factor", damp, False)        # N:M groups need the natural column order
    if key not in stats.cache:
        stats.cache[key] = hessian_factor(stats.xtx, damp=damp, act_order=False)
    return sparsegpt(w, stats.xtx, fmt, block_size=block_size, damp=damp, clip_search=clip_search,
                     factor=stats.cache[key])


def _wanda(w, stats, fmt, **_):
    from .wanda import wanda
    return wanda(w, stats, fmt)


def _magnitude(w, stats, fmt, **_):
    from .wanda import magnitude
    return magnitude(w, fmt)


def _factors_only(w, stats, fmt, **_):
    raise SizewiseError("svd stores low-rank factors alone: give a rank (--lowrank R)")


_SPARSEGPT_OPTIONS = {"block_size": 128, "damp": 0.01, "clip_search": True}

METHODS = {m.name: m for m in [
    Method("rtn", False, _rtn, "round-to-nearest, each group's grid fitted to its min/max (data-free)"),
    Method("rtn-mse", False, _rtn_mse, "round-to-nearest with an MSE-optimal clipping search per group (data-free)"),
    Method("gptq", True, _gptq, "GPTQ: second-order error compensation from calibration data, clipping range searched per group",
           # clip_search on: at 3 bits g64 on SmolLM2, 40.99 perplexity vs 51.12 from min/max grids
           {"block_size": 128, "act_order": True, "damp": 0.01, "clip_search": True}, observes=("xtx",),
           # GPTQ minimizes the output error RTN's rounding leaves: lower predicted KL than RTN's on every
           # linear of SmolLM2 for all 24 integer grids and 12 llama.cpp types (equal on Q4_1)
           solve_many=_gptq_many, dominates=("rtn",)),
    Method("sparsegpt", True, _sparsegpt, "SparseGPT: prune (--sparsity 50%, 2:4, 4:8) with the OBS update on "
           "GPTQ's column loop; kept weights in float", _SPARSEGPT_OPTIONS, ("xtx",), "float"),
    Method("sparsegpt+gptq", True, _sparsegpt, "SparseGPT pruning and GPTQ rounding of the kept weights in one "
           "pass (--sparsity, --bits, --group-size)", _SPARSEGPT_OPTIONS, ("xtx",), "quant"),
    Method("wanda", True, _wanda, "Wanda: prune the smallest |W|·‖x‖ of each row (no update); kept weights in float",
           observes=("sq_sum",), stores="float"),
    Method("magnitude", False, _magnitude, "prune the smallest |W| of each row (no update, data-free); kept "
           "weights in float", observes=(), stores="float"),
    Method("svd", True, _factors_only, "W ≈ B·A alone: the activation-whitened truncated SVD (ASVD style), "
           "rank --lowrank R", observes=("xtx",), stores="factors"),
]}


def check_options(options: dict) -> None:
    """Method options are typed by the defaults of the methods that take them (GPTQ: block_size int,
    act_order bool, damp float, clip_search bool); one-line error otherwise."""
    if not isinstance(options, dict):
        raise SizewiseError("method options are a JSON object")
    known = {k: v for m in METHODS.values() for k, v in m.options.items()}
    for key, value in options.items():
        if key not in known:
            raise SizewiseError(f"unknown method option {key!r}; known: {', '.join(sorted(known))}")
        want = type(known[key])
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise SizewiseError(f"method option {key}={value!r} must be a {want.__name__}")
    if options.get("damp", 0) < 0 or options.get("block_size", 1) < 1:
        raise SizewiseError("GPTQ's damp must be >= 0 and its block size >= 1")


def format_for(name: str, grid: Format, *, sparsity: str | None = None, rank: int | None = None,
               float_dtype: str = "float16") -> Format:
    """The format a method stores, from the flags: `grid` (--bits, --group-size) for quantizers and for
    SparseGPT+GPTQ's kept weights, a sparse format for pruning methods, low-rank factors added with `rank`."""
    from .formats import FloatFormat
    from .lowrank import LowRankFormat
    from .sparse import SparseFormat

    stores = get(parse(name).quantizer).stores
    if stores in ("float", "quant"):
        if sparsity is None:
            raise SizewiseError(f"--method {name} prunes: give --sparsity (50%, 2:4, 4:8)")
        fmt = SparseFormat(FloatFormat(float_dtype) if stores == "float" else grid, sparsity)
    elif sparsity is not None:
        raise SizewiseError("--sparsity needs a pruning method: " +
                            ", ".join(m.name for m in METHODS.values() if m.stores in ("float", "quant")))
    elif stores == "factors":
        if rank is None:
            raise SizewiseError(f"--method {name} stores low-rank factors alone: give --lowrank R")
        return LowRankFormat(None, rank)
    else:
        fmt = grid
    return fmt if rank is None else LowRankFormat(fmt, rank)


def check_format(name: str, fmt: Format) -> None:
    """One-line error if method `name` cannot store `fmt` (a pruning method needs a sparse format)."""
    from .lowrank import LowRankFormat
    from .sparse import SparseFormat

    stores = get(name).stores
    if isinstance(fmt, LowRankFormat):
        if fmt.base is None:
            return              # factors alone: no method runs
        fmt = fmt.base
    if stores in ("float", "quant") and not isinstance(fmt, SparseFormat):
        raise SizewiseError(f"{name} prunes: its format must be sparse (--sparsity), got {fmt.label}")
    if stores == "" and isinstance(fmt, SparseFormat):
        raise SizewiseError(f"{name} does not prune; {fmt.label} needs sparsegpt, sparsegpt+gptq, wanda or magnitude")
    if stores == "factors":
        raise SizewiseError(f"{name} stores low-rank factors alone; give --lowrank R")


# In a budget's method list: rank-r factors correcting the listed quantizers' grids (not a method itself)
LOWRANK = "lowrank"


@dataclass(frozen=True)
class BudgetMethods:
    """What a budget's method list ("gptq,sparsegpt,lowrank") asks the allocator to choose among."""

    quantizers: tuple[str, ...]      # dense grids (rtn, rtn-mse, gptq)
    pruners: tuple[str, ...] = ()    # sparse candidates, kept weights on the grids
    lowrank: bool = False            # the quantizers' grids plus rank-r corrections
    svd: bool = False                # factors alone

    @property
    def joint(self) -> bool:
        return bool(self.pruners or self.lowrank or self.svd)


def split_budget_methods(names: tuple[str, ...]) -> BudgetMethods:
    """Sort a budget's method names (transforms already stripped) by what they add; one-line errors."""
    quantizers, pruners, lowrank, svd = [], [], False, False
    for n in names:
        if n.split("+")[0] in TRANSFORMS:
            raise SizewiseError(f"{n}: a plan is made for the model a transform (rotate+, awq+) leaves, which it does "
                                "not hold; `compress --budget` transforms, plans and compresses in one run")
        if n == LOWRANK:
            lowrank = True
        elif get(n).stores == "factors":
            svd = True
        elif get(n).stores:
            pruners.append(n)
        else:
            quantizers.append(n)
    if lowrank and not quantizers:
        raise SizewiseError(f"{LOWRANK} corrects a quantizer's grid: list one too (e.g. gptq,{LOWRANK})")
    if not quantizers and not pruners and not svd:
        raise SizewiseError("the method list names no quantizer")
    return BudgetMethods(tuple(dict.fromkeys(quantizers)), tuple(dict.fromkeys(pruners)), lowrank, svd)


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
    """'awq' alone means awq+rtn; transforms come first, in the order rotate, awq. The quantizer is the
    longest tail that names a method ("sparsegpt+gptq")."""
    parts = name.split("+")
    k = next((k for k in range(len(parts)) if "+".join(parts[k:]) in METHODS), len(parts))
    quantizer = "+".join(parts[k:]) or "rtn"
    stages = parts[:k]
    if any(p not in TRANSFORMS for p in stages) or len(set(stages)) != len(stages) or \
            stages != [t for t in TRANSFORMS if t in stages]:
        raise SizewiseError(f"unknown method {name!r}; a method is [rotate+][awq+]QUANTIZER with QUANTIZER one of "
                            f"{', '.join(METHODS)} (e.g. gptq, awq+gptq, rotate+gptq)")
    return Pipeline("rotate" in stages, "awq" in stages, quantizer)


def get(name: str) -> Method:
    if name not in METHODS:
        raise SizewiseError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def calibrates(name: str, fmt: Format, text_given: bool) -> bool:
    """Whether solving method `name` in `fmt` reads calibration statistics: the method needs them, or the
    format reads them (a low-rank correction, whitened by the inputs) and calibration text was given.
    Without text a data-free method's correction is the plain SVD of its error: text the model would
    generate itself is not data to fit weights to, and not worth a calibration pass."""
    return get(name).needs_calibration or (fmt.reads_statistics and text_given)


def solve(name: str, w: torch.Tensor, stats, fmt: Format, options: dict | None = None):
    """Method `name` applied to `w` in `fmt`; a wrapping format (low-rank factors) solves its base with it."""
    m = get(name)
    opts = {**m.options, **(options or {})}
    return fmt.solve(lambda w2, f2: m.solve(w2, stats, f2, **opts), w, stats)


def solve_many(name: str, w: torch.Tensor, stats, fmts: list[Format], options: dict | None = None) -> list:
    """`solve(name, w, stats, fmt, options)` for every fmt, sharing what the method can share across
    formats (GPTQ: one column loop for all its uniform grids, `gptq_stack`)."""
    m = get(name)
    opts = {**m.options, **(options or {})}
    out = m.solve_many(w, stats, fmts, **opts) if m.solve_many is not None and fmts else [None] * len(fmts)
    return [solve(name, w, stats, f, options) if t is None else t for f, t in zip(fmts, out)]
