"""Pruning by a score, without updating the kept weights: magnitude (|W|) and Wanda (Sun et al., 2023:
|W| · ‖x‖₂ per input channel, compared within each output row).

`sparse.keep_mask` picks, per row, the weights with the largest score: the pattern's kept count anywhere
in the row (unstructured) or N in each group of M columns. The kept weights are then stored in the
sparse format's kept format (float, or rounded to its grid: data-free).
"""

from __future__ import annotations

import torch

from ..errors import SizewiseError
from .sparse import SparseFormat, SparseTensor, prune_by_score


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
