"""`SolvedCache`: what measuring plans computes once and later work reuses."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .candidates import Candidate


@dataclass
class SolvedCache:
    """Kept by a caller across `measure_plans` calls (a sweep: across its budgets), then handed on.

    Four kinds of entries, each with its own methods:
      - the float model's log-probabilities on a set of samples (`reference`), which every plan
        measured on those samples is compared with;
      - a plan's measured KL on those samples (`measured_kl`, `put_kl`): the same plan chosen for
        another budget is not measured again;
      - a weight solved for a candidate (`weight`), stored solved (a QuantizedTensor of uint8 codes,
        or the float weight), not dense; `solved_weights` hands the quantized ones to
        `api.compress(..., solved=...)`;
      - held-out calibration samples (`held_out`), drawn once per calibration setting.
    Weights solved with other method options (GPTQ's clip search off) and the KLs of plans made of
    them live in a sibling cache (`with_options`), which shares the references and held-out samples.
    """

    references: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)   # samples key -> log-probs
    kls: dict[tuple, float] = field(default_factory=dict)    # (samples key, float dtype, arithmetic, plan) -> KL
    weights: dict[tuple[str, Candidate], object] = field(default_factory=dict)  # (weight name, candidate) -> solved
    held_outs: dict[tuple, torch.Tensor] = field(default_factory=dict)   # (text, samples, length, seed) -> samples
    variants: dict[tuple, "SolvedCache"] = field(default_factory=dict)  # sorted option items -> sibling cache

    @staticmethod
    def samples_key(samples: torch.Tensor) -> tuple:
        """Samples by shape and content."""
        return tuple(samples.shape), hashlib.sha256(samples.numpy().tobytes()).hexdigest()

    def reference(self, key: tuple, compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The float model's log-probabilities on the samples `key` names, computed once."""
        if key not in self.references:
            self.references[key] = compute()
        return self.references[key]

    def measured_kl(self, key: tuple) -> float | None:
        """A plan's KL measured before (`key`: samples key, float dtype, arithmetic, choices), or None."""
        return self.kls.get(key)

    def put_kl(self, key: tuple, kl: float) -> None:
        self.kls[key] = kl

    def weight(self, name: str, cand: Candidate, solve: Callable[[], object]):
        """Weight `name` solved for `cand`, solved once."""
        if (name, cand) not in self.weights:
            self.weights[(name, cand)] = solve()
        return self.weights[(name, cand)]

    def held_out(self, key: tuple, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Held-out calibration samples for `key` (text, samples, length, seed), drawn once."""
        if key not in self.held_outs:
            self.held_outs[key] = draw()
        return self.held_outs[key]

    def with_options(self, options: dict) -> "SolvedCache":
        """The cache of weights solved with `options` over the caller's own (this cache's when empty)."""
        key = tuple(sorted(options.items()))
        if not key:
            return self
        if key not in self.variants:
            self.variants[key] = SolvedCache(references=self.references, held_outs=self.held_outs)
        return self.variants[key]

    def solved_weights(self, options: dict | None = None) -> dict:
        """(weight name, method, format) -> QuantizedTensor: the weights the plans were measured with
        (solved with `options`, a plan's own: `with_options`), which `api.compress(..., stats=...,
        solved=...)` then reuses (float weights left out)."""
        return {(name, cand.method, cand.format): v for (name, cand), v in self.with_options(options or {}).weights.items()
                if not isinstance(v, torch.Tensor)}
