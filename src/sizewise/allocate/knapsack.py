"""An exact multiple-choice knapsack: one option per item, Σ weight ≤ capacity, least Σ cost."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SizewiseError

# Pick one option per item, Σ weight ≤ capacity (exact integers), least Σ cost (floats). A dynamic
# program over *Pareto states* (Nemhauser–Ullmann) with branch-and-bound pruning, exact without
# discretizing the weight axis. After each item a state is dropped only if
#   - another state is no heavier and no costlier (its best completion is at least as good), or
#   - it cannot fit even with the lightest remaining options, or
#   - a lower bound on its best completion exceeds the cost of a known integral solution. The
#     bound is the LP relaxation of the remaining items (each item's options replaced by their
#     lower convex hull, filled greedily by efficiency); the integral solution is the same greedy
#     fill stopped at the last whole hull step that fits, which is a real choice per item.
# None of these can remove every optimal solution, so the cheapest final state is optimal. The LP
# gap is at most one hull step of one item, which keeps the state count small in practice.
# Pruning is guarded against float rounding by a relative margin far above accumulated error.

_SLACK = 1e-9


@dataclass(frozen=True)
class Solution:
    choice: list[int]     # option index per item, into the caller's lists
    weight: int
    cost: float
    states: int           # most states held at once: the work the exactness cost


def _pareto(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Indices of the points that no other point beats on both weight and cost, by increasing weight."""
    order = np.lexsort((c, w))
    cs = c[order]
    best_before = np.minimum.accumulate(np.concatenate(([np.inf], cs[:-1])))
    return order[cs < best_before]


def _hull_steps(w: np.ndarray, c: np.ndarray) -> list[tuple[int, float]]:
    """(Δweight > 0, Δcost < 0) steps along the lower convex hull of Pareto points (sorted by weight).

    Efficiency -Δcost/Δweight strictly decreases along the hull, so a greedy fill by efficiency
    takes each item's steps in order and every breakpoint is an integral choice.
    """
    pts = [(int(w[0]), float(c[0]))]
    for x, y in zip(w[1:].tolist(), c[1:].tolist()):
        while len(pts) >= 2:
            (x0, y0), (x1, y1) = pts[-2], pts[-1]
            if (y0 - y1) / (x1 - x0) <= (y1 - y) / (x - x1):   # not strictly decreasing: drop the middle
                pts.pop()
            else:
                break
        pts.append((x, y))
    return [(x1 - x0, y1 - y0) for (x0, y0), (x1, y1) in zip(pts, pts[1:])]


def _relaxation(steps: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (extra weight, cost change) of the greedy LP fill over the given hull steps."""
    if not steps:
        return np.zeros(1, dtype=np.int64), np.zeros(1)
    dw = np.array([s[0] for s in steps], dtype=np.int64)
    dc = np.array([s[1] for s in steps], dtype=np.float64)
    order = np.argsort(dc / dw, kind="stable")          # most cost saved per unit weight first
    return np.concatenate(([0], np.cumsum(dw[order]))), np.concatenate(([0.0], np.cumsum(dc[order])))


def solve_mckp(weights: list[list[int]], costs: list[list[float]], capacity: int) -> Solution:
    """Choose one option per item minimizing Σ cost subject to Σ weight ≤ capacity, exactly."""
    if len(weights) != len(costs) or any(len(w) != len(c) or not len(w) for w, c in zip(weights, costs)):
        raise ValueError("every item needs the same, non-zero number of weights and costs")
    items = []
    for w, c in zip(weights, costs):
        w, c = np.asarray(w, dtype=np.int64), np.asarray(c, dtype=np.float64)
        if not np.isfinite(c).all():
            raise ValueError("costs must be finite")
        keep = _pareto(w, c)                              # dominated options are never needed
        items.append((keep, w[keep], c[keep]))
    n = len(items)
    rest_min = np.zeros(n + 1, dtype=np.int64)            # Σ lightest weights of items k..n-1
    rest_base = np.zeros(n + 1)                           # Σ costs of those lightest options
    for k in range(n - 1, -1, -1):
        rest_min[k] = rest_min[k + 1] + items[k][1][0]
        rest_base[k] = rest_base[k + 1] + items[k][2][0]
    if rest_min[0] > capacity:
        raise SizewiseError(f"no choice fits: the lightest options weigh {int(rest_min[0])} > capacity {capacity}")
    steps = [_hull_steps(iw, ic) for _, iw, ic in items]
    relax = [_relaxation([s for item in steps[k:] for s in item]) for k in range(n + 1)]
    slack = _SLACK * (sum(float(np.abs(ic).max()) for _, _, ic in items) + 1e-300)

    def bounds(k, W, C):
        x, y = relax[k]
        extra = capacity - W - rest_min[k]
        lower = C + rest_base[k] + np.interp(extra.astype(np.float64), x.astype(np.float64), y)
        upper = C + rest_base[k] + y[np.searchsorted(x, extra, side="right") - 1]
        return lower, upper

    W, C = np.zeros(1, dtype=np.int64), np.zeros(1)
    best = float(bounds(0, W, C)[1][0])
    trail, peak = [], 1
    for k, (idx, iw, ic) in enumerate(items):
        m = len(iw)
        W2, C2 = (W[:, None] + iw).ravel(), (C[:, None] + ic).ravel()
        parent, option = np.repeat(np.arange(len(W)), m), np.tile(idx, len(W))
        sel = np.flatnonzero(W2 + rest_min[k + 1] <= capacity)
        sel = sel[_pareto(W2[sel], C2[sel])]
        lower, upper = bounds(k + 1, W2[sel], C2[sel])
        best = min(best, float(upper.min()))
        sel = sel[lower <= best + slack]
        W, C = W2[sel], C2[sel]
        trail.append((parent[sel], option[sel]))
        peak = max(peak, len(W))
    s = int(np.lexsort((W, C))[0])
    weight, cost = int(W[s]), float(C[s])
    choice = [0] * n
    for k in range(n - 1, -1, -1):
        parent, option = trail[k]
        choice[k], s = int(option[s]), int(parent[s])
    return Solution(choice, weight, cost, peak)
