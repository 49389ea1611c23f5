"""AWQ: activation-aware per-input-channel scales, folded into the preceding operation.

For a group of linears that read one input x, scaling their weight columns by s and the input by
1/s leaves the output unchanged: W x = (W·diag(s)) (x / s). Quantizing W·diag(s) instead of W
protects the columns of salient (large-|x|) channels. The 1/s is folded exactly into whatever
produces x (a norm's weight and bias, or the rows of the previous linear), so the model stays a
plain float model with different weights and no scales are stored.

The scale is s = (mean|x|)^α, normalized; α is searched on a grid in [0, 1] to minimize the
group's output error after quantization, computed exactly from XᵀX without activations:
    err(s) = Σ_linears trace(ΔW · XᵀX · ΔWᵀ),   ΔW = W − Q(W·diag(s))·diag(1/s).
α = 0 (s = 1, plain RTN) is on the grid, so the chosen scales never do worse on this proxy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .. import families
from ..errors import SizewiseError
from ..families import Fold
from .uniform import QuantFormat
from .methods import round_to_nearest

GRID = tuple(k / 20 for k in range(21))   # α in {0, 0.05, ..., 1}

# The fold rules themselves are per-family data: `sizewise.families` (`Family.folds`).
NO_RULE = "no foldable predecessor in sizewise's fold table"


@dataclass
class Group:
    """A rule matched in one layer: the predecessor module and the linears (LinearRef) that read it."""

    rule: Fold
    prev: nn.Module | None
    refs: list


def _has(layer: nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
        return True
    except AttributeError:
        return False


def match_groups(layer: nn.Module, refs: list, folds: Sequence[Fold]) -> tuple[list[Group], list[tuple[list, str]]]:
    """The fold rules (a family's `folds`, first covering rule wins) that apply to this layer, and the
    linears no foldable rule covers (with reasons)."""
    rel = {id(m): n for n, m in layer.named_modules()}
    by_rel = {rel[id(r.module)]: r for r in refs if id(r.module) in rel}
    claimed: set[str] = set()
    groups, skipped = [], []
    for rule in folds:
        if not all(g in by_rel for g in rule.group) or claimed & set(rule.group):
            continue
        if rule.unless and _has(layer, rule.unless):
            continue
        if rule.requires and getattr(layer, rule.requires, True) is False:
            continue
        if rule.kind != "none" and not _has(layer, rule.prev):
            continue
        claimed |= set(rule.group)
        members = [by_rel[g] for g in rule.group]
        if rule.kind == "none":
            skipped.append((members, rule.why))
        else:
            groups.append(Group(rule, layer.get_submodule(rule.prev), members))
    for name, r in by_rel.items():
        if name not in claimed:
            skipped.append(([r], NO_RULE))
    return groups, skipped


# ---- norms --------------------------------------------------------------------------------------

def norm_offset(norm: nn.Module) -> float | None:
    """0 if the norm multiplies by `weight`, 1 if by `1 + weight` (Gemma); None if neither.

    Probed on a zero-mean, unit-RMS input, which both LayerNorm and RMSNorm leave (almost) unchanged.
    """
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return None
    n = w.numel()
    x = torch.ones(n, device=w.device)
    x[1::2] = -1.0
    x = x - x.mean()
    x = x / x.pow(2).mean().sqrt()
    with torch.no_grad():
        y = norm(x[None].to(w.dtype)).float()[0]
    b = getattr(norm, "bias", None)
    if isinstance(b, torch.Tensor):
        y = y - b.float()
    keep = x.abs() > 0.5
    off = ((y[keep] / x[keep]) - w.float()[keep]).median().item()
    for cand in (0.0, 1.0):
        if abs(off - cand) < 0.05:
            return cand
    return None


def fold_into_norm(norm: nn.Module, s: torch.Tensor, offset: float) -> None:
    """Make the norm's output y / s: gain (weight + offset) and bias divided by s."""
    with torch.no_grad():
        w = norm.weight
        gain = (w.double() + offset) / s.double()
        w.copy_((gain - offset).to(w.dtype))
        b = getattr(norm, "bias", None)
        if isinstance(b, torch.Tensor):
            b.copy_((b.double() / s.double()).to(b.dtype))


def fold_into_rows(ref, s: torch.Tensor) -> None:
    """Divide the last len(s) output rows (and bias) of a linear by s."""
    k = s.numel()
    w = ref.weight().double()
    w[-k:] /= s.double()[:, None]
    ref.set_weight(w)
    b = getattr(ref.module, "bias", None)
    if isinstance(b, torch.Tensor):
        with torch.no_grad():
            b[-k:] = (b[-k:].double() / s.double()).to(b.dtype)


# ---- search -------------------------------------------------------------------------------------

def proxy_error(w: torch.Tensor, fmt: QuantFormat | None, xtx: torch.Tensor, s: torch.Tensor) -> float:
    """trace(ΔW XᵀX ΔWᵀ) for ΔW = W − Q(W·diag(s))·diag(1/s); 0 for a linear kept in float."""
    if fmt is None:
        return 0.0
    d = w - round_to_nearest(w * s, fmt).dequantize() / s
    return float(((d @ xtx) * d).sum())


def search_scale(weights: list[torch.Tensor], fmts: list, xtx: torch.Tensor, salience: torch.Tensor,
                 expand: Callable[[torch.Tensor], torch.Tensor] = lambda s: s,
                 alphas: Sequence[float] = GRID):
    """Best α for s = salience^α / sqrt(max·min); returns (α, s, error with s = 1, error with the best s).

    `salience` (mean |x|) lives in the predecessor's channel space; `expand` maps it to the group's inputs
    (the GQA head repeat), so that the chosen s folds into the predecessor. With 0 in `alphas` the
    best error is never above the s = 1 error.
    """
    a = salience.float()
    a = a.clamp_min(a.max().clamp_min(1e-30) * 1e-5)   # dead channels (e.g. after ReLU) must not give s = 0

    def error(s):
        full = expand(s)
        return sum(proxy_error(w, f, xtx, full) for w, f in zip(weights, fmts))

    ones = torch.ones_like(a)
    base = error(ones)
    best = (float("inf"), 0.0, ones)
    for alpha in alphas:
        s = ones if alpha == 0 else a.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = base if alpha == 0 else error(s)
        if err < best[0]:                  # ties keep the earlier (smaller) α
            best = (err, alpha, s)
    err, alpha, s = best
    return alpha, s, base, err


def _kv_repeat(layer: nn.Module, consumer_rel: str) -> int:
    """How many attention heads share one kv head (1 without GQA), from the attention module."""
    parent = consumer_rel.rsplit(".", 1)[0]
    return int(getattr(layer.get_submodule(parent), "num_key_value_groups", 1) or 1)


# ---- the engine transform -----------------------------------------------------------------------

def awq_transform(i: int, layer: nn.Module, refs: list, stats: dict,
                  fmt_for: Callable, model_type: str, *, alphas: Sequence[float] = GRID) -> dict:
    """Search and fold AWQ scales for decoder layer `i` in place; update `stats` to the new inputs.

    `fmt_for(ref)` is the QuantFormat the linear will get (None: stays float); `alphas` the search grid
    (tests pass a single α to force a fold). Returns a JSON-able log. The fold rules are those of
    `model_type`'s family (`sizewise.families`); a model type without any is refused.
    """
    family = families.for_model_type(model_type)
    if not family.folds:
        raise SizewiseError(f"AWQ knows the fold rules of: {', '.join(families.awq_model_types())}; "
                            f"not {model_type} ({family.no_awq})")
    groups, skipped = match_groups(layer, refs, family.folds)
    log = {"layer": i, "groups": [],
           "skipped": [{"linears": [r.name for r in rs], "reason": why if why != NO_RULE else f"{why} ({model_type})"}
                       for rs, why in skipped]}
    for g in groups:
        names = [r.name for r in g.refs]
        fmts = [fmt_for(r) for r in g.refs]
        if all(f is None for f in fmts):
            log["skipped"].append({"linears": names, "reason": "not quantized"})
            continue
        st = stats[g.refs[0].name]          # members read the same input: identical statistics
        outside = [r.name for r in refs if r not in g.refs and stats.get(r.name) is st]
        if outside:                         # the rule missed a reader of this input: folding would be wrong
            log["skipped"].append({"linears": names, "reason": f"{outside[0]} reads the same input but is not in the group"})
            continue
        if st.count == 0:
            log["skipped"].append({"linears": names, "reason": "no calibration tokens"})
            continue
        salience = st.abs_sum / st.count
        expand = lambda s: s                # noqa: E731
        if g.rule.kind == "norm":
            offset = norm_offset(g.prev)
            if offset is None:
                log["skipped"].append({"linears": names, "reason": f"{g.rule.prev} is not a norm sizewise can fold into"})
                continue
        else:
            prev_ref = next((r for r in refs if r.module is g.prev), None)
            rep = _kv_repeat(layer, g.rule.group[0]) if g.rule.heads else 1
            c_in = g.refs[0].shape[1]
            if prev_ref is None or c_in % rep or prev_ref.shape[0] < c_in // rep:
                log["skipped"].append({"linears": names, "reason": f"shapes of {g.rule.prev} and the group do not match"})
                continue
            if rep > 1:
                # o_proj's input (head h, dim d) is v's channel (h // rep, d): tie the scales across the repeat
                hd = _head_dim(layer, g.rule.group[0], c_in // rep)
                kv = c_in // rep // hd
                salience = salience.view(kv, rep, hd).mean(1).reshape(-1)

                def expand(s, kv=kv, rep=rep, hd=hd):
                    return s.view(kv, 1, hd).expand(kv, rep, hd).reshape(-1)
        weights = [r.weight() for r in g.refs]
        alpha, s, before, after = search_scale(weights, fmts, st.xtx, salience, expand, alphas)
        prefix = names[0][:len(names[0]) - len(g.rule.group[0])]
        entry = {"prev": prefix + g.rule.prev, "linears": names, "alpha": alpha,
                 "error_before": before, "error_after": after}
        log["groups"].append(entry)
        if torch.equal(s, torch.ones_like(s)):
            continue                        # s = 1: nothing to fold
        full = expand(s)
        for r, w in zip(g.refs, weights):
            r.set_weight(w * full)
        # The engine shares one LinearStats among linears reading the same input: update each once.
        for stt in {id(stats[r.name]): stats[r.name] for r in g.refs}.values():
            stt.xtx.div_(torch.outer(full, full).to(stt.xtx))
            stt.abs_sum.div_(full.to(stt.abs_sum))
            getattr(stt, "cache", {}).clear()     # anything derived from the old XᵀX is stale
        if g.rule.kind == "norm":
            fold_into_norm(g.prev, s, offset)
        else:
            fold_into_rows(prev_ref, s)
    return log


def _head_dim(layer: nn.Module, consumer_rel: str, v_channels: int) -> int:
    parent = consumer_rel.rsplit(".", 1)[0]
    hd = getattr(layer.get_submodule(parent), "head_dim", None)
    return int(hd) if hd and v_channels % int(hd) == 0 else v_channels
