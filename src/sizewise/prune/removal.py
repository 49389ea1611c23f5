"""Which input units of a linear to remove, and the least-squares refit of what remains (pure math).

A unit is a block of input columns: one MLP channel (a column of down_proj), or one attention head
(head_dim columns of o_proj). With G = XᵀX the Gram of the linear's inputs over calibration tokens
(ridge-damped: G + λ·mean(diag G)·I), removing the columns R and refitting the rest to the original
output costs, by the Optimal Brain Surgeon identity,

    ΔE(R) = tr(W_R [G⁻¹]_RR⁻¹ W_Rᵀ)        (W_R: the columns R of the current W)

and the refit is W' = W G[:, K] G[K, K]⁻¹ on the kept columns K, i.e. argmin ‖W X − W' X_K‖² +
λ‖W' − W_K‖² (shrunk toward the original weights, not toward zero). `select` removes units
greedily by that cost, updating W and G⁻¹ after each removal so later choices see the correction.
"""

from __future__ import annotations

import torch


def damped_gram(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """G + d·mean(diag G)·I in float64 (an all-zero Gram gets d·I), with d = `damp`, or ten times
    more until it factors: Grams summed in half precision can be slightly indefinite."""
    for _ in range(6):
        g = gram.double().clone()
        mean = g.diagonal().mean().item()
        g.diagonal().add_(damp * (mean if mean > 0 else 1.0))
        if torch.linalg.cholesky_ex(g).info == 0:
            return g
        damp = max(damp * 10, 1e-6)
    raise ValueError("the input Gram does not factor even with damping")


def refit(w: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """W' [out, |keep|] = W G[:, K] G[K, K]⁻¹ with G damped: the kept columns' weights that best
    reproduce W's output on the calibration inputs. float32."""
    g = damped_gram(gram, damp)
    rhs = (w.double() @ g[:, keep]).t()                      # [K, out]
    return torch.linalg.solve(g[keep][:, keep], rhs).t().float()


def output_error(w: torch.Tensor, gram: torch.Tensor, kept_w: torch.Tensor, keep: torch.Tensor) -> float:
    """‖W X − W' X_K‖² / ‖W X‖² over the calibration inputs, from their (undamped) Gram."""
    g = gram.double()
    d = w.double().clone()
    d[:, keep] -= kept_w.double()
    total = torch.einsum("oi,ij,oj->", w.double(), g, w.double()).item()
    return torch.einsum("oi,ij,oj->", d, g, d).item() / total if total > 0 else 0.0


def _scores(w: torch.Tensor, hinv: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """ΔE of removing each unit alone: tr(W_B [G⁻¹]_BB⁻¹ W_Bᵀ), batched over units [n, size]."""
    if units.shape[1] == 1:             # single columns: ‖w_j‖² / [G⁻¹]_jj (a batched solve of 1x1s is slow)
        u = units[:, 0]
        return (w[:, u] ** 2).sum(0) / hinv[u, u]
    hb = hinv[units[:, :, None], units[:, None, :]]          # [n, s, s]
    wb = w[:, units].permute(1, 0, 2)                        # [n, out, s]
    return (torch.linalg.solve(hb, wb.transpose(1, 2)).transpose(1, 2) * wb).sum((1, 2))


def select(w: torch.Tensor, gram: torch.Tensor, units: torch.Tensor, remove: int, *, damp: float,
           groups: torch.Tensor | None = None, per_group: int = 0, steps: int = 32) -> list[int]:
    """The `remove` units (rows of `units`, each a block of input-column indices) whose removal costs
    least output error, chosen greedily with the surgeon's correction applied after each choice.

    With `groups` (a group id per unit), exactly `per_group` units leave every group (attention
    heads sharing one key/value head). Without, up to ⌈remove / steps⌉ units leave at once (a block
    update); with steps >= remove the choice is purely one at a time.
    Returns the removed unit indices, sorted.
    """
    units = units.long()
    n = units.shape[0]
    if not 0 <= remove < n:
        raise ValueError(f"cannot remove {remove} of {n} units")
    wk = w.double().clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(damped_gram(gram, damp)))
    alive = torch.ones(n, dtype=torch.bool)
    left = None if groups is None else {int(g): per_group for g in groups.unique()}
    chunk = 1 if groups is not None else max(1, -(-remove // max(1, steps)))
    removed: list[int] = []
    while len(removed) < remove:
        cand = alive.clone()
        if left is not None:
            cand &= torch.tensor([left[int(g)] > 0 for g in groups])
        idx = cand.nonzero().squeeze(1)
        score = _scores(wk, hinv, units[idx])
        take = idx[torch.argsort(score)[:min(chunk, remove - len(removed))]]
        cols = units[take].reshape(-1)
        s_inv = torch.linalg.inv(hinv[cols][:, cols])
        wk -= wk[:, cols] @ s_inv @ hinv[cols, :]
        hinv -= hinv[:, cols] @ s_inv @ hinv[cols, :]
        wk[:, cols] = 0
        hinv[cols, :] = 0
        hinv[:, cols] = 0
        alive[take] = False
        for t in take.tolist():
            removed.append(t)
            if left is not None:
                left[int(groups[t])] -= 1
    return sorted(removed)
