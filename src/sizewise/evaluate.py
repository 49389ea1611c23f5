"""Perplexity, KL divergence and top-1 agreement over the same windows, with the protocol recorded."""

from __future__ import annotations

import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Text, Windows


def environment() -> dict:
    import transformers

    from . import __version__
    return {"sizewise": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine()}


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=x.to(device), use_cache=False).logits[0].float().cpu()


class _Tally:
    """Running sums for one model over the scored positions."""

    def __init__(self):
        self.nll = self.kl = self.agree = 0.0
        self.count = 0
        self.per_window: list[dict] = []

    def add(self, logp: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor | None) -> None:
        row = {"nll": -logp.gather(1, targets[:, None]).sum().item(), "tokens": targets.numel()}
        if ref_logp is not None:
            row["kl"] = (ref_logp.exp() * (ref_logp - logp)).sum().item()
            row["agree"] = (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            self.kl += row["kl"]
            self.agree += row["agree"]
        self.nll += row["nll"]
        self.count += row["tokens"]
        self.per_window.append(row)

    def result(self, with_reference: bool) -> dict:
        out = {"perplexity": math.exp(self.nll / self.count), "nll_per_token": self.nll / self.count,
               "tokens": self.count}
        if with_reference:
            out.update({"kl": self.kl / self.count, "top1_agreement": self.agree / self.count,
                        "kl_direction": "KL(reference || model), nats per token"})
        out["per_window"] = self.per_window
        return out


@torch.no_grad()
def evaluate_many(models: dict, windows: Windows, text: Text, *, reference=None, progress: bool = True,
                  roundings: dict | None = None) -> dict:
    """Evaluate several models on the same windows in one pass; the reference runs once per window.

    Returns {label: result}, plus "reference" when a reference is given. Each result holds the
    perplexity and, with a reference, KL(reference ‖ model) and top-1 agreement, all over the same
    scored positions, with per-window values so that comparisons can be paired. `roundings`
    ({label: {module: kind}}) rounds those models' matmul inputs as llama.cpp does (`runtime.llamacpp`).
    """
    from .runtime.llamacpp import rounded_inputs

    roundings = roundings or {}
    t0 = time.perf_counter()
    tallies = {label: _Tally() for label in models}
    ref_tally = _Tally() if reference is not None else None
    for x, first in tqdm(list(zip(windows.inputs, windows.score_from)), desc="eval windows", unit="win",
                         disable=not progress, file=sys.stderr):
        targets = x[0, first + 1:]
        ref_logp = None
        if reference is not None:
            ref_logp = F.log_softmax(_logits(reference, x)[first:-1], dim=-1)
            ref_tally.add(ref_logp, targets, None)
        for label, model in models.items():
            with rounded_inputs(roundings.get(label, {})):
                logp = F.log_softmax(_logits(model, x)[first:-1], dim=-1)
            tallies[label].add(logp, targets, ref_logp)
    elapsed = time.perf_counter() - t0
    some_model = next(iter(models.values())) if models else reference
    protocol = {**text.protocol(), **windows.protocol(), "dtype": str(next(some_model.parameters()).dtype),
                **environment()}
    results = {label: {**t.result(reference is not None), "protocol": protocol, "eval_s": elapsed,
                       "arithmetic": "llamacpp" if roundings.get(label) else "float"}
               for label, t in tallies.items()}
    if ref_tally is not None:
        results["reference"] = {**ref_tally.result(False), "protocol": protocol, "eval_s": elapsed}
    return results


def evaluate(model, windows: Windows, text: Text, *, reference=None, progress: bool = True) -> dict:
    """Perplexity of `model`; with `reference`, also KL(reference ‖ model), top-1 agreement and its perplexity."""
    res = evaluate_many({"model": model}, windows, text, reference=reference, progress=progress)
    out = res["model"]
    if reference is not None:
        out["reference_perplexity"] = res["reference"]["perplexity"]
    return out
