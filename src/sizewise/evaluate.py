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


@torch.no_grad()
def evaluate(model, windows: Windows, text: Text, *, reference=None, progress: bool = True) -> dict:
    """Perplexity of `model` on `windows`; with `reference`, also KL(reference ‖ model) and top-1 agreement.

    Every quantity is computed on the same scored positions. Per-window values are kept so that
    comparisons can be paired.
    """
    t0 = time.perf_counter()
    nll = ref_nll = kl = agree = 0.0
    count = 0
    per_window = []
    for x, first in tqdm(list(zip(windows.inputs, windows.score_from)), desc="eval windows", unit="win",
                         disable=not progress, file=sys.stderr):
        targets = x[0, first + 1:]
        logp = F.log_softmax(_logits(model, x)[first:-1], dim=-1)
        w_nll = -logp.gather(1, targets[:, None]).sum().item()
        nll += w_nll
        count += targets.numel()
        row = {"nll": w_nll, "tokens": targets.numel()}
        if reference is not None:
            ref_logp = F.log_softmax(_logits(reference, x)[first:-1], dim=-1)
            w_kl = (ref_logp.exp() * (ref_logp - logp)).sum().item()
            w_agree = (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            w_ref = -ref_logp.gather(1, targets[:, None]).sum().item()
            kl, agree, ref_nll = kl + w_kl, agree + w_agree, ref_nll + w_ref
            row.update(kl=w_kl, agree=w_agree, ref_nll=w_ref)
        per_window.append(row)
    result = {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count}
    if reference is not None:
        result.update({"kl": kl / count, "top1_agreement": agree / count,
                       "reference_perplexity": math.exp(ref_nll / count),
                       "kl_direction": "KL(reference || model), nats per token"})
    result["protocol"] = {**text.protocol(), **windows.protocol(), "dtype": str(next(model.parameters()).dtype),
                          **environment()}
    result["per_window"] = per_window
    result["eval_s"] = time.perf_counter() - t0
    return result
