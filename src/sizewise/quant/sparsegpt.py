"""SparseGPT (Frantar & Alistarh, 2023): prune (and optionally quantize) a weight in one pass of GPTQ's
column loop, choosing the mask from the OBS saliency w²/[H⁻¹]_cc² and spreading each pruned weight's
error over the columns not yet reached.

The loop, the Hessian factor and the lazy block updates are GPTQ's (`gptq.solve_columns`); this module
only says which weights each block prunes:

- unstructured: at each block's start, per output row, the block's share of the row's pruned count
  (adaptive mask selection, per row as in the paper's per-output setting), lowest saliency first;
- N:M: at the first column of each group of M, the M−N lowest-saliency weights of each row.

With a quantized kept format, kept weights are rounded column by column in the same pass (the
paper's joint mode, "sparsegpt+gptq").
"""

from __future__ import annotations

import torch

from ..errors import SizewiseError
from .gptq import HessianFactor, prepare, solve_columns
from .sparse import Pattern, SparseFormat, SparseTensor, check_keeps


def mask_selector(pattern: Pattern):
    """The `prune` callback of `gptq.solve_columns` for a pattern."""
    if pattern.nm:
        n, m = pattern.n, pattern.m

        def select_nm(w1, d1, i1, i, keep1):
            if i % m == 0:
                score = w1[i:i + m] ** 2 / d1[i:i + m, None] ** 2          # [m, out]
                idx = score.topk(m - n, dim=0, largest=False).indices
                keep1[i:i + m].scatter_(0, idx, False)
        return select_nm

    def select(w1, d1, i1, i, keep1):
        if i == 0:
            k = pattern.pruned_through(i1 + w1.shape[0]) - pattern.pruned_through(i1)
            if k:
                score = w1 ** 2 / d1[:, None] ** 2                          # [block, out]
                idx = score.topk(k, dim=0, largest=False).indices
                keep1.scatter_(0, idx, False)
    return select


def sparsegpt(weight: torch.Tensor, xtx: torch.Tensor | None, fmt: SparseFormat, *, block_size: int = 128,
              act_order: bool = False, damp: float = 0.01, clip_search: bool = False,
              factor: HessianFactor | None = None) -> SparseTensor:
    """Prune weight [out, in] to `fmt`'s pattern, kept weights in `fmt.inner` (float: pruning alone;
    a quant grid: pruned and quantized together), minimizing ‖XWᵀ − XŴᵀ‖ for xtx = ΣxxT."""
    if not isinstance(fmt, SparseFormat):
        raise SizewiseError("sparsegpt prunes: give a sparsity (--sparsity 50%, 2:4, 4:8)")
    pattern = fmt.spec
    if pattern.nm and act_order:
        raise SizewiseError("N:M sparsity groups consecutive columns: SparseGPT cannot reorder them (act_order off)")
    if block_size < 1 or (pattern.nm and block_size % pattern.m):
        raise SizewiseError(f"block size {block_size} must be a positive multiple of {pattern.m or 1}")
    w, factor = prepare(weight, xtx, fmt, factor, damp, act_order, "SparseGPT")
    stored, keep = solve_columns(w, factor, fmt.inner, block_size, clip_search, prune=mask_selector(pattern))
    check_keeps(keep, pattern)
    return SparseTensor(fmt, keep, stored)
