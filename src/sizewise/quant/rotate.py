"""Outlier-removing rotation of the residual stream (QuaRot / QuIP-style incoherence), done offline.

For a pre-RMSNorm decoder, with every norm's gain folded into the linears that read it, RMSNorm
commutes with any orthogonal Q (‖xQ‖ = ‖x‖). So the residual stream can be rotated x → x·Q:
    embeddings           E ← E·Q
    residual readers     W ← diag-folded W · Q          (q/k/v, gate/up, lm_head; columns)
    residual writers     W ← Qᵀ · W,  b ← Qᵀ b           (o_proj, down_proj; rows)
and the logits are unchanged. With Q a randomized Hadamard matrix every rotated weight column mixes
all input channels with equal magnitude, so a few outlier channels are spread out and weights
become easier to quantize. The model stays a plain transformers model: norm weights become 1,
nothing has to run at inference time (no online rotation; QuaRot's R4 on down_proj's input is not
applied).

Supported: Llama-style RMSNorm families, those whose `sizewise.families` entry names the residual
writers (`Family.rotation_writers`); the others say why not (`Family.no_rotation`): e.g. Gemma's
post-attention/post-feedforward norms apply a per-channel gain to what is *added* to the residual,
with no linear after them to absorb it, and LayerNorm (GPT-2, OPT) subtracts the mean, which a
rotation does not preserve.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import families
from ..errors import SizewiseError
from .awq import match_groups, norm_offset
from .hadamard import factors, hadamard


def _unsupported(model_type: str, why: str = "") -> SizewiseError:
    tail = f" ({why})" if why else ""
    return SizewiseError(f"rotation supports: {', '.join(families.rotation_model_types())} (pre-RMSNorm models); "
                         f"not {model_type}{tail}")


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation(n: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Orthogonal Q (float64) for x → x·Q and a description.

    Randomized Hadamard Q = diag(±1)·H/√n: random signs first, then the Hadamard mix, so that the
    rotated weights W·Q have randomized magnitudes (in column-vector form this is Qᵀx = H·diag(±1)·x/√n).
    Falls back to a random orthogonal matrix only for orders no Hadamard construction here reaches.
    """
    fs = factors(n)
    if fs is None:
        return random_orthogonal(n, seed), {"kind": "random-orthogonal",
                                            "why": f"no Hadamard construction for order {n}"}
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * hadamard(n) / math.sqrt(n), {"kind": "randomized-hadamard", "blocks": list(fs)}


def _final_norm(model: nn.Module, layers_path: str) -> nn.Module:
    parent = model.get_submodule(layers_path.rsplit(".", 1)[0]) if "." in layers_path else model
    norm = getattr(parent, "norm", None)
    if norm is None:
        raise _unsupported(getattr(model.config, "model_type", "?"), "no final norm found")
    return norm


def _plan(model: nn.Module, arch) -> list[tuple[list[tuple[nn.Module, list]], list]]:
    """Per layer: (norm, its reader linears) pairs and the writer linears; error if anything is unaccounted for."""
    mt = arch.model_type
    family = families.for_model_type(mt)
    if not family.rotates:
        raise _unsupported(mt, family.no_rotation)
    writers = family.rotation_writers
    out = []
    for layer, refs in zip(arch.layers, arch.linears):
        groups, _ = match_groups(layer, refs, family.folds)
        reads = [(g.prev, g.refs) for g in groups if g.rule.kind == "norm"]
        rel = {id(m): n for n, m in layer.named_modules()}
        writes = [r for r in refs if rel.get(id(r.module)) in writers]
        covered = {id(r.module) for _, rs in reads for r in rs} | {id(r.module) for r in writes}
        missing = [r.name for r in refs if id(r.module) not in covered]
        if missing or len(writes) != len(writers) or len(reads) != 2:
            raise _unsupported(mt, f"unexpected decoder layer structure around {missing[:1] or 'its norms'}")
        for norm, _ in reads:
            if norm_offset(norm) != 0.0 or isinstance(getattr(norm, "bias", None), torch.Tensor):
                raise _unsupported(mt, "a norm is not a plain RMSNorm")
        out.append((reads, writes))
    return out


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


def rotate_model(model: nn.Module, arch, *, seed: int = 0) -> dict:
    """Fold norms and rotate the residual stream in place; logits unchanged. Returns a JSON-able record.

    A tied lm_head is untied (the final norm's gain must go into the head but not the embedding):
    config.tie_word_embeddings becomes False and the head gets its own parameter (reported).
    Re-run `arch.discover` afterwards: the head is then a separate weight.
    """
    plan = _plan(model, arch)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    final = _final_norm(model, arch.layers_path)
    if head is None or norm_offset(final) != 0.0:
        raise _unsupported(arch.model_type, "no output head or an unusual final norm")
    n = emb.weight.shape[1]
    q, desc = rotation(n, seed)
    q = q.to(emb.weight.device)

    extra = 0
    if head.weight is emb.weight:
        # The rotated head is diag(g_final)-folded, the embedding is not: they can no longer share storage.
        head.weight = nn.Parameter(emb.weight.detach().clone())
        extra = head.weight.numel()
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
        if hasattr(model, "all_tied_weights_keys"):
            model.all_tied_weights_keys = {}

    folded = 0
    with torch.no_grad():
        _set(emb.weight, emb.weight.double() @ q)
        for reads, writes in plan:
            for norm, readers in reads:
                g = norm.weight.double()
                for r in readers:
                    r.set_weight((r.weight().double() * g[None, :]) @ q)
                _set(norm.weight, torch.ones_like(g))
                folded += 1
            for r in writes:
                r.set_weight(q.t() @ r.weight().double())
                b = getattr(r.module, "bias", None)
                if isinstance(b, torch.Tensor):
                    _set(b, b.double() @ q)
        g = final.weight.double()
        _set(head.weight, (head.weight.double() * g[None, :]) @ q)
        _set(final.weight, torch.ones_like(g))
        folded += 1
    return {
        "rotation": desc["kind"], **({"hadamard_blocks": desc["blocks"]} if "blocks" in desc else {"why": desc["why"]}),
        "hidden_size": n, "seed": seed, "norms_folded": folded,
        "untied_lm_head": extra > 0, "extra_parameters": extra,
        "online_transforms": [],
        "note": "residual stream rotated offline; no online rotation (e.g. of down_proj's input) is applied, "
                "so no transform is needed at run time",
    }
