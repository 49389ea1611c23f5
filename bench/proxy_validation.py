"""Validating the allocator's sensitivity proxy: predicted vs measured KL of single-layer changes.

Research tooling (bench/allocate.py and the allocator's tests use it), not part of the package:

    sys.path.insert(0, "bench"); from proxy_validation import proxy_pairs, spearman, validate_proxy
    res = validate_proxy(model, arch, profile, held_out_samples, count=12)   # {"spearman", "pairs", ...}
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sizewise import engine
from sizewise.allocate import Profile
from sizewise.allocate.candidates import _dequantized
from sizewise.allocate.profile import _log_probs
from sizewise.arch import Architecture
from sizewise.errors import SizewiseError
from sizewise.quant import methods


def spearman(a, b) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):                      # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den else float("nan")


def proxy_pairs(profile: Profile, count: int = 12, seed: int = 0, candidate: int | None = None) -> list[tuple[str, int]]:
    """Single-layer changes to test: distinct random layers, each with a random quantized candidate
    (or always `candidate`, an index into profile.candidates, to test the ranking across layers)."""
    rng = np.random.default_rng(seed)
    linears = [l for l in profile.layers if l.kind == "linear"]
    layers = [linears[i] for i in rng.permutation(len(linears))]
    pairs = []
    for lp in layers:
        ok = [i for i, c in enumerate(profile.candidates) if c.method != "float" and lp.costs[i] is not None]
        if candidate is not None:
            ok = [i for i in ok if i == candidate]
        if ok:
            pairs.append((lp.name, int(rng.choice(ok))))
        if len(pairs) == count:
            break
    return pairs


def validate_proxy(model, arch: Architecture, profile: Profile, samples: torch.Tensor, *,
                   pairs: list[tuple[str, int]] | None = None, count: int = 12, seed: int = 0,
                   options: dict | None = None, batch: int = 8) -> dict:
    """Measured KL(float ‖ model with one layer changed) vs the profile's prediction, per pair.

    Returns {"spearman": ρ, "pairs": [...], "median_ratio": measured/predicted}. The model is restored.
    """
    pairs = pairs if pairs is not None else proxy_pairs(profile, count, seed)
    if len(pairs) < 2:
        raise SizewiseError("validating the proxy needs at least 2 single-layer changes")
    refs = {r.weight_name: r for r in arch.all_linears()}
    need = {n for n, i in pairs if profile.candidates[i].method != "float"
            and methods.get(profile.candidates[i].method).needs_calibration}
    stats = {}
    if need:     # statistics of the float model's inputs, as profiled, for the layers that use them
        hooks = []
        for n in need:
            stats[n] = engine.LinearStats.empty(refs[n].shape[1], next(model.parameters()).device)
            hooks.append(refs[n].module.register_forward_pre_hook(lambda m, a, s=stats[n]: s.add(a[0])))
        try:
            _log_probs(model, samples, batch)
        finally:
            for h in hooks:
                h.remove()
    reference = _log_probs(model, samples, batch)
    rows = []
    for name, i in pairs:
        ref, cand = refs[name], profile.candidates[i]
        w = ref.weight()
        ref.set_weight(_dequantized(cand, w, stats.get(name), options))
        try:
            logp = _log_probs(model, samples, batch)
        finally:
            ref.set_weight(w)
        kl = sum(float((r.exp() * (r - l)).sum()) for r, l in zip(reference, logp)) / samples.numel()
        rows.append({"layer": name, "candidate": cand.label, "predicted": profile.by_name[name].costs[i], "measured": kl})
    pred, meas = [r["predicted"] for r in rows], [r["measured"] for r in rows]
    ratios = [m / p for p, m in zip(pred, meas) if p > 0]
    return {"spearman": spearman(pred, meas), "pairs": rows,
            "median_ratio": float(np.median(ratios)) if ratios else float("nan"), "tokens": int(samples.numel())}
