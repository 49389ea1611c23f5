"""GPTQ for many uniform formats of one weight in one column loop (what profiling a layer asks for).

GPTQ's output rows are independent given the shared Hessian factor: row r's updates read only row r's
rounding errors. So K formats of one [out, in] weight can be solved as one [K·out, in] matrix, each
block of rows rounding to its own grid: a bit width per row (qmax broadcast over the stacked rows)
and a scale/zero per weight, all fitted before the loop. That holds for GPTQ's static groups (act_order)
and for per-channel grids; without act_order, grouped formats fit each group as the loop reaches it
and are solved one by one (`gptq.gptq`). The per-column overhead (a dozen small tensor ops) is then
paid once per column instead of once per column per format, and the clip search runs once over all
bit widths of a group size.

Every elementwise operation is the one `gptq.gptq` does, on the same operands, so each block of rows
ends up with the values the per-format solve gives (tests/test_gptq_stack.py checks the codes).
"""

from __future__ import annotations

import torch

from .gptq import HessianFactor, _fit_groups, prepare
from .grid import encode
from .uniform import QuantFormat, pack_tensor

STACK_BYTES = 256 << 20     # at most this much of stacked weights, scales and zeros at once
# Stacked output rows per column loop: wider stacks pay the per-column overhead less often, but past
# a few thousand rows a block of 128 columns no longer stays in cache (measured on SmolLM2's shapes).
STACK_ROWS = 3072


def stackable(fmt, factor: HessianFactor) -> bool:
    """Whether `fmt` can join a stack: a uniform grid whose scale/zero GPTQ fits before its loop."""
    return isinstance(fmt, QuantFormat) and (factor.act_order or fmt.group_size is None)


def _fitted(w: torch.Tensor, fmts: list[QuantFormat], factor: HessianFactor, clip_search: bool):
    """Per format: (scale, zero) [out, groups] as `gptq`'s static fit gives them (zero None if symmetric).
    (The clip search is not stacked: its work is elementwise over the whole weight, not per-call overhead.)"""
    cw = factor.diag.to(w.device) if clip_search else None
    return [_fit_groups(w, f, cw, clip_search) for f in fmts]


def gptq_stacked(weight: torch.Tensor, fmts: list[QuantFormat], factor: HessianFactor, *, block_size: int = 128,
                 clip_search: bool = False, max_bytes: int = STACK_BYTES, max_rows: int = STACK_ROWS) -> list:
    """`gptq(weight, None, fmt, factor=factor, block_size=..., clip_search=...)` for every fmt in `fmts`
    (each `stackable`), solved a chunk of formats at a time (at most `max_rows` stacked rows, or one
    format, and at most `max_bytes` of stacked tensors)."""
    if not fmts:
        return []
    if any(not stackable(f, factor) for f in fmts):
        raise ValueError("gptq_stacked takes uniform formats with grids fitted up front")
    w, factor = prepare(weight, None, fmts[0], factor, 0.0, factor.act_order, "GPTQ")
    for f in fmts[1:]:
        f.check(w.shape[1])
    grids = _fitted(w, fmts, factor, clip_search)
    per_format = 3 * w.numel() * 4                       # its rows of the weights, scales and zeros
    size = max(1, min(max_bytes // per_format, max_rows // w.shape[0]))
    out = []
    for k0 in range(0, len(fmts), size):
        # float zeros decode as s·q + m, integer ones as s·(q − z): one stack per decoding
        chunk = list(range(k0, min(k0 + size, len(fmts))))
        solved = {}
        for float_zero in (False, True):
            ks = [k for k in chunk if (not fmts[k].symmetric and fmts[k].zero == "float16") == float_zero]
            if ks:
                codes = _round_stacked(w, factor, [fmts[k] for k in ks], [grids[k] for k in ks], block_size,
                                       float_zero)
                solved.update(zip(ks, codes))
        out += [pack_tensor(solved[k], *grids[k], fmts[k]) for k in chunk]
    return out


def _round_stacked(w: torch.Tensor, factor: HessianFactor, fmts: list[QuantFormat], grids: list, block_size: int,
                   float_zero: bool) -> list[torch.Tensor]:
    """`gptq._round_columns` with fixed per-weight grids, on the formats' copies of w stacked along the
    output rows. Returns each format's uint8 codes [out, in] in original column order."""
    out_f, in_f = w.shape
    dev = w.device
    perm, u = factor.perm.to(dev), factor.u.to(dev)
    g = [f.group_len(in_f) for f in fmts]
    # Per processing step (row of the transposed stack), each stacked output's scale, zero and qmax.
    st = torch.cat([s.repeat_interleave(gk, dim=1) for (s, _), gk in zip(grids, g)]).t()[perm].contiguous()
    zt = torch.cat([(torch.full_like(s, 1 << (f.bits - 1)) if z is None else z).repeat_interleave(gk, dim=1)
                    for f, (s, z), gk in zip(fmts, grids, g)]).t()[perm].contiguous()
    qmax = torch.cat([torch.full((out_f,), float(f.qmax), device=dev) for f in fmts])
    qmin = torch.zeros_like(qmax)
    wt = w.t()[perm].repeat(1, len(fmts))                          # [in, K·out], processing order
    d = u.diagonal()
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = wt[i1:i2]
        u1 = u[i1:i2, i1:i2]
        e1 = torch.empty_like(w1)
        # the loop's operands as views made once per block (making them per column costs more than the math)
        rows = zip(w1.unbind(0), st[i1:i2].unbind(0), zt[i1:i2].unbind(0), e1.unbind(0), d[i1:i2].unbind(0))
        for i, (wc, s, z, err, dc) in enumerate(rows):
            # grid.encode then grid.decode, in place and without the uint8 round trip (codes are integers)
            if float_zero:
                q = torch.sub(wc, z).div_(s).round_().clamp_(qmin, qmax).mul_(s).add_(z)
            else:
                q = torch.div(wc, s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
            torch.sub(wc, q, out=err).div_(dc)
            # spread this column's error over the rest of the block now; beyond it, once per block
            w1[i + 1:].addr_(u1[i, i + 1:], err, alpha=-1.0)
        if i2 < in_f:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), e1, alpha=-1.0)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(in_f, device=dev)
    codes = []
    for k, f in enumerate(fmts):
        rows = slice(k * out_f, (k + 1) * out_f)
        z = None if f.symmetric else zt[:, rows]
        codes.append(encode(wt[:, rows], st[:, rows], z, f)[inv].t().contiguous())
    return codes
