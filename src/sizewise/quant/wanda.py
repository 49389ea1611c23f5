"""Pruning by a score, without updating the kept weights: magnitude (|W|) and Wanda (Sun et al., 2023:
|W| · ‖x‖₂ per input channel, compared within each output row).

`keep_mask` picks, per row, the weights with the largest score: the pattern's kept count anywhere in
the row (unstructured) or N in each group of M columns. The kept weights are then stored in the
sparse format's kept format (float, or rounded to its grid: data-free).
"""

from __future__ import annotations

import torch

from ..errors import SizewiseError
from .sparse import Pattern, SparseFormat, SparseTensor, check_keeps


def keep_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """bool [out, in]: True where a weight is kept (largest scores per row, or per group of M)."""
    out, inp = score.shape
    if pattern.nm:
        groups = score.reshape(out, inp // pattern.m, pattern.m)
        idx = groups.topk(pattern.n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
        return keep.reshape(out, inp)
    idx = score.topk(pattern.kept(inp), dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def prune_by_score(w: torch.Tensor, score: torch.Tensor, fmt: SparseFormat) -> SparseTensor:
    """Keep the highest-scoring weights of `w` [out, in] in `fmt`'s pattern; round the kept ones to its
    kept format (the pruned ones are zero before rounding, so a grid fits the kept weights' range)."""
    fmt.check(w.shape[1])
    keep = keep_mask(score.float(), fmt.spec)
    check_keeps(keep, fmt.spec)
    kept = w.float() * keep
    return SparseTensor(fmt, keep, fmt.inner.round(kept))


def channel_norms(stats) -> torch.Tensor:
    """‖x‖₂ per input channel over the calibration tokens: from Σx² (`observers.SqSum`), else diag(XᵀX)."""
    if getattr(stats, "sq_sum", None) is not None:
        return stats.sq_sum.clamp_min(0).sqrt()
    if getattr(stats, "xtx", None) is not None:
        return stats.xtx.diagonal().clamp_min(0).sqrt()
    raise SizewiseError("Wanda needs the inputs' per-channel norms: run it with calibration data")


def wanda(w: torch.Tensor, stats, fmt) -> SparseTensor:
    if not isinstance(fmt, SparseFormat):
        raise SizewiseError("wanda prunes: give a sparsity (--sparsity 50%, 2:4, 4:8)")
    return prune_by_score(w, w.abs() * channel_norms(stats).to(w.device)[None, :], fmt)


def magnitude(w: torch.Tensor, fmt) -> SparseTensor:
    if not isinstance(fmt, SparseFormat):
        raise SizewiseError("magnitude prunes: give a sparsity (--sparsity 50%, 2:4, 4:8)")
    return prune_by_score(w, w.abs(), fmt)
