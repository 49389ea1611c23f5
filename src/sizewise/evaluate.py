"""Perplexity, KL divergence and top-1 agreement over the same windows, with the protocol recorded."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .arch import discover
from .data import Text, Windows
from .precision import float32_execution


def environment() -> dict:
    import transformers

    from . import __version__
    return {"sizewise": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine()}


# Logit elements (positions × vocabulary) computed at once: the loss and KL are summed over chunks of
# positions so that a large vocabulary does not multiply memory (a 1024-token window of a 262k
# vocabulary is 1 GiB per float32 copy; a chunk is 64 MiB).
CHUNK_ELEMENTS = 2**24


@contextmanager
def decoder_output(model, x: torch.Tensor):
    """Run `model`'s decoder once on `x`; inside the block, `model(...)` reuses that output instead of
    running it again, so the head (and whatever the family applies after it: soft-capping, scaling)
    can be asked for a few positions at a time with `logits_to_keep`. If a model's forward does not
    call `get_decoder()`, the decoder simply runs again: slower, same numbers."""
    decoder = model.get_decoder()
    if decoder is model:                              # no separate decoder to reuse: each chunk runs it all
        yield
        return
    out = decoder(input_ids=x, use_cache=False)
    decoder.forward = lambda *args, **kwargs: out      # instance attribute: shadows the class's forward
    try:
        yield
    finally:
        del decoder.forward


def _chunk_log_probs(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """log-softmax of the logits at `positions` of window `x`, float32 [len(positions), vocab]."""
    logits = model(input_ids=x, use_cache=False, logits_to_keep=positions).logits[0]
    return F.log_softmax(logits.float(), dim=-1).cpu()


class _Tally:
    """Running sums for one model over the scored positions, and per window."""

    def __init__(self):
        self.nll = self.kl = self.agree = 0.0
        self.count = 0
        self.per_window: list[dict] = []

    def start_window(self, with_reference: bool) -> None:
        self.per_window.append({"nll": 0.0, "tokens": 0, **({"kl": 0.0, "agree": 0} if with_reference else {})})

    def add(self, logp: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor | None) -> None:
        """One chunk of the current window's scored positions."""
        row = self.per_window[-1]
        nll = -logp.gather(1, targets[:, None]).sum().item()
        row["nll"] += nll
        row["tokens"] += targets.numel()
        if ref_logp is not None:
            kl = (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree = (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            row["kl"] += kl
            row["agree"] += agree
            self.kl += kl
            self.agree += agree
        self.nll += nll
        self.count += targets.numel()

    def result(self, with_reference: bool) -> dict:
        out = {"perplexity": math.exp(self.nll / self.count), "nll_per_token": self.nll / self.count,
               "tokens": self.count}
        if with_reference:
            out.update({"kl": self.kl / self.count, "top1_agreement": self.agree / self.count,
                        "kl_direction": "KL(reference || model), nats per token"})
        out["per_window"] = self.per_window
        return out


def chunk_positions(vocab: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Positions per chunk so that one chunk's logits hold at most `chunk_elements` values."""
    return max(1, chunk_elements // max(1, vocab))


@torch.no_grad()
def evaluate_many(models: dict, windows: Windows, text: Text, *, reference=None, progress: bool = True,
                  roundings: dict | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> dict:
    """Evaluate several models on the same windows in one pass; the reference runs once per window.

    Returns {label: result}, plus "reference" when a reference is given. Each result holds the
    perplexity and, with a reference, KL(reference ‖ model) and top-1 agreement, all over the same
    scored positions, with per-window values so that comparisons can be paired. `roundings`
    ({label: {module: kind}}) rounds those models' matmul inputs as llama.cpp does (`runtime.llamacpp`).
    Each model's decoder runs once per window; its logits are computed `chunk_elements` at a time.
    Models kept in bf16/fp16 compute as their float32 copies would, one layer at a time (`precision`).
    """
    roundings = roundings or {}
    t0 = time.perf_counter()
    tallies = {label: _Tally() for label in models}
    ref_tally = _Tally() if reference is not None else None
    some_model = next(iter(models.values())) if models else reference
    step = chunk_positions(some_model.config.get_text_config().vocab_size, chunk_elements)
    with ExitStack() as computing:
        for model in (*models.values(), *(() if reference is None else (reference,))):
            computing.enter_context(float32_execution(model, discover(model).layers))
        for x, first in tqdm(list(zip(windows.inputs, windows.score_from)), desc="eval windows", unit="win",
                             disable=not progress, file=sys.stderr):
            _score_window(x.to(next(some_model.parameters()).device), first, models, reference, tallies,
                          ref_tally, roundings, step)
    elapsed = time.perf_counter() - t0
    protocol = {**text.protocol(), **windows.protocol(), "dtype": str(next(some_model.parameters()).dtype),
                **environment()}
    results = {label: {**t.result(reference is not None), "protocol": protocol, "eval_s": elapsed,
                       "arithmetic": "llamacpp" if roundings.get(label) else "float"}
               for label, t in tallies.items()}
    if ref_tally is not None:
        results["reference"] = {**ref_tally.result(False), "protocol": protocol, "eval_s": elapsed}
    return results


def _score_window(x, first, models, reference, tallies, ref_tally, roundings, step) -> None:
    """One window: each decoder once, then the scored positions' log-probabilities `step` at a time."""
    from .runtime.llamacpp import rounded_inputs

    scored = torch.arange(first, x.shape[1] - 1, device=x.device)   # positions whose next token is scored
    with ExitStack() as stack:
        if reference is not None:
            stack.enter_context(decoder_output(reference, x))
            ref_tally.start_window(False)
        for label, model in models.items():
            with rounded_inputs(roundings.get(label, {})):
                stack.enter_context(decoder_output(model, x))
            tallies[label].start_window(reference is not None)
        for s in range(0, len(scored), step):
            pos = scored[s:s + step]
            targets = x[0, pos + 1].cpu()
            ref_logp = None
            if reference is not None:
                ref_logp = _chunk_log_probs(reference, x, pos)
                ref_tally.add(ref_logp, targets, None)
            for label, model in models.items():
                with rounded_inputs(roundings.get(label, {})):
                    logp = _chunk_log_probs(model, x, pos)
                tallies[label].add(logp, targets, ref_logp)


def evaluate(model, windows: Windows, text: Text, *, reference=None, progress: bool = True) -> dict:
    """Perplexity of `model`; with `reference`, also KL(reference ‖ model), top-1 agreement and its perplexity."""
    res = evaluate_many({"model": model}, windows, text, reference=reference, progress=progress)
    out = res["model"]
    if reference is not None:
        out["reference_perplexity"] = res["reference"]["perplexity"]
    return out
